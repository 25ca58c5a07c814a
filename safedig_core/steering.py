"""Blend and Repel: the steering maths, in exactly one place, for every adapter (ComfyUI, diffusers).

Per token x (one row), with code z = E(x) and harmful latents H:
- gate (`SteeringConfig.gate`), inside the sampler window, on the chosen batch halves; every other token is
  returned bit for bit:
  - "token": act where the token's own harmful mass g = Σ_{j∈H} z_j exceeds τ·gate_scale (the dictionary's
    unit: the high quantile of g over safe tokens measured when it was built, 1 otherwise);
  - "image": decide per image of the batch: it is flagged when the max of g over the tokens of its cond rows
    exceeds τ·image_gate_scale (the same quantile over safe images' max, see `gate.py`), at this position or
    at the detecting positions of `detect` (the adapters carry that decision between the blocks of one model
    call). The uncond rows (the negative prompt) never decide: they follow their image. In the rows of a
    flagged image every token with harmful activity (g > 0) is steered, or with `focus` f > 0 only those
    with g ≥ f · (the largest g of their row at this position): the risky object's tokens, not a safe
    object's beside it;
- Blend (α): move toward x_safe = D(z_safe) + (x − D(z)), where z_safe replaces the active harmful codes
  by their safe values. The replacement c is solved so that re-encoding x_safe puts the active harmful
  pre-activations exactly at their safe values (G_AA c = s_A − z_A, G = W_enc[H] W_dec[H]ᵀ), which is
  the plain ablation when encoder and decoder are biorthogonal and stays exact when they are not;
- Repel (β): x' = x − β Σ_{j∈H} z_j d_j, away from the harmful decoder directions (β > 1 overshoots).
- Safe exemplars (optional, per position: `targets`, real activations of safe prompts; the dictionary keeps them
  for `input.pooled`, where one token is a whole prompt): Blend's safe point becomes the exemplar nearest (cosine)
  to x_safe, x' = x + α (t − x), and Repel acts on the part (1 − α) of x that Blend leaves. Under the per-image
  gate every token of a flagged image moves, whether its own harmful latents fire or not (the decision may come
  from a detector elsewhere, which reads the risk better than a pooled vector's SAE). Removing the harmful
  latents from a pooled sentence vector leaves a sentence with a hole ("a tree next to ..."); a safe prompt's own
  vector is a sentence the model was trained on.
Both act on the space the encoder sees (scaled; per-token normalised where the SAE asks for it, the shift then
mapped back with that token's own factor: `SparseAutoencoder.shift_to_input`) and touch only the active
harmful decoder rows.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.nn import functional as F

from . import fast_gate as fast
from .positions import PositionError, parse
from .sae import SparseAutoencoder
from .schedule import image_max, image_to_rows

APPLY_TO = ("both", "cond", "uncond")
GATES = ("token", "image")
DETECT = ("each", "text", "img")  # or a comma list of position names


@dataclass(frozen=True)
class SteeringConfig:
    blend: float = 0.0  # α in [0, 1]
    repel: float = 0.0  # β ≥ 0
    threshold: float = 0.0  # τ on the harmful mass
    start: float = 0.0  # sampler window, fractions of the schedule: [start, end)
    end: float = 1.0
    apply_to: str = "both"
    preserve_norm: bool = False
    blend_passes: int = 3  # Blend re-encodes at most this many times in all (see PositionSteerer._blend_shift)
    gate: str = "token"  # "token": each token by its own mass; "image": one decision per batch row
    # where the per-image decision is made: "each" position for itself, the "text" or "img" stream positions
    # of the steered set, or a comma list of the dictionary's positions (see gate.detectors)
    detect: str = "each"
    # screen tokens on the harmful (and a few probe) encoder rows first, and run the full TopK encode only where
    # the gate may pass: the same decisions, most of the encoder's cost saved on safe tokens (see fast_gate.py)
    fast_gate: bool = False
    # under the image gate: in a flagged image, steer only the tokens whose harmful mass is at least this share of
    # the largest in their row at this position (0: every token with any harmful activity), so that a safe object
    # beside a risky one is left alone
    focus: float = 0.0

    def __post_init__(self):
        problems = []
        if not 0.0 <= self.blend <= 1.0:
            problems.append(f"blend={self.blend} must be in [0, 1]")
        if not 0 <= self.repel < float("inf"):  # also rejects NaN, which would turn every steered token into NaN
            problems.append(f"repel={self.repel} must be a finite number ≥ 0")
        if not self.threshold >= 0:  # NaN too
            problems.append(f"threshold={self.threshold} must be ≥ 0")
        if not 0.0 <= self.focus <= 1.0:
            problems.append(f"focus={self.focus} must be in [0, 1]")
        if not 0.0 <= self.start <= self.end <= 1.0:
            problems.append(f"window start={self.start}, end={self.end} must satisfy 0 ≤ start ≤ end ≤ 1")
        if self.blend_passes < 1:
            problems.append(f"blend_passes={self.blend_passes} must be ≥ 1")
        if self.apply_to not in APPLY_TO:
            problems.append(f"apply_to={self.apply_to!r} must be one of {', '.join(APPLY_TO)}")
        if self.gate not in GATES:
            problems.append(f"gate={self.gate!r} must be one of {', '.join(GATES)}")
        problems += _detect_problems(self.detect, self.gate)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def is_identity(self) -> bool:
        return self.blend == 0.0 and self.repel == 0.0

    @property
    def image_gate(self) -> bool:
        return self.gate == "image"

    def with_(self, **changes) -> "SteeringConfig":
        return replace(self, **changes)


def _detect_problems(detect, gate: str) -> list[str]:
    if not isinstance(detect, str):
        return [f"detect={detect!r} must be a string"]
    if detect.strip().lower() in DETECT:
        if gate != "image" and detect.strip().lower() != "each":
            return [f"detect={detect!r} needs gate='image': a per-token decision cannot be carried to other tokens"]
        return []
    names = [n for n in detect.split(",") if n.strip()]
    if not names:
        return [f"detect={detect!r} must be one of {', '.join(DETECT)} or a comma list of positions"]
    bad = []
    for n in names:
        try:
            parse(n)
        except PositionError:
            bad.append(n.strip())
    if bad:
        return [f"detect={detect!r}: {bad[0]!r} is neither one of {', '.join(DETECT)} nor a position name "
                "such as double.0.txt or joint.3.txt"]
    if gate != "image":
        return [f"detect={detect!r} needs gate='image': a per-token decision cannot be carried to other tokens"]
    return []


def _focused(g: Tensor, tokens: int, focus: float) -> Tensor:
    """Indices of the tokens (rows of g, `tokens` per batch row) with harmful activity and a mass of at least
    `focus` × the largest of their batch row."""
    top = g.reshape(-1, tokens).amax(1).repeat_interleave(tokens)
    return ((g > 0) & (g >= focus * top)).nonzero().squeeze(1)


def _on(sae: SparseAutoencoder, device: torch.device) -> bool:
    at = sae.W_enc.device
    return at.type == device.type and (at.index is None or device.index is None or at.index == device.index)


class PositionSteerer:
    """One position's SAE and harmful latents, with the derived tensors steering needs, cast once to the
    model's device and dtype (`to`)."""

    def __init__(self, sae: SparseAutoencoder, harmful: Tensor, safe_values: Tensor | None = None,
                 gate_scale: float = 1.0, image_gate_scale: float | None = None, targets: Tensor | None = None):
        self.sae = sae.requires_grad_(False)  # master weights, as loaded
        self.gate_scale = float(gate_scale)  # τ is measured in this unit of harmful mass
        # the per-image gate's unit (max of the mass over an image's tokens); dictionaries made before it
        # existed fall back on the token unit
        self.image_gate_scale = float(gate_scale if image_gate_scale is None else image_gate_scale)
        self.harmful = harmful.long()
        h = len(self.harmful)
        self.safe_values = torch.zeros(h) if safe_values is None else safe_values.float()
        if targets is not None and (targets.dim() != 2 or targets.shape[1] != sae.d or targets.shape[0] == 0):
            raise ValueError(f"safe exemplars must be [count ≥ 1, {sae.d}], got shape {list(targets.shape)}")
        self.targets = None if targets is None else targets.detach().float()  # [N, d], unscaled input space
        self._targets = None  # (targets, their unit vectors) on the device last used
        self._cache: dict = {}

    @property
    def width(self) -> int:
        return self.sae.d

    def to(self, device=None, dtype=None) -> "PositionSteerer":
        """Prepare the working copy for `device`/`dtype` ahead of the first call (the master weights,
        as loaded, stay where they are, so a round trip through a low precision loses nothing)."""
        w = self.sae.W_enc
        self._derived(torch.device(device) if device is not None else w.device, dtype or w.dtype)
        return self

    def hold(self, device, dtype) -> SparseAutoencoder:
        """The encoder-side working copy for `device`/`dtype`, a module of its own even where the master weights
        match, for a host's memory manager to count and move (`adapters/comfy/memory.py`); steering keeps
        using it wherever that manager puts it."""
        return self._derived(torch.device(device), dtype, own=True)[0]

    def _derived(self, device, dtype, own: bool = False):
        key = (device, dtype)
        hit = self._cache.get(key)
        if hit is None or not _on(hit[0], device) or (own and hit[0] is self.sae):
            # a copy a memory manager moved here is used as it is
            held = [v[0] for v in self._cache.values()
                    if v[0] is not self.sae and _on(v[0], device) and v[0].W_enc.dtype == dtype]
            self._cache.clear()  # one working copy at a time: the model runs on one device and dtype
            master = self.sae
            H = self.harmful.to(master.W_dec.device)
            D_H = master.W_dec[H].to(device, torch.float32)
            sae = held[0] if held else master
            if not held and (own or master.W_enc.device != device or master.W_enc.dtype != dtype):
                # The working copy needs only the encoder side: decoding touches the harmful rows alone.
                sae = SparseAutoencoder(master.d, master.latents, master.k, master.activation,
                                        normalize=master.normalize)
                state = {k: v for k, v in master.state_dict().items() if k != "W_dec"}
                sae.W_dec = torch.nn.Parameter(torch.empty(0, master.d), requires_grad=False)
                sae.load_state_dict(state, strict=False)
                sae = sae.to(device=device, dtype=dtype).requires_grad_(False)
            H = H.to(device)
            lookup = torch.full((sae.latents,), -1, dtype=torch.long, device=device)
            lookup[H] = torch.arange(len(H), device=device)
            gram = sae.W_enc[H].float() @ D_H.t()  # [h, h]: how pre-activation i moves along decoder row j
            self._cache[key] = (sae, lookup, D_H, gram, self.safe_values.to(device))
        return self._cache[key]

    def harmful_codes(self, sae: SparseAutoencoder, xs: Tensor, lookup: Tensor) -> Tensor:
        """Codes of the harmful latents [N, h] for scaled inputs [N, d]."""
        h = len(self.harmful)
        if sae.activation == "topk":
            vals, idx = sae.encode_sparse(xs)
            pos = lookup[idx]
            hit = pos >= 0
            out = torch.zeros(xs.shape[0], h + 1, dtype=vals.dtype, device=xs.device)
            return out.scatter_(1, torch.where(hit, pos, h), torch.where(hit, vals, 0))[:, :h]
        rows = self.harmful.to(xs.device)
        return sae.activate(sae.pre_acts(xs, rows), rows)

    def harmful_mass(self, x: Tensor) -> Tensor:
        """g = Σ_{j∈H} z_j per row of unscaled x [..., d] → [...]."""
        return self.codes(x).sum(-1)

    def codes(self, x: Tensor) -> Tensor:
        """The harmful latents' codes z_H per row of unscaled x [..., d] → [..., h]."""
        sae, lookup = self._derived(x.device, x.dtype)[:2]
        flat = x.reshape(-1, x.shape[-1])
        return self.harmful_codes(sae, sae.prepare(flat), lookup).reshape(*x.shape[:-1], -1)

    def image_mass(self, x: Tensor) -> Tensor:
        """The per-image gate's statistic: max of the harmful mass over each row's tokens, x [B, T, d] → [B]."""
        if x.dim() != 3:
            raise ValueError(f"the per-image gate needs tokens as [batch, tokens, width], got shape {list(x.shape)}")
        if x.shape[1] == 0:
            return x.new_zeros(x.shape[0], dtype=torch.float32)
        return self.harmful_mass(x).float().amax(-1)

    def flag_images(self, x: Tensor, cfg: SteeringConfig, cond_or_uncond=None) -> Tensor:
        """[B] bool: the rows of x [B, T, d] whose image is flagged: its statistic, the max over the image's cond
        rows (`schedule.image_max`; without `cond_or_uncond` each row is an image), exceeds τ in this
        position's image unit. Every row of a flagged image is flagged, its uncond rows included."""
        if len(self.harmful) == 0:
            return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if cfg.fast_gate and self.sae.activation == "topk" and x.dim() == 3:
            per_image = image_max(self._fast_rows(x, cfg.threshold * self.image_gate_scale).float(), cond_or_uncond) > 0
        else:
            per_image = image_max(self.image_mass(x), cond_or_uncond) > cfg.threshold * self.image_gate_scale
        return image_to_rows(per_image, cond_or_uncond)

    def _fast_rows(self, x: Tensor, floor: float) -> Tensor:
        """[B] bool, image_mass(x) > floor through the fast gate: a row passes once one of its tokens does."""
        sae, lookup = self._derived(x.device, x.dtype)[:2]
        xs = sae.prepare(x.reshape(-1, x.shape[-1]))
        cand = fast.screen(sae, self.harmful).may_pass(xs, sae.b_dec, floor).nonzero().squeeze(1)
        rows = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if cand.numel():
            passed = self.harmful_codes(sae, xs[cand], lookup).sum(-1).float() > floor  # as image_mass compares
            rows[cand[passed] // x.shape[1]] = True
        return rows

    def steer(self, x: Tensor, cfg: SteeringConfig, rows: Tensor | None = None,
              flagged: Tensor | None = None) -> Tensor:
        """Steer tokens x [B, T, d] (or [N, d] under the token gate); `rows` [B] masks the batch rows that may be
        steered. Under the image gate, `flagged` [B] is a decision made elsewhere (the detecting positions);
        without it this position decides from x. Returns x itself when nothing is steered, else a new tensor
        equal to x outside steered tokens."""
        if cfg.is_identity or len(self.harmful) == 0 or x.numel() == 0:
            return x
        if x.shape[-1] != self.width:
            raise ValueError(f"activation width {x.shape[-1]} does not match the dictionary's {self.width}")
        if flagged is not None and not cfg.image_gate:
            raise ValueError("a per-image decision (flagged) was given, but the gate is per token")
        if cfg.image_gate:
            decided = self.flag_images(x, cfg) if flagged is None else flagged.to(device=x.device, dtype=torch.bool)
            rows = decided if rows is None else decided & rows.to(x.device)
        sae, lookup, D_H, gram, safe = self._derived(x.device, x.dtype)
        flat = x.reshape(-1, x.shape[-1])
        if rows is not None:
            per = flat.shape[0] // rows.shape[0]
            cand = rows.to(x.device).repeat_interleave(per).nonzero().squeeze(1)
            if cand.numel() == 0:
                return x
        else:
            cand = None
        sub = flat if cand is None else flat[cand]
        floor = 0.0 if cfg.image_gate else cfg.threshold * self.gate_scale  # flagged images: any harmful activity
        if cfg.image_gate and cfg.blend and self.targets is not None:  # a flagged vector becomes an exemplar
            z_H = self.harmful_codes(sae, sae.prepare(sub), lookup)
            gated = torch.arange(sub.shape[0], device=x.device)
        elif cfg.image_gate and cfg.focus > 0:
            z_H = self.harmful_codes(sae, sae.prepare(sub), lookup)
            gated = _focused(z_H.sum(-1).float(), flat.shape[0] // rows.shape[0], cfg.focus)
            z_H = z_H[gated]
        elif cfg.fast_gate and sae.activation == "topk":
            gated, z_H = fast.gated_codes(sae, self.harmful, sae.prepare(sub), floor,
                                          lambda ys: self.harmful_codes(sae, ys, lookup))
        else:
            z_H = self.harmful_codes(sae, sae.prepare(sub), lookup)
            gated = (z_H.sum(-1) > floor).nonzero().squeeze(1)
            z_H = z_H[gated]
        if gated.numel() == 0:
            return x
        return self.steer_tokens(x, gated if cand is None else cand[gated], z_H, cfg)

    def steer_tokens(self, x: Tensor, token: Tensor, z_H: Tensor, cfg: SteeringConfig) -> Tensor:
        """Blend and Repel applied to the tokens `token` (indices into x's rows, flattened) whose harmful codes are
        z_H [G, h], whatever chose them: a new tensor equal to x elsewhere."""
        sae, lookup, D_H, gram, safe = self._derived(x.device, x.dtype)
        flat = x.reshape(-1, x.shape[-1])
        old = flat[token]
        z_H = z_H.float()
        delta = self._sum_rows(z_H, D_H, -cfg.repel) if cfg.repel else 0.0  # scaled space, [G, d]
        if cfg.blend and self.targets is not None:
            x_safe = old.float() + sae.shift_to_input(
                self._blend_shift(sae, sae.prepare(old), z_H, lookup, D_H, gram, safe, cfg), old).float()
            t = self.nearest_target(x_safe)
            kept = (1.0 - cfg.blend) * sae.shift_to_input(delta, old).float() if cfg.repel else 0.0
            new = (torch.lerp(old.float(), t, cfg.blend) + kept).to(x.dtype)  # lerp: t itself at α = 1
        else:
            if cfg.blend:
                delta = delta + cfg.blend * self._blend_shift(sae, sae.prepare(old), z_H, lookup, D_H, gram, safe, cfg)
            new = old + sae.shift_to_input(delta, old).to(x.dtype)
        if cfg.preserve_norm:
            n_old = old.float().norm(dim=-1, keepdim=True)
            n_new = new.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
            new = (new.float() * (n_old / n_new)).to(x.dtype)
        out = flat.clone()
        out[token] = new
        return out.reshape(x.shape)

    def nearest_target(self, x: Tensor) -> Tensor:
        """The safe exemplar nearest (cosine) to each row of x [G, d] → [G, d] float32."""
        if self._targets is None or self._targets[0].device != x.device:
            t = self.targets.to(x.device)
            self._targets = (t, F.normalize(t, dim=-1))
        t, unit = self._targets
        return t[(F.normalize(x.float(), dim=-1) @ unit.T).argmax(-1)]

    def _blend_shift(self, sae, xs, z_H, lookup, D_H, gram, safe, cfg) -> Tensor:
        """x_safe − x in scaled space. Moving along the harmful decoder rows can wake other harmful latents
        (and removing some lets others into the TopK code); up to `blend_passes − 1` further passes re-encode
        the tokens where a harmful latent not yet held would fire, and re-solve over every latent held so
        far, so that the latents fixed by earlier passes stay at their safe values."""
        shift = self._solve(z_H, D_H, gram, safe)
        held = z_H > 0
        rows = self.harmful.to(xs.device)
        for _ in range(cfg.blend_passes - 1):
            # ReLU/JumpReLU code of the harmful latents: for TopK, what they would be if they made the cut
            again = sae.activate(sae.pre_acts((xs.float() + shift).to(xs.dtype), rows), rows).float()
            fired = again > 0
            left = (fired & ~held).any(-1).nonzero().squeeze(1)
            if left.numel() == 0:
                break
            held[left] |= fired[left]
            # held latents that no longer fire are (up to rounding) at their safe values: keep them there
            now = torch.where(fired[left], again[left], safe.expand(len(left), -1))
            shift[left] += self._solve(now, D_H, gram, safe, held[left])
        return shift

    @staticmethod
    def _compact(z_H: Tensor, active: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Each token's active harmful latents (default: z_H > 0) moved to the front: (order, mask, values),
        all [G, a]."""
        active = z_H > 0 if active is None else active
        a = max(int(active.sum(-1).max()), 1)
        order = torch.argsort(active.to(torch.int8), dim=-1, descending=True, stable=True)[:, :a]
        mask = active.gather(1, order)
        return order, mask, z_H.gather(1, order) * mask

    @classmethod
    def _sum_rows(cls, z_H: Tensor, D_H: Tensor, weight: float) -> Tensor:
        """weight · Σ_j z_j d_j over each token's active harmful latents only."""
        order, _, vals = cls._compact(z_H)
        return F.embedding_bag(order, D_H, per_sample_weights=weight * vals, mode="sum")

    @classmethod
    def _solve(cls, z_H: Tensor, D_H: Tensor, gram: Tensor, safe: Tensor, active: Tensor | None = None) -> Tensor:
        """Shift along the active harmful decoder rows that puts their pre-activations (z_H) at the safe values."""
        order, mask, vals = cls._compact(z_H, active)
        a = order.shape[1]
        g = gram[order.unsqueeze(-1), order.unsqueeze(-2)]  # [G, a, a]
        both = mask.unsqueeze(-1) & mask.unsqueeze(-2)
        eye = torch.eye(a, device=g.device)
        ridge = 1e-6 * gram.diagonal().abs().mean()
        system = torch.where(both, g, 0) + eye * (~mask).unsqueeze(-1) + ridge * eye
        rhs = (safe[order] - vals) * mask
        c = torch.linalg.solve(system, rhs.unsqueeze(-1)).squeeze(-1) * mask
        return F.embedding_bag(order, D_H, per_sample_weights=c, mode="sum")
