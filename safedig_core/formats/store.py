"""The activation store: a folder of sharded safetensors, a manifest with checksums, atomic and resumable
writes, and streamed reads whose memory does not depend on the store's size.

Layout (docs/PIPELINE.md has the full contract):
    manifest.json            identity (family, positions, widths, dtype, prompts_per_shard, config, prompt
                             list checksum), `complete`, and one entry per written shard
    prompts.jsonl            the run's PromptRecords, in order; "prompt index" = line number (0-based)
    shard-NNNNNN.safetensors shard k holds prompts [k·P, (k+1)·P) (P = prompts_per_shard):
        "<pos>" [n, d] fp16/bf16 token rows; "<pos>.prompt" / ".step" / ".token" int32 [n];
        "<pos>.pooled" float32 [m, d] (mean over all the stream's tokens of one prompt at one recorded
        step, before subsampling) with "<pos>.pooled_prompt" / ".pooled_step" int32 [m]

Every file is written to a temporary name, fsynced and moved into place with os.replace, and the manifest
is rewritten (the same way) after each shard, so a process killed at any moment leaves a valid store: on
reopening, shards listed in the manifest are done and anything else is removed. Shard boundaries are
fixed by prompt index, so an interrupted and resumed run writes the same bytes as an uninterrupted one.

Reads never hold more than one position of one shard (plus one batch): tensors are read from the file
with `readinto` (no mmap), and each shard's sha256 is checked, by a streamed hash, the first time an
`ActivationStore` object reads it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch

from ..positions import Position, parse
from .atomic import replacing, write_bytes
from .prompts import PromptRecord

FORMAT = 1
MANIFEST = "manifest.json"
PROMPTS = "prompts.jsonl"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_SHARD = re.compile(r"^shard-(\d{6})\.safetensors$")
_FRAGMENT = re.compile(r"^manifest\.rank-(\d{3,})\.json$")  # shards written by rank R of a torchrun collection
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I32": torch.int32,
              "I64": torch.int64}
_CHUNK = 1 << 20


class StoreError(ValueError):
    """A store that cannot be read or resumed: names the folder or the shard and the problem."""


class Batch(NamedTuple):
    x: torch.Tensor  # float32 [b, d]
    prompt: torch.Tensor  # int64 [b], index into ActivationStore.prompts
    step: torch.Tensor  # int64 [b], sampler step index (0 .. steps-1)
    token: torch.Tensor  # int64 [b], token index within the stream


class Pooled(NamedTuple):
    x: torch.Tensor  # float32 [m, d]
    prompt: torch.Tensor  # int64 [m]
    step: torch.Tensor  # int64 [m]


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.safetensors"


# --- files ---------------------------------------------------------------------------------------------

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}


def _write_safetensors(path: str, tensors: dict, metadata: dict) -> tuple[str, int]:
    """Write a .safetensors file (tensors in name order, one JSON header: the same input gives the same
    bytes), fsync it, and return (sha256, size). Streams tensor by tensor: no second copy in memory."""
    header, off, order = {}, 0, []
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
        order.append(t)
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(head)), head):
            f.write(chunk)
            h.update(chunk)
        for t in order:
            if t.numel():
                buf = t.reshape(-1).view(torch.uint8).numpy()
                f.write(buf)
                h.update(buf)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest(), 8 + len(head) + off


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _prompt_lines(prompts: list[PromptRecord]) -> bytes:
    return "".join(json.dumps(r.to_json(), ensure_ascii=False, sort_keys=True) + "\n" for r in prompts).encode("utf-8")


def _load_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise StoreError(f"{path}: not an activation store (no {MANIFEST})")
    try:
        with open(mpath, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise StoreError(f"{mpath}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"{mpath}: not a SafeDIG activation store manifest of format {FORMAT} "
                         f"(format: {m.get('format') if isinstance(m, dict) else None!r})")
    return m


def _read_prompts(path: str) -> list[PromptRecord]:
    ppath = os.path.join(path, PROMPTS)
    try:
        with open(ppath, encoding="utf-8") as f:
            return [PromptRecord.from_json(json.loads(line)) for line in f if line.strip()]
    except (OSError, ValueError, KeyError) as e:
        raise StoreError(f"{ppath}: unreadable prompt list ({e})") from None


class _ShardFile:
    """Reads named tensors of one safetensors file with readinto: memory is exactly the tensors asked for."""

    def __init__(self, path: str):
        self.path = path
        name = os.path.basename(path)
        try:
            self.f = open(path, "rb")  # noqa: SIM115 - closed by close() / the context manager
        except OSError as e:
            raise StoreError(f"shard {name}: cannot be opened ({e.strerror})") from None
        try:
            size = os.fstat(self.f.fileno()).st_size
            raw = self.f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 1 << 28):
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            self.header = json.loads(self.f.read(n))
            self.start = 8 + n
            self.size = size
        except (ValueError, UnicodeDecodeError) as e:
            self.f.close()
            raise StoreError(f"shard {name} is corrupt: {e}") from None

    def get(self, key: str) -> torch.Tensor:
        name = os.path.basename(self.path)
        info = self.header.get(key)
        if not isinstance(info, dict):
            raise StoreError(f"shard {name} is corrupt: it has no tensor {key!r}")
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            b, e = info["data_offsets"]
            shape = [int(s) for s in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"shard {name} is corrupt: bad header entry for {key!r}") from None
        if not 0 <= b <= e or self.start + e > self.size:
            raise StoreError(f"shard {name} is corrupt: tensor {key!r} lies outside the file")
        buf = torch.empty(e - b, dtype=torch.uint8)
        self.f.seek(self.start + b)
        if e > b and self.f.readinto(buf.numpy()) != e - b:
            raise StoreError(f"shard {name} is corrupt: tensor {key!r} is truncated")
        try:
            return buf.view(dtype).reshape(shape)
        except RuntimeError:
            raise StoreError(f"shard {name} is corrupt: tensor {key!r} has {e - b} bytes for shape {shape}") from None

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- read side -----------------------------------------------------------------------------------------

class ActivationStore:
    """A store opened for reading. Positions may be given as `Position`s or names."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.manifest = m = _load_manifest(self.path)
        try:
            self.family: str = m["family"]
            self.positions: list[Position] = [parse(n) for n in m["positions"]]
            self._widths = {n: int(m["widths"][n]) for n in m["positions"]}
            self.dtype: str = m["dtype"]
            self.config: dict = m["config"]
            self.prompts_per_shard: int = int(m["prompts_per_shard"])
            self.shards: list[dict] = list(m["shards"])
            self.complete: bool = bool(m.get("complete"))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{self.path}/{MANIFEST}: malformed manifest ({e!r})") from None
        self.prompts: list[PromptRecord] = _read_prompts(self.path)
        if len(self.prompts) != m.get("num_prompts"):
            raise StoreError(f"{self.path}: {PROMPTS} has {len(self.prompts)} prompts, the manifest says "
                             f"{m.get('num_prompts')}")
        self._verified: set[str] = set()

    # metadata
    def _name(self, p) -> str:
        name = str(p)
        if name not in self._widths:
            have = ", ".join(self._widths) or "none"
            raise StoreError(f"{self.path}: position {name} was not collected (the store has: {have})")
        return name

    def width(self, p) -> int:
        return self._widths[self._name(p)]

    def rows(self, p) -> int:
        name = self._name(p)
        return sum(int(s["rows"][name]) for s in self.shards)

    @property
    def steps(self) -> list[int]:
        """The recorded sampler step indices."""
        return list(self.config.get("record_steps", []))

    def done_prompts(self) -> int:
        return sum(s["prompts"][1] - s["prompts"][0] for s in self.shards)

    # integrity
    def _shard_path(self, shard: dict) -> str:
        return os.path.join(self.path, shard["file"])

    def verify_shard(self, shard: dict) -> None:
        path = self._shard_path(shard)
        if path in self._verified:
            return
        if not os.path.isfile(path):
            raise StoreError(f"shard {shard['file']} is missing from {self.path}")
        if _sha256(path) != shard["sha256"]:
            raise StoreError(f"shard {shard['file']} is corrupt: its sha256 does not match the manifest "
                             f"({self.path}); delete it and rerun the collection to recollect its prompts")
        self._verified.add(path)

    def verify(self) -> None:
        """Check every shard's checksum (StoreError names the first bad one)."""
        for s in self.shards:
            self.verify_shard(s)

    def _open(self, shard: dict) -> _ShardFile:
        self.verify_shard(shard)
        return _ShardFile(self._shard_path(shard))

    def _selection(self, prompts: Iterable[int] | None) -> torch.Tensor | None:
        if prompts is None:
            return None
        sel = torch.zeros(len(self.prompts), dtype=torch.bool)
        idx = torch.as_tensor(list(prompts), dtype=torch.long)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self.prompts)):
            raise StoreError(f"{self.path}: prompt index out of range (the store has {len(self.prompts)} prompts)")
        sel[idx] = True
        return sel

    # data
    def iter_batches(self, p, batch_size: int, prompts: Iterable[int] | None = None, shuffle: bool = False,
                     seed: int = 0) -> Iterator[Batch]:
        """Token rows of position `p` in batches of `batch_size` (the last may be smaller), float32.
        Memory: one position of one shard plus one batch. `shuffle` permutes the shard order and the rows
        inside each shard (seeded); batches may straddle two shards."""
        name = self._name(p)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        sel = self._selection(prompts)
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.shards), generator=g).tolist() if shuffle else range(len(self.shards))
        pending: list[tuple] = []
        have = 0
        for k in order:
            shard = self.shards[k]
            lo, hi = shard["prompts"]
            if int(shard["rows"][name]) == 0 or (sel is not None and not bool(sel[lo:hi].any())):
                continue
            with self._open(shard) as f:
                x, pr, st, tk = (f.get(name), f.get(f"{name}.prompt"), f.get(f"{name}.step"), f.get(f"{name}.token"))
            if x.ndim != 2 or x.shape[1] != self._widths[name] or not (len(x) == len(pr) == len(st) == len(tk)):
                raise StoreError(f"shard {shard['file']} is corrupt: position {name} has inconsistent shapes")
            idx = torch.arange(len(x)) if sel is None else torch.nonzero(sel[pr.long()]).squeeze(1)
            if shuffle:
                idx = idx[torch.randperm(len(idx), generator=g)]
            start = 0
            while start < len(idx):
                take = min(batch_size - have, len(idx) - start)
                part = idx[start:start + take]
                pending.append((x[part], pr[part], st[part], tk[part]))
                have += take
                start += take
                if have == batch_size:
                    yield _batch(pending)
                    pending, have = [], 0
            del x, pr, st, tk, idx
        if pending:
            yield _batch(pending)

    def pooled(self, p, prompts: Iterable[int] | None = None) -> Pooled:
        """Per-prompt, per-recorded-step means of position `p` over all its tokens (float32)."""
        name = self._name(p)
        sel = self._selection(prompts)
        xs, ps, ss = [], [], []
        for shard in self.shards:
            lo, hi = shard["prompts"]
            if sel is not None and not bool(sel[lo:hi].any()):
                continue
            with self._open(shard) as f:
                x, pr, st = f.get(f"{name}.pooled"), f.get(f"{name}.pooled_prompt"), f.get(f"{name}.pooled_step")
            keep = slice(None) if sel is None else sel[pr.long()]
            xs.append(x[keep].float())
            ps.append(pr[keep].long())
            ss.append(st[keep].long())
        d = self._widths[name]
        if not xs:
            return Pooled(torch.zeros(0, d), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        return Pooled(torch.cat(xs), torch.cat(ps), torch.cat(ss))


def _batch(parts: list[tuple]) -> Batch:
    if len(parts) == 1:
        x, p, s, t = parts[0]
        return Batch(x.float(), p.long(), s.long(), t.long())
    return Batch(torch.cat([a[0] for a in parts]).float(), torch.cat([a[1] for a in parts]).long(),
                 torch.cat([a[2] for a in parts]).long(), torch.cat([a[3] for a in parts]).long())


def summary(store: ActivationStore) -> str:
    """A few lines a user can read: what was collected, how much, whether it is complete."""
    size = sum(int(s.get("bytes", 0)) for s in store.shards)
    c = store.config
    lines = [
        f"activation store {store.path}",
        (f"  {store.family.upper()}, {len(store.positions)} positions, {store.dtype}, "
         f"{'complete' if store.complete else 'INCOMPLETE (rerun the same collection to resume)'}"),
        (f"  prompts: {store.done_prompts()} of {len(store.prompts)} collected, in {len(store.shards)} shards "
         f"({size / 2 ** 20:.1f} MiB)"),
    ]
    if "steps" in c:
        lines.append(f"  sampler steps: {c['steps']}, recorded: {', '.join(map(str, c.get('record_steps', [])))}; "
                     f"token budget per image per step: {c.get('token_budget')}")
    for p in store.positions:
        lines.append(f"  {p.name}: width {store.width(p)}, {store.rows(p)} token rows")
    return "\n".join(lines)


# --- write side ----------------------------------------------------------------------------------------

def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [f"{prefix}: the store has {a!r}, this run {b!r}"]


class StoreWriter:
    """Opens (or resumes) a store for writing. `add(i, rows, pooled)` hands over prompt i's activations;
    a shard is written as soon as all its prompts are in. Use as a context manager or call `close()`.

    `ranks` (`pipeline.distributed.Ranks`: rank, world, barrier) lets several processes write one store:
    rank R writes the shards k with k mod world = R and lists them in its own `manifest.rank-R.json`; rank 0
    opens (creates, resumes, cleans) the store before the others join, and at `close()` merges the lists into
    `manifest.json`. A store whose writers were killed keeps their lists; the next open merges them, so a
    rerun with any number of processes resumes it. The files are the same as one process would write."""

    def __init__(self, path: str, family: str, positions: list, widths: dict, prompts: list[PromptRecord],
                 config: dict, prompts_per_shard: int = 64, dtype: str = "float16", ranks=None):
        self.path = os.fspath(path)
        self.rank, self.world = (ranks.rank, ranks.world) if ranks is not None else (0, 1)
        self._barrier = ranks.barrier if ranks is not None else (lambda: None)
        names = [str(p) for p in positions]
        for n in names:
            parse(n)
        if not names:
            raise StoreError("no positions to store")
        if len(set(names)) != len(names):
            raise StoreError(f"positions repeat: {', '.join(names)}")
        if dtype not in DTYPES:
            raise StoreError(f"store dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        if prompts_per_shard < 1:
            raise StoreError(f"prompts_per_shard must be at least 1, got {prompts_per_shard}")
        if not prompts:
            raise StoreError("no prompts to collect")
        missing = [n for n in names if n not in {str(k): v for k, v in widths.items()}]
        if missing:
            raise StoreError(f"no width given for position(s) {', '.join(missing)}")
        widths = {str(k): int(v) for k, v in widths.items()}
        self.names, self.prompts, self.dtype = names, list(prompts), DTYPES[dtype]
        self.pps = int(prompts_per_shard)
        self.num_shards = -(-len(prompts) // self.pps)
        lines = _prompt_lines(self.prompts)
        self.head = {"format": FORMAT, "family": family, "positions": names,
                     "widths": {n: widths[n] for n in names}, "dtype": dtype, "prompts_per_shard": self.pps,
                     "num_prompts": len(self.prompts), "prompts_sha256": hashlib.sha256(lines).hexdigest(),
                     "config": json.loads(json.dumps(config))}
        self.shards: dict[int, dict] = {}
        self._buf: dict[int, dict[int, tuple]] = {}
        self.closed = False
        mpath = os.path.join(self.path, MANIFEST)
        if self.rank == 0:
            if os.path.isfile(mpath):
                self._resume(_load_manifest(self.path))
            else:
                self._create(lines)
            self._clean()
        self._barrier()
        if self.rank != 0:
            self._resume(_load_manifest(self.path))

    # opening
    def _create(self, lines: bytes) -> None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise StoreError(f"{self.path} exists and is not a folder")
        os.makedirs(self.path, exist_ok=True)
        foreign = [n for n in os.listdir(self.path) if not self._ours(n)]
        if foreign:
            raise StoreError(f"{self.path} is not empty and is not an activation store (it holds "
                             f"{', '.join(sorted(foreign)[:5])}); choose another output folder")
        write_bytes(os.path.join(self.path, PROMPTS), lines)
        self._write_manifest()

    def _resume(self, m: dict) -> None:
        """Check the settings against the store's and take over its finished shards (rank 0 also those that
        other ranks listed in their manifest fragments, then rewrites the manifest without the fragments)."""
        diffs = []
        for key in ("family", "positions", "widths", "dtype", "prompts_per_shard", "config"):
            diffs += _diff(m.get(key, "<absent>"), self.head[key], key)
        if diffs:
            raise StoreError(f"{self.path} was collected with different settings ({'; '.join(diffs[:6])}"
                             f"{'; ...' if len(diffs) > 6 else ''}); use another output folder, or delete this one "
                             "to start over")
        if m.get("prompts_sha256") != self.head["prompts_sha256"]:
            raise StoreError(f"{self.path} was collected over a different prompt list ({self._prompt_diff()}); "
                             "use another output folder, or delete this one to start over")
        fragments = self._fragments() if self.rank == 0 else {}
        listed = list(m.get("shards", [])) + [s for entries in fragments.values() for s in entries]
        for s in listed:
            k = int(_SHARD.match(s["file"]).group(1)) if _SHARD.match(s.get("file", "")) else None
            if k is None or not 0 <= k < self.num_shards:
                raise StoreError(f"{self.path}/{MANIFEST}: bad shard entry {s!r}")
            spath = os.path.join(self.path, s["file"])
            if not os.path.isfile(spath):
                continue  # recollected: the manifest is rewritten without it below
            if os.path.getsize(spath) != int(s["bytes"]):
                raise StoreError(f"shard {s['file']} is corrupt ({os.path.getsize(spath)} bytes, the manifest says "
                                 f"{s['bytes']}) in {self.path}; delete it and run again to recollect its prompts")
            self.shards[k] = s
        if self.rank == 0 and (fragments or len(self.shards) != len(m.get("shards", []))
                               or bool(m.get("complete")) != self.complete):
            self._write_manifest()
            for name in fragments:
                os.remove(os.path.join(self.path, name))

    def _fragments(self) -> dict[str, list]:
        """{file name: shard entries} of the manifest fragments left by ranks of a torchrun collection."""
        out = {}
        for name in sorted(os.listdir(self.path)):
            if _FRAGMENT.match(name):
                try:
                    with open(os.path.join(self.path, name), encoding="utf-8") as f:
                        out[name] = list(json.load(f)["shards"])
                except (OSError, ValueError, KeyError, TypeError):
                    raise StoreError(f"{self.path}/{name}: unreadable manifest fragment of a distributed "
                                     "collection; delete it to recollect the shards it listed") from None
        return out

    def _prompt_diff(self) -> str:
        try:
            old = _read_prompts(self.path)
        except StoreError:
            return "its prompts.jsonl is unreadable"
        if len(old) != len(self.prompts):
            return f"the store has {len(old)} prompts, this run {len(self.prompts)}"
        for i, (a, b) in enumerate(zip(old, self.prompts)):
            if a != b:
                what = "id" if a.id != b.id else "text or fields"
                return f"prompt #{i} differs in {what}: the store has {a.id!r}, this run {b.id!r}"
        return "same prompts, different serialisation"

    @staticmethod
    def _ours(name: str) -> bool:
        return (name in (MANIFEST, PROMPTS) or bool(_SHARD.match(name)) or bool(_FRAGMENT.match(name))
                or (name.startswith(".") and name.endswith(".tmp")))

    def _clean(self) -> None:
        """Remove what a killed writer left behind: temporary files and shards not in the manifest."""
        listed = {s["file"] for s in self.shards.values()}
        for n in os.listdir(self.path):
            if (n.startswith(".") and n.endswith(".tmp")) or (_SHARD.match(n) and n not in listed):
                os.remove(os.path.join(self.path, n))

    # state
    @property
    def complete(self) -> bool:
        return len(self.shards) == self.num_shards

    def shard_of(self, i: int) -> int:
        return i // self.pps

    def owns(self, i: int) -> bool:
        """Whether prompt i is this rank's to collect (its shard number mod the number of ranks)."""
        return self.shard_of(i) % self.world == self.rank

    def done(self, i: int) -> bool:
        """Whether prompt i is already stored (its shard is written)."""
        return self.shard_of(i) in self.shards

    def manifest(self) -> dict:
        return {**self.head, "complete": self.complete, "shards": [self.shards[k] for k in sorted(self.shards)]}

    def _write_manifest(self) -> None:
        if self.rank == 0:
            write_bytes(os.path.join(self.path, MANIFEST), _json_bytes(self.manifest()))
        else:
            mine = [self.shards[k] for k in sorted(self.shards) if k % self.world == self.rank]
            write_bytes(os.path.join(self.path, f"manifest.rank-{self.rank:03d}.json"), _json_bytes({"shards": mine}))

    # writing
    def add(self, i: int, rows: dict, pooled: dict) -> None:
        """Prompt i's activations. rows: {position: (x [n, d], step [n], token [n])}; pooled: {position:
        (x [m, d], step [m])}. Every position must be present (n may be 0)."""
        if self.closed:
            raise StoreError("the store writer is closed")
        if not 0 <= i < len(self.prompts):
            raise StoreError(f"prompt index {i} out of range (0..{len(self.prompts) - 1})")
        k = self.shard_of(i)
        if k in self.shards or i in self._buf.get(k, {}):
            raise StoreError(f"prompt #{i} ({self.prompts[i].id}) is already stored")
        rows, pooled = {str(a): b for a, b in rows.items()}, {str(a): b for a, b in pooled.items()}
        if set(rows) != set(self.names) or set(pooled) != set(self.names):
            raise StoreError(f"prompt #{i}: activations for {sorted(set(rows) | set(pooled))}, the store holds "
                             f"{self.names}")
        entry = {}
        for n in self.names:
            x, step, token = rows[n]
            px, pstep = pooled[n]
            d = self.head["widths"][n]
            if x.ndim != 2 or x.shape[1] != d or px.ndim != 2 or px.shape[1] != d:
                raise StoreError(f"prompt #{i}, position {n}: activations of shape {tuple(x.shape)} / pooled "
                                 f"{tuple(px.shape)}, the store's width is {d}")
            if not (len(x) == len(step) == len(token)) or len(px) != len(pstep):
                raise StoreError(f"prompt #{i}, position {n}: row, step and token counts differ")
            xs = x.detach().to("cpu", self.dtype)
            pf = px.detach().to("cpu", torch.float32)
            if not bool(torch.isfinite(pf).all()) or not bool(torch.isfinite(x).all()):
                raise StoreError(f"prompt #{i} ({self.prompts[i].id}), position {n}: the activations contain NaN "
                                 "or infinity (the model produced them; check its dtype and weights)")
            if not bool(torch.isfinite(xs).all()):
                raise StoreError(f"prompt #{i} ({self.prompts[i].id}), position {n}: activations overflow "
                                 f"{self.head['dtype']} (largest |x| = {float(x.abs().max()):.3g}); "
                                 "collect with dtype bfloat16")
            entry[n] = (xs, torch.as_tensor(step).to(torch.int32).cpu(), torch.as_tensor(token).to(torch.int32).cpu(),
                        pf, torch.as_tensor(pstep).to(torch.int32).cpu())
        buf = self._buf.setdefault(k, {})
        buf[i] = entry
        lo, hi = k * self.pps, min((k + 1) * self.pps, len(self.prompts))
        if len(buf) == hi - lo:
            self._flush(k)

    def _flush(self, k: int) -> None:
        buf = self._buf.pop(k)
        lo, hi = k * self.pps, min((k + 1) * self.pps, len(self.prompts))
        tensors, counts = {}, {}
        for n in self.names:
            parts = [buf[i][n] for i in range(lo, hi)]
            x = torch.cat([q[0] for q in parts])
            tensors[n] = x
            tensors[f"{n}.prompt"] = torch.cat([torch.full((len(q[0]),), i, dtype=torch.int32)
                                                for i, q in zip(range(lo, hi), parts)])
            tensors[f"{n}.step"] = torch.cat([q[1] for q in parts])
            tensors[f"{n}.token"] = torch.cat([q[2] for q in parts])
            tensors[f"{n}.pooled"] = torch.cat([q[3] for q in parts])
            tensors[f"{n}.pooled_prompt"] = torch.cat([torch.full((len(q[3]),), i, dtype=torch.int32)
                                                       for i, q in zip(range(lo, hi), parts)])
            tensors[f"{n}.pooled_step"] = torch.cat([q[4] for q in parts])
            counts[n] = len(x)
            for i in range(lo, hi):
                buf[i][n] = None  # the per-prompt pieces of this position are no longer needed
            del parts
        name = shard_name(k)
        path = os.path.join(self.path, name)
        with replacing(path) as tmp:
            digest, size = _write_safetensors(tmp, tensors, {"safedig_activations": f"format {FORMAT}, shard {k}, "
                                                                                   f"prompts {lo}:{hi}"})
            del tensors, buf
        self.shards[k] = {"file": name, "sha256": digest, "bytes": size, "prompts": [lo, hi], "rows": counts}
        self._write_manifest()

    def close(self) -> None:
        """Write the final manifest. Prompts of a shard that is not full are dropped (a rerun recollects them)."""
        if self.closed:
            return
        self._buf.clear()
        self._write_manifest()
        if self.world > 1:  # rank 0 merges every rank's list into manifest.json; then all see the whole store
            self._barrier()
            if self.rank == 0:
                self._resume(_load_manifest(self.path))
            self._barrier()
            if self.rank != 0:
                self._resume(_load_manifest(self.path))
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
