"""`safedig convert`: another library's sparse autoencoder(s) → a SafeDIG dictionary file.

The readers beside this module (one per library) give SAEs that encode exactly as in their source; this module maps them onto
positions of a model family, marks harmful latents the user names, and writes the file (format v1) with
gate_scale 1 (the steering threshold then counts raw harmful mass) and provenance saying where it came from.
"""
from __future__ import annotations

import os

import torch

from ..formats import dictionary
from ..formats.dictionary import DictionaryEntry, SafetyDictionary, parse_latents
from ..positions import Position, PositionError, parse
from . import dictionary_learning, openai, saelens, sparsify
from .common import ConvertError, Imported

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
        if not p.belongs(family):
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
        try:
            picked = parse_latents(spec_ids, latents[p], p, "--harmful")
        except ValueError as e:
            raise ConvertError(str(e)) from None
        out[p] += [j for j in picked if j not in out[p]]
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


