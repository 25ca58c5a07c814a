"""`safedig convert`: another library's sparse autoencoder(s) → a SafeDIG dictionary file.

The readers in `importers/` give SAEs that encode exactly as in their source; this module maps them onto
positions of a model family, marks harmful latents the user names, and writes the file (format v1) with
gate_scale 1 (the steering threshold then counts raw harmful mass) and provenance saying where it came from.
"""
from __future__ import annotations

import os

import torch

from . import dictionary
from .dictionary import DictionaryEntry, SafetyDictionary
from .importers import dictionary_learning, openai, saelens, sparsify
from .importers.common import ConvertError, Imported
from .positions import Position, PositionError, parse

READERS = {"saelens": saelens.read, "sparsify": sparsify.read, "dictionary_learning": dictionary_learning.read,
           "openai": openai.read}
LIBRARIES = {"saelens": "sae_lens", "sparsify": "eai-sparsify (EleutherAI)",
             "dictionary_learning": "dictionary_learning (saprmarks)", "openai": "sparse_autoencoder (OpenAI)"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def assign(imported: list[Imported], specs: list[str], family: str, src: str) -> list[tuple[Position, Imported]]:
    """`--position NAME` (one per SAE, in the source's natural hookpoint order) or `--position HOOK=NAME`
    (any subset, by the source's hookpoint names)."""
    named = ["=" in s for s in specs]
    hooks = [imp.hookpoint for imp in imported]
    if any(named) and not all(named):
        raise ConvertError("give every --position as NAME, or every one as HOOK=NAME, not a mix")
    if all(named):
        by_hook = {imp.hookpoint: imp for imp in imported}
        pairs = []
        for s in specs:
            hook, name = s.rsplit("=", 1)
            if hook not in by_hook:
                raise ConvertError(f"{src}: no SAE at hookpoint {hook!r} (it has: {', '.join(hooks)})")
            pairs.append((name, by_hook[hook]))
    else:
        if len(specs) != len(imported):
            raise ConvertError(f"{src} holds {len(imported)} SAE(s) ({', '.join(hooks)}) but {len(specs)} --position "
                               f"{'was' if len(specs) == 1 else 'were'} given: give one per SAE in this order, or "
                               "pick them with --position HOOK=NAME")
        pairs = list(zip(specs, imported))
    out, seen = [], set()
    for name, imp in pairs:
        p = parse(name)
        if p.family != family:
            raise PositionError(f"position {p} is not a {family.upper()} position (FLUX: double.<i>.img|txt, "
                                "single.<j>.img|txt; SD3: joint.<i>.img|txt)")
        if p in seen:
            raise ConvertError(f"position {p} is given twice")
        seen.add(p)
        out.append((p, imp))
    return out


def parse_harmful(specs: list[str], chosen: list[tuple[Position, Imported]]) -> dict[Position, list[int]]:
    """`--harmful 12,873` (with one position) or `--harmful NAME:12,873` (repeatable)."""
    latents = {p: imp.latents for p, imp in chosen}
    out: dict[Position, list[int]] = {p: [] for p in latents}
    for spec in specs:
        if ":" in spec:
            name, spec_ids = spec.split(":", 1)
            p = parse(name)
            if p not in latents:
                raise ConvertError(f"--harmful names position {p}, which is not converted "
                                   f"(positions: {', '.join(map(str, latents))})")
        elif len(latents) == 1:
            (p,), spec_ids = latents, spec
        else:
            raise ConvertError(f"--harmful {spec!r}: with several positions say which, e.g. --harmful {chosen[0][0]}:{spec}")
        for part in spec_ids.split(","):
            if not part.strip():
                continue
            try:
                j = int(part)
            except ValueError:
                raise ConvertError(f"--harmful: {part.strip()!r} is not a latent index (expected e.g. 12,873,4051)") from None
            if not 0 <= j < latents[p]:
                raise ConvertError(f"--harmful: latent {j} is out of range for position {p}, whose SAE has "
                                   f"{latents[p]} latents (0..{latents[p] - 1})")
            if j not in out[p]:
                out[p].append(j)
    return out


def convert(fmt: str, src: str, family: str, positions: list[str], out: str, harmful: list[str] = (),
            k: int | None = None, dtype: torch.dtype = torch.float32) -> SafetyDictionary:
    if fmt not in READERS:
        raise ConvertError(f"unknown format {fmt!r} (use one of {', '.join(READERS)})")
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: no such file or folder")
    if k is not None and k < 1:
        raise ConvertError(f"--k {k} must be ≥ 1")
    chosen = assign(READERS[fmt](src, k), positions, family, src)
    marked = parse_harmful(list(harmful), chosen)
    entries = {p: DictionaryEntry(p, imp.sae(), marked[p], [1.0] * len(marked[p])) for p, imp in chosen}
    hooks = ", ".join(f"{p}={imp.hookpoint}" for p, imp in chosen) if len(chosen) > 1 else chosen[0][1].hookpoint
    forms = ", ".join(dict.fromkeys(imp.form for _, imp in chosen))
    provenance = {"made_by": "safedig convert", "source_library": LIBRARIES[fmt],
                  "source": os.path.basename(os.path.normpath(src)), "format": forms, "hookpoint": hooks}
    d = SafetyDictionary(family, entries, {}, provenance)
    dictionary.save(d, out, dtype)
    return d


def _run(args) -> None:
    convert(args.format, args.src, args.family, args.position, args.out, args.harmful, args.k, DTYPES[args.dtype])
    print(dictionary.summary(dictionary.load(args.out), args.out))
    print(f"wrote {args.out}")


def add_cli(sub) -> None:
    """Register `safedig convert` on the CLI's subparsers."""
    p = sub.add_parser(
        "convert", help="turn an SAE from SAE-Lens, sparsify, dictionary_learning or OpenAI into a SafeDIG dictionary",
        description="Convert sparse autoencoders trained with another library into a SafeDIG safety dictionary "
                    "file. The converted SAEs encode exactly as in their source (per-token input normalisation "
                    "included); anything that cannot be represented exactly is refused with a one-line reason. "
                    ".pt files are read with weights_only=True: nothing in them is ever run.",
        epilog="sources: saelens = a folder with cfg.json + sae_weights.safetensors (or a folder of such folders); "
               "sparsify = a hookpoint folder with cfg.json + sae.safetensors (or the folder of hookpoints); "
               "dictionary_learning = ae.pt (its config.json beside it tells AutoEncoderTopK from BatchTopKSAE); "
               "openai = a state-dict .pt. "
               "Positions: with several SAEs in SRC, either give one --position NAME per SAE (in natural "
               "hookpoint order: layers.2 before layers.10) or pick them with --position HOOK=NAME. "
               "Example: safedig convert --format sparsify sae-dir --family flux --position layers.7=double.7.img "
               "--position layers.20=single.1.img --harmful double.7.img:12,873 --out models/sae/converted.safetensors")
    p.add_argument("--format", required=True, choices=list(READERS), help="the library SRC was saved by")
    p.add_argument("src", metavar="SRC", help="the source file or folder")
    p.add_argument("--family", required=True, choices=("flux", "sd3"), help="the model family the SAEs were trained on")
    p.add_argument("--position", action="append", required=True, metavar="[HOOK=]NAME",
                   help="SafeDIG position the SAE reads, e.g. double.7.img; repeat for several SAEs")
    p.add_argument("--out", required=True, metavar="FILE", help="the dictionary file to write (.safetensors)")
    p.add_argument("--harmful", action="append", default=[], metavar="[NAME:]LATENTS",
                   help="harmful latent indices, e.g. 12,873,4051 (one position) or double.7.img:12,873 (repeatable); "
                        "none given: a dictionary that steers nothing until latents are selected "
                        "(SafeDIG Select Features node)")
    p.add_argument("--k", type=int, default=None, metavar="K",
                   help="per-token TopK with this k: needed for a dictionary_learning TopK file without its "
                        "config.json; for other TopK SAEs it replaces the source's k")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="tensor precision in the file")
    p.set_defaults(run=_run)
