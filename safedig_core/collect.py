"""Collection: run a model over a prompt set and record chosen positions at chosen sampler steps into an
activation store (store.py). The CLI (`safedig collect`) and the SafeDIG Collect Activations node both
call `collect()`; what differs is how they build the `Runner` and report progress.

What is recorded, per prompt, per position, per recorded step (the cond half of the batch only, the
first model evaluation of that step):
- `token_budget` token rows, chosen uniformly without replacement by a generator seeded with
  (seed, prompt index, step) - so a resumed run picks the same tokens as an uninterrupted one, and
  positions whose streams have the same length see the same token indices; a stream shorter than the
  budget is stored whole; `token_budget = 0` stores no rows (pooled means only, e.g. to route over
  every position cheaply);
- the mean over all the stream's tokens (before subsampling), float32: the pooled activation routing uses.

Steps to record are sampler step indices 0 .. steps-1; a spec may give indices (`0, 5, -1`), fractions of
the schedule (`0.25, 0.5`: step floor(f·steps), 1.0 the last step) or `all`. A number with a decimal point
is a fraction. Step i is the step whose schedule fraction i/steps the steering window uses.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .comfy_patch import step_of
from .positions import ModelLayout, Position, PositionError, parse
from .prompts import PromptRecord
from .store import StoreWriter

SHARD_TARGET_BYTES = 256 << 20  # default shard size: one position of one shard is what a reader holds
MAX_PROMPTS_PER_SHARD = 32  # an interruption loses at most the prompts of one unfinished shard


class CollectError(ValueError):
    """Bad collection settings or a runner that did not deliver what was asked."""


Sink = Callable[[Position, torch.Tensor, int], None]


class Runner(Protocol):
    """Generates one image per call and hands recorded activations to `sink`."""

    layout: ModelLayout

    def describe(self) -> dict:
        """JSON settings that determine the activations (model identity, sampler, cfg, size); they go into
        the store's config, so resuming with different ones is refused."""

    def run(self, record: PromptRecord, seed: int, steps: int, positions: list[Position],
            record_step: Callable[[int], bool], sink: Sink) -> None:
        """Sample `record.prompt` with noise seed `seed` over `steps` steps; for each position and each step
        with `record_step(step)` true, call `sink(position, x [B, T, d], step)` once, x being the cond half of
        the batch (B = 1: one image per prompt)."""


# --- settings ------------------------------------------------------------------------------------------

def parse_positions(spec, layout: ModelLayout) -> list[Position]:
    """`all`, a comma list of names, or a list of names/Positions; each checked against the model layout."""
    if isinstance(spec, str):
        if spec.strip().lower() in ("", "all"):
            return layout.positions()
        spec = [s for s in spec.split(",") if s.strip()]
    out = []
    for item in spec:
        p = item if isinstance(item, Position) else parse(str(item))
        layout.check(p)
        if p not in out:
            out.append(p)
    if not out:
        raise PositionError("no positions to record")
    return out


def parse_record_steps(spec, steps: int) -> list[int]:
    """Sorted, distinct step indices in 0 .. steps-1 from `all`, a comma string or a list of ints/floats."""
    if steps < 1:
        raise CollectError(f"steps must be at least 1, got {steps}")
    if isinstance(spec, str):
        if spec.strip().lower() == "all":
            return list(range(steps))
        items = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                items.append(float(part) if "." in part or "e" in part.lower() else int(part))
            except ValueError:
                raise CollectError(f"steps to record: {part!r} is neither a step index nor a fraction") from None
    elif isinstance(spec, (int, float)):
        items = [spec]
    else:
        items = list(spec)
    out = set()
    for v in items:
        if isinstance(v, float):
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise CollectError(f"steps to record: fraction {v} is not in [0, 1]")
            out.add(min(math.floor(v * steps + 1e-9), steps - 1))
        else:
            i = int(v)
            if not -steps <= i < steps:
                raise CollectError(f"steps to record: step {i} is outside the schedule of {steps} steps "
                                   f"(indices 0..{steps - 1}, or negative from the end)")
            out.add(i % steps)
    if not out:
        raise CollectError("no steps to record")
    return sorted(out)


def token_indices(total: int, budget: int, seed: int, prompt_index: int, step: int) -> torch.Tensor:
    """The sorted token indices kept of a stream of `total` tokens (all of them when total <= budget)."""
    if budget <= 0:
        return torch.zeros(0, dtype=torch.long)
    if total <= budget:
        return torch.arange(total)
    g = torch.Generator().manual_seed(_mix("tokens", seed, prompt_index, step))
    return torch.randperm(total, generator=g)[:budget].sort().values


def prompt_seed(record: PromptRecord, index: int, seed: int) -> int:
    """The noise seed of one prompt: its own `seed` column when given, else seed + prompt index."""
    return record.seed if record.seed is not None else (seed + index) % (2 ** 63)


def _mix(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") & (2 ** 63 - 1)


def default_prompts_per_shard(layout: ModelLayout, positions: list[Position], record_steps: list[int],
                              token_budget: int, dtype_bytes: int = 2) -> int:
    """Prompts per shard so that a shard is about SHARD_TARGET_BYTES (between 1 and MAX_PROMPTS_PER_SHARD)."""
    per_prompt = sum(len(record_steps) * (max(token_budget, 0) * dtype_bytes + 4) * layout.width_of(p)
                     for p in positions)
    return max(1, min(MAX_PROMPTS_PER_SHARD, SHARD_TARGET_BYTES // max(per_prompt, 1)))


# --- ComfyUI runner ------------------------------------------------------------------------------------

def cond_rows(batch: int, cond_or_uncond) -> slice | None:
    """Rows of the first cond chunk of a ComfyUI model call (None: the call holds no cond)."""
    if not cond_or_uncond:
        return slice(0, batch)
    chunks = len(cond_or_uncond)
    if batch % chunks:
        raise CollectError(f"batch of {batch} cannot be split into {chunks} cond/uncond chunks")
    per = batch // chunks
    for j, c in enumerate(cond_or_uncond):
        if c == 0:
            return slice(j * per, (j + 1) * per)
    return None


class ComfyRunner:
    """Samples with ComfyUI (comfy.sample.sample: the KSampler path) through `comfyui.recording_model`.

    model: a ComfyUI ModelPatcher (FLUX or SD3); encode(prompt) -> (positive, negative) CONDITIONING;
    latent_shape: (channels, height/8, width/8) of one empty latent; name: the model's identity in the
    store's config."""

    def __init__(self, model, encode: Callable[[str], tuple], cfg: float = 1.0, sampler: str = "euler",
                 scheduler: str = "simple", latent_shape: tuple = (16, 128, 128), name: str | None = None):
        from . import comfyui

        self.model, self.encode = model, encode
        self.cfg, self.sampler, self.scheduler = float(cfg), sampler, scheduler
        self.latent_shape = tuple(int(s) for s in latent_shape)
        dm = model.get_model_object("diffusion_model")
        self.layout = comfyui.layout_of(dm)
        self.name = name or f"{type(dm).__name__}"
        self._recording: dict = {}
        self._state = None

    def describe(self) -> dict:
        lay = self.layout
        return {"runner": "comfyui", "model": self.name, "family": lay.family, "blocks": dict(lay.blocks),
                "width": lay.width, "cfg": self.cfg, "sampler": self.sampler, "scheduler": self.scheduler,
                "latent_shape": list(self.latent_shape)}

    def _record(self, p: Position, x: torch.Tensor, to: dict) -> None:
        st = self._state
        if st is None:
            return
        rows = cond_rows(x.shape[0], to.get("cond_or_uncond"))
        if rows is None:
            return
        step = step_of(to)
        step = 0 if step is None else step
        if (p, step) in st["seen"]:
            return  # later model evaluations of the same step (multi-evaluation samplers)
        st["seen"].add((p, step))
        if st["record_step"](step):
            st["sink"](p, x[rows], step)

    def _model_for(self, positions: list[Position]):
        from . import comfyui

        key = tuple(positions)
        if key not in self._recording:
            self._recording = {key: comfyui.recording_model(self.model, list(positions), self._record, self.layout)}
        return self._recording[key]

    def run(self, record: PromptRecord, seed: int, steps: int, positions: list[Position],
            record_step: Callable[[int], bool], sink: Sink) -> None:
        import comfy.sample

        model = self._model_for(positions)
        positive, negative = self.encode(record.prompt)
        latent = torch.zeros((1,) + self.latent_shape)
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, seed)
        self._state = {"seen": set(), "record_step": record_step, "sink": sink}
        try:
            with torch.no_grad():
                comfy.sample.sample(model, noise, steps, self.cfg, self.sampler, self.scheduler, positive, negative,
                                    latent, denoise=1.0, callback=None, disable_pbar=True, seed=seed)
        finally:
            self._state = None


def clip_encoder(clip, family: str, negative: str = "", guidance: float = 3.5) -> Callable[[str], tuple]:
    """encode(prompt) -> (positive, negative) through a ComfyUI CLIP object; FLUX gets `guidance`."""
    extra = {"guidance": float(guidance)} if family == "flux" else {}
    neg: list = []

    def enc(text: str):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text), add_dict=extra)

    def encode(prompt: str):
        if not neg:
            neg.append(enc(negative))
        return enc(prompt), neg[0]

    return encode


def tiny_encoder(family: str, tokens: int = 8, context_dim: int = 64, guidance: float = 3.5) -> Callable[[str], tuple]:
    """A stand-in text encoder for the tiny random models: text states and pooled vector drawn from a
    generator seeded by the prompt text (the same text always gives the same conditioning); the negative
    is the encoding of the empty prompt."""
    from . import comfyui

    pooled_dim = 768 if family == "flux" else 2048
    extra = {"guidance": float(guidance)} if family == "flux" else {}

    def enc(text: str):
        g = torch.Generator().manual_seed(_mix("tiny-text", text))
        scale = 0.1 if not text else 1.0
        return comfyui.conditioning(torch.randn(1, tokens, context_dim, generator=g) * scale,
                                    torch.randn(1, pooled_dim, generator=g) * scale, **extra)

    def encode(prompt: str):
        return enc(prompt), enc("")

    return encode


# --- collection ----------------------------------------------------------------------------------------

@dataclass
class CollectResult:
    path: str
    total: int  # prompts in the run
    collected: int  # prompts stored by this call
    resumed: int  # prompts found already stored
    stopped: bool  # should_stop ended the run early
    complete: bool  # every prompt is stored
    dropped: int = 0  # prompts sampled by this call but not stored (their shard was not full): recollected on resume

    def __str__(self) -> str:
        state = "complete" if self.complete else ("stopped" if self.stopped else "incomplete")
        text = (f"{self.path}: {state}; {self.collected} prompts stored now, {self.resumed} were already stored, "
                f"{self.total} in all")
        if self.dropped:
            text += f"; {self.dropped} sampled prompts of an unfinished shard will be recollected on resume"
        return text


def collect(runner: Runner, prompts: list[PromptRecord], positions, store_path: str, steps: int, record_steps,
            token_budget: int, seed: int, progress: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None, dtype: str = "float16",
            prompts_per_shard: int | None = None) -> CollectResult:
    """Collect `positions` at `record_steps` of a `steps`-step sampling of every prompt into the store at
    `store_path`, resuming whatever is already stored there (a store made with other settings is refused).
    `progress(done, total)` is called after each prompt; `should_stop()` is asked before each one."""
    layout = runner.layout
    chosen = parse_positions(positions, layout)
    want = parse_record_steps(record_steps, steps)
    if token_budget < 0:
        raise CollectError(f"token budget must be 0 (pooled means only) or more, got {token_budget}")
    if not prompts:
        raise CollectError("no prompts to collect")
    pps = prompts_per_shard or default_prompts_per_shard(layout, chosen, want, token_budget)
    config = {"steps": int(steps), "record_steps": want, "token_budget": int(token_budget), "seed": int(seed),
              "runner": runner.describe()}
    widths = {p.name: layout.width_of(p) for p in chosen}
    wanted = set(want)
    total = len(prompts)
    sampled = resumed = 0
    stopped = False
    with StoreWriter(store_path, layout.family, [p.name for p in chosen], widths, prompts, config,
                     prompts_per_shard=pps, dtype=dtype) as writer:
        resumed = sum(writer.done(i) for i in range(total))
        if progress:
            progress(resumed, total)
        done = resumed
        for i, rec in enumerate(prompts):
            if writer.done(i):
                continue
            if should_stop is not None and should_stop():
                stopped = True
                break
            rows, pooled = _collect_one(runner, rec, i, seed, steps, chosen, wanted, token_budget, widths)
            writer.add(i, rows, pooled)
            sampled += 1
            done += 1
            if progress:
                progress(done, total)
        complete = writer.complete
        stored = sum(s["prompts"][1] - s["prompts"][0] for s in writer.shards.values())
    return CollectResult(store_path, total, stored - resumed, resumed, stopped, complete, sampled - (stored - resumed))


def _collect_one(runner: Runner, rec: PromptRecord, i: int, seed: int, steps: int, positions: list[Position],
                 wanted: set, budget: int, widths: dict) -> tuple[dict, dict]:
    got: dict = {}

    def sink(p: Position, x: torch.Tensor, step: int) -> None:
        if p not in positions or step not in wanted:
            raise CollectError(f"the runner delivered {p} at step {step}, which was not asked for")
        if (p, step) in got:
            raise CollectError(f"the runner delivered {p} at step {step} twice for prompt #{i}")
        if x.ndim != 3 or x.shape[-1] != widths[p.name]:
            raise CollectError(f"{p}: activations of shape {tuple(x.shape)}, expected [B, T, {widths[p.name]}]")
        tokens = x.detach().reshape(-1, x.shape[-1])
        mean = torch.mean(tokens, 0, dtype=torch.float32).cpu()
        idx = token_indices(len(tokens), budget, seed, i, step)
        got[(p, step)] = (tokens[idx.to(tokens.device)].cpu(), idx, mean)

    runner.run(rec, prompt_seed(rec, i, seed), steps, positions, wanted.__contains__, sink)
    rows, pooled = {}, {}
    order = sorted(wanted)
    for p in positions:
        missing = [s for s in order if (p, s) not in got]
        if missing:
            raise CollectError(f"prompt #{i} ({rec.id}): the model produced no activations at {p} for step(s) "
                               f"{', '.join(map(str, missing))}")
        parts = [got[(p, s)] for s in order]
        rows[p.name] = (torch.cat([a[0] for a in parts]),
                        torch.cat([torch.full((len(a[1]),), s, dtype=torch.int32) for s, a in zip(order, parts)]),
                        torch.cat([a[1] for a in parts]))
        pooled[p.name] = (torch.stack([a[2] for a in parts]), torch.tensor(order, dtype=torch.int32))
    return rows, pooled


def hash_weights(module: torch.nn.Module, h) -> None:
    """Feed a slice of `module`'s first, middle and last parameters (with their names) into hasher `h`: cheap
    even for a 12B model, and enough to tell one checkpoint from another."""
    params = list(module.named_parameters())
    for name, p in [params[0], params[len(params) // 2], params[-1]] if params else []:
        h.update(name.encode())
        h.update(p.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes())


def model_fingerprint(model) -> str:
    """A short hash of a ModelPatcher's diffusion-model weights (`hash_weights`) and of its weight patches,
    so that resuming a store with another model is refused."""
    h = hashlib.sha256()
    try:
        hash_weights(model.get_model_object("diffusion_model"), h)
        patches = getattr(model, "patches", {}) or {}  # LoRAs and other weight patches, with their strengths
        h.update(repr([(k, [(q[0], q[2]) for q in v]) for k, v in sorted(patches.items())]).encode())
    except Exception:  # noqa: BLE001 - a fingerprint is a convenience, never a reason to fail
        return "unknown"
    return h.hexdigest()[:16]


# --- command line (`safedig collect`) ------------------------------------------------------------------

def add_cli(sub) -> None:
    """Register `safedig collect` on the CLI's subparsers."""
    p = sub.add_parser("collect", help="record DiT activations of a model over prompt sets into an activation store",
                       description="Run a FLUX.1 or SD3/SD3.5 model (loaded through ComfyUI as a library, or a tiny "
                                   "random model with --tiny) over prompt files and record the chosen positions at "
                                   "the chosen sampler steps. Rerunning the same command resumes an interrupted run; "
                                   "Ctrl-C stops after the current prompt (twice: at once), the store stays valid.")
    p.add_argument("--prompts", nargs="+", required=True, metavar="FILE", help="CSV / TSV / JSONL / I2P CSV prompt files")
    p.add_argument("--out", required=True, metavar="DIR", help="the store folder (created, or resumed)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="FILE", help="FLUX/SD3 diffusion model (.safetensors, as in ComfyUI's "
                                                     "models/diffusion_models); needs --clip")
    src.add_argument("--checkpoint", metavar="FILE", help="a checkpoint that includes its text encoders (e.g. SD3.5)")
    src.add_argument("--tiny", choices=("flux", "sd3"), help="a tiny random-weight model with stand-in text states "
                                                             "(derived from each prompt's text): for trying things out")
    p.add_argument("--clip", nargs="+", metavar="FILE", help="text encoders for --model: FLUX clip_l + t5xxl; "
                                                             "SD3 clip_l + clip_g + t5xxl")
    p.add_argument("--positions", default="all", help="'all' or a comma list, e.g. double.7.img,single.12.img")
    p.add_argument("--steps", type=int, help="sampler steps (default 28; 4 with --tiny)")
    p.add_argument("--record-steps", default="0.25,0.5,0.75",
                   help="steps to record: indices (0,5,-1), fractions of the schedule (0.25,0.5) or 'all'")
    p.add_argument("--token-budget", type=int, default=256,
                   help="token rows kept per image, position and recorded step (0: pooled means only)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of prompt i is seed + i unless the file gives one")
    p.add_argument("--cfg", type=float, help="CFG scale (default 1.0 for FLUX, 4.0 for SD3)")
    p.add_argument("--guidance", type=float, default=3.5, help="FLUX guidance (FLUX.1 Dev)")
    p.add_argument("--negative", default="", help="negative prompt (used when cfg > 1)")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="simple")
    p.add_argument("--width", type=int, help="image width (default 1024; 64 with --tiny)")
    p.add_argument("--height", type=int, help="image height (default 1024; 64 with --tiny)")
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16", help="storage dtype of token rows")
    p.add_argument("--prompts-per-shard", type=int, help="default: shards of about 256 MiB")
    p.add_argument("--i2p-threshold", type=float, default=50.0,
                   help="I2P files: percentage at which a categorised prompt counts as unsafe")
    p.set_defaults(run=run_cli)


def _load_runner(args):
    """(runner, family) for the CLI's model arguments; everything is loaded through ComfyUI."""
    from . import comfyui

    comfyui.bootstrap()
    tiny = args.tiny is not None
    size = (args.width or (64 if tiny else 1024), args.height or (64 if tiny else 1024))
    if size[0] % 16 or size[1] % 16 or min(size) < 16:
        raise CollectError(f"image size {size[0]}x{size[1]}: width and height must be multiples of 16")
    if tiny:
        model = comfyui.tiny_flux(seed=0) if args.tiny == "flux" else comfyui.tiny_sd3(seed=0)
        family, encode, name = args.tiny, tiny_encoder(args.tiny, guidance=args.guidance), f"tiny-{args.tiny}"
    else:
        import comfy.sd

        path = args.model or args.checkpoint
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file {path}: not found")
        if args.model:
            if not args.clip:
                raise CollectError("--model needs its text encoders: --clip clip_l.safetensors t5xxl.safetensors "
                                   "(FLUX) or --clip clip_l clip_g t5xxl (SD3)")
            for c in args.clip:
                if not os.path.isfile(c):
                    raise FileNotFoundError(f"text encoder file {c}: not found")
            model = comfy.sd.load_diffusion_model(path)
            family = comfyui.layout_of(model.get_model_object("diffusion_model")).family
            ctype = comfy.sd.CLIPType.FLUX if family == "flux" else comfy.sd.CLIPType.SD3
            clip = comfy.sd.load_clip(ckpt_paths=list(args.clip), clip_type=ctype)
        else:
            model, clip = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=True)[:2]
            if clip is None:
                raise CollectError(f"checkpoint {path} holds no text encoders; use --model with --clip")
            family = comfyui.layout_of(model.get_model_object("diffusion_model")).family
        encode = clip_encoder(clip, family, args.negative, args.guidance)
        name = f"{os.path.basename(path)}#{model_fingerprint(model)}"
    cfg = args.cfg if args.cfg is not None else (1.0 if family == "flux" else 4.0)
    channels = model.get_model_object("latent_format").latent_channels
    runner = ComfyRunner(model, encode, cfg, args.sampler, args.scheduler, (channels, size[1] // 8, size[0] // 8), name)
    return runner


def run_cli(args) -> None:
    import signal
    import sys

    from tqdm import tqdm

    from .prompts import load_many
    from .prompts import summary as prompt_summary
    from .store import ActivationStore, summary

    prompts = load_many(args.prompts, args.i2p_threshold)
    print(prompt_summary(prompts), file=sys.stderr)
    runner = _load_runner(args)
    steps = args.steps or (4 if args.tiny else 28)
    stop = {"asked": False}

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        tqdm.write("safedig collect: stopping after this prompt (Ctrl-C again to stop at once; "
                   "the store stays valid either way)", file=sys.stderr)

    bar = tqdm(total=len(prompts), unit="prompt", desc="collect", dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = collect(runner, prompts, args.positions, args.out, steps, args.record_steps, args.token_budget,
                         args.seed, progress=progress, should_stop=lambda: stop["asked"], dtype=args.dtype,
                         prompts_per_shard=args.prompts_per_shard)
    except KeyboardInterrupt:
        bar.close()
        print(f"safedig collect: the store at {args.out} is valid; run the same command again to resume",
              file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    print(summary(ActivationStore(args.out)))
    if result.stopped:
        print(f"safedig collect: stopped; run the same command again to resume ({result})", file=sys.stderr)
        raise KeyboardInterrupt
