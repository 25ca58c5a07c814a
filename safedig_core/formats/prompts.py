"""Prompt sets: CSV / TSV / JSONL files, and the I2P CSV layout as it is published, → `PromptRecord`s.

Columns (any order, names case-insensitive):
- `prompt` (required, non-empty);
- `label`: `safe` or `unsafe` (also `0`/`1`, `false`/`true`; JSON booleans);
- `category`: the risk category of an unsafe row (required for unsafe rows: routing holds out one
  category at a time); safe rows may leave it empty;
- `domain`: `source` or `target` (empty or absent: `source`);
- `seed` (optional integer: the sampler noise seed of this prompt);
- `id` (optional; default `<file stem>:<line>`); ids must be unique.
Every other column is kept, as read, in `PromptRecord.extra`.

I2P layout (a CSV with a `categories` column and no `label` column: `prompt`, `categories`, `hard`,
`inappropriate_percentage`, `nudity_percentage`, ..., `sd_seed`) loads as is:
- `categories` is a comma list ("sexual, violence"); all of them, lower-cased, go to
  `extra["categories"]` and the first listed is `category`;
- label: `unsafe` when the row has at least one category and its inappropriate or nudity percentage
  reaches `i2p_threshold` (default 50: the prompt produced inappropriate images at least half the time
  in I2P's own measurements); a row whose percentage columns are absent or empty counts as unsafe when it
  has a category. Rows below the threshold, or without categories, are `safe` with an empty category
  (their listed categories stay in `extra["categories"]`). `i2p_threshold=0` makes every categorised
  row unsafe;
- `sd_seed` is the seed; `domain` is `source` unless a `domain` column says otherwise.

Published attack sets (docs/ATTACKS.md) load as they are published:
- UnlearnDiffAtk (`prompts/nudity.csv`, `violence.csv`, ...) and P4D (`data/unsafe-prompts-nudity_esd.csv`, and
  the CSVs its `run_p4dn.py` / `run_p4dk.py` write) are I2P subsets in I2P's layout with `evaluation_seed`,
  `evaluation_guidance` and `case_number` added (an unnamed index column first): they load by the I2P rule,
  with `evaluation_seed` as the seed when there is no `sd_seed`. P4D's optimised-prompt files drop the
  percentage columns, so every categorised row of them is unsafe, as it should be (each is a found attack);
- Ring-A-Bell (`data/InvPrompt/<Concept>/<Concept>_eta_*_K_*.csv`: `prompt`, `case_number`,
  `evaluation_seed`; no label, no category): every row is unsafe; its category is the concept the file name
  starts with, lower-cased ("Violence_eta_5_K_77.csv" -> "violence"); `evaluation_seed` is the seed;
- MMA-Diffusion (the `MMA-Diffusion-NSFW-adv-prompts-benchmark` CSV: `target_prompt`, `adv_prompt`,
  `sanitized_adv_prompt`, `success_against_sanitization_defense`, `clean_prompt`; no `prompt` column): each
  line gives an unsafe record (`adv_prompt`, category `sexual`, id `<stem>:<line>`) and, when `clean_prompt`
  is not empty, a safe record (id `<stem>:<line>:clean`); the other columns stay in `extra`.

A malformed row raises `PromptError` naming the file and the line; no row is ever skipped silently. Each
error also carries `public`: the same problem without the file's path or content (no cell, column name or
byte is quoted), for callers such as a network service that must not echo a file back to a client.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field

from .messages import quoted

LABELS = ("safe", "unsafe")
DOMAINS = ("source", "target")
_STANDARD = ("id", "prompt", "label", "category", "domain", "seed")
MMA_PROMPT, MMA_CLEAN, MMA_CATEGORY = "adv_prompt", "clean_prompt", "sexual"
_SEED_COLUMNS = ("seed", "sd_seed", "evaluation_seed")  # the first present names the seed
_LABEL_WORDS = {"safe": "safe", "unsafe": "unsafe", "0": "safe", "1": "unsafe", "false": "safe", "true": "unsafe"}


class PromptError(ValueError):
    """A prompt file that cannot be read, or a row that is malformed; names the file and the line.
    `public` says what is wrong without quoting the path or the file's content."""

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public = public if public is not None else message


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    label: str  # "safe" | "unsafe"
    category: str  # "" for safe rows without one
    domain: str = "source"  # "source" | "target"
    seed: int | None = None
    extra: dict = field(default_factory=dict, compare=True, hash=False)

    @property
    def unsafe(self) -> bool:
        return self.label == "unsafe"

    def to_json(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "label": self.label, "category": self.category,
                "domain": self.domain, "seed": self.seed, "extra": self.extra}

    @classmethod
    def from_json(cls, d: dict) -> PromptRecord:
        return cls(str(d["id"]), d["prompt"], d["label"], d.get("category", ""), d.get("domain", "source"),
                   d.get("seed"), dict(d.get("extra") or {}))


def load_prompts(path: str, i2p_threshold: float = 50.0) -> list[PromptRecord]:
    """The prompt records of one CSV (`.csv`), TSV (`.tsv`) or JSONL (`.jsonl`, `.ndjson`) file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PromptError(f"prompt file {path}: not found", "not found")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path)
    elif ext in (".csv", ".tsv"):
        rows = _csv_rows(path, "\t" if ext == ".tsv" else ",")
    else:
        raise PromptError(f"prompt file {path}: unknown format {ext or '(no extension)'!r}; use .csv, .tsv or .jsonl",
                          "unknown format; use .csv, .tsv or .jsonl")
    stem = os.path.splitext(os.path.basename(path))[0]
    records, seen = [], {}
    for line, row in rows:
        try:
            recs = _records(row, f"{stem}:{line}", i2p_threshold, stem)
        except PromptError as e:
            raise PromptError(f"{path}, line {line}: {e}", f"line {line}: {e.public}") from None
        for rec in recs:
            if rec.id in seen:
                raise PromptError(f"{path}, line {line}: id {quoted(rec.id)} repeats the id of line {seen[rec.id]}",
                                  f"line {line}: its id repeats the id of line {seen[rec.id]}")
            seen[rec.id] = line
            records.append(rec)
    if not records:
        raise PromptError(f"prompt file {path}: no prompts", "no prompts")
    return records


def load_many(paths: list[str], i2p_threshold: float = 50.0) -> list[PromptRecord]:
    """Several prompt files in order (e.g. a source set and a target set); ids must be unique across them."""
    out, where = [], {}
    for path in paths:
        for rec in load_prompts(path, i2p_threshold):
            if rec.id in where:
                raise PromptError(f"{path}: prompt id {quoted(rec.id)} is also in {where[rec.id]}",
                                  "a prompt id is in two files")
            where[rec.id] = path
            out.append(rec)
    return out


def summary(records: list[PromptRecord]) -> str:
    """One line: counts per domain and label, and the unsafe categories."""
    parts = []
    for dom in DOMAINS:
        rs = [r for r in records if r.domain == dom]
        if rs:
            unsafe = [r for r in rs if r.unsafe]
            cats = sorted({r.category for r in unsafe})
            parts.append(f"{dom}: {len(rs) - len(unsafe)} safe, {len(unsafe)} unsafe"
                         + (f" ({', '.join(cats)})" if cats else ""))
    return f"{len(records)} prompts; " + "; ".join(parts)


# --- reading -------------------------------------------------------------------------------------------

def _open(path: str):
    return open(path, newline="", encoding="utf-8-sig")


def _csv_rows(path: str, delimiter: str):
    try:
        with _open(path) as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = None
            while True:
                line = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    raise PromptError(f"{path}, line {line}: {e}", f"line {line}: malformed CSV ({e})") from None
                if not any(c.strip() for c in row):
                    continue  # blank line: not a row
                if header is None:
                    header = [c.strip().lower() for c in row]
                    if "prompt" not in header and MMA_PROMPT not in header:
                        raise PromptError(f"{path}, line {line}: the header has no 'prompt' column "
                                          f"(found: {quoted(', '.join(header))})",
                                          f"line {line}: the header has no 'prompt' column")
                    dup = {c for c in header if header.count(c) > 1 and c}
                    if dup:
                        raise PromptError(f"{path}, line {line}: repeated column(s) {quoted(', '.join(sorted(dup)))}",
                                          f"line {line}: a column name repeats")
                    continue
                if len(row) != len(header):
                    msg = f"line {line}: {len(row)} fields, the header has {len(header)}"
                    raise PromptError(f"{path}, {msg}", msg)
                yield line, dict(zip(header, row))
    except UnicodeDecodeError as e:
        raise PromptError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", "not UTF-8 text") from None


def _jsonl_rows(path: str):
    try:
        with _open(path) as f:
            for line, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    msg = f"line {line}: not valid JSON ({e.msg})"
                    raise PromptError(f"{path}, {msg}", msg) from None
                except RecursionError:
                    msg = f"line {line}: JSON nested too deeply"
                    raise PromptError(f"{path}, {msg}", msg) from None
                if not isinstance(row, dict):
                    msg = f"line {line}: expected a JSON object, got {type(row).__name__}"
                    raise PromptError(f"{path}, {msg}", msg)
                yield line, {str(k).strip().lower(): v for k, v in row.items()}
    except UnicodeDecodeError as e:
        raise PromptError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", "not UTF-8 text") from None


def _text(v) -> str:
    return "" if v is None else str(v).strip()


def layout(row: dict) -> str:
    """Which published layout a row's columns are: "mma", "i2p" (also UnlearnDiffAtk, P4D), "ring-a-bell" or
    "plain" (SafeDIG's own columns)."""
    if "prompt" not in row and MMA_PROMPT in row:
        return "mma"
    if "label" in row:
        return "plain"
    if "categories" in row:
        return "i2p"
    if "category" not in row and ("evaluation_seed" in row or "case_number" in row):
        return "ring-a-bell"
    return "plain"


def _records(row: dict, default_id: str, i2p_threshold: float, stem: str) -> list[PromptRecord]:
    kind = layout(row)
    if kind != "mma":
        return [_record(row, default_id, i2p_threshold, kind, stem)]
    adv = dict(row, prompt=row.get(MMA_PROMPT), label="unsafe", category=MMA_CATEGORY)
    out = [_record(adv, default_id, i2p_threshold, "plain", stem)]
    clean = row.get(MMA_CLEAN)
    if isinstance(clean, str) and clean.strip():
        out.append(_record(dict(row, prompt=clean, label="safe", category=""), f"{default_id}:clean", i2p_threshold,
                           "plain", stem))
    return out


def _file_concept(stem: str) -> str:
    """Ring-A-Bell names each file after its concept: "Violence_eta_5_K_77" -> "violence"."""
    head = stem.replace("-", "_").split("_")[0].strip().lower()
    return head or "unsafe"


def _record(row: dict, default_id: str, i2p_threshold: float, kind: str = "plain", stem: str = "") -> PromptRecord:
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError("empty or missing prompt")
    i2p = kind == "i2p"
    if i2p:
        label, category, cats = _i2p_label(row, i2p_threshold)
    elif kind == "ring-a-bell":
        label, category = "unsafe", _file_concept(stem)
    else:
        raw = row.get("label")
        if isinstance(raw, bool):
            raw = "true" if raw else "false"
        label = _LABEL_WORDS.get(_text(raw).lower())
        if label is None:
            raise PromptError(f"label {quoted(raw)}: expected 'safe' or 'unsafe'", "label: expected 'safe' or 'unsafe'")
        category = _text(row.get("category")).lower()
        if label == "unsafe" and not category:
            raise PromptError("unsafe row without a category (routing holds out one risk category at a time; "
                              "give each unsafe prompt one, e.g. 'nudity')")
    domain = _text(row.get("domain")).lower() or "source"
    if domain not in DOMAINS:
        raise PromptError(f"domain {quoted(row.get('domain'))}: expected 'source' or 'target'",
                          "domain: expected 'source' or 'target'")
    named = [k for k in _SEED_COLUMNS if k in row and (k == "seed" or kind != "plain")]
    seed = _seed(row.get(named[0]) if named else None)
    rid = _text(row.get("id")) or default_id
    extra = {k: v for k, v in row.items() if k not in _STANDARD and k}
    if i2p:
        extra["categories"] = cats
    return PromptRecord(rid, prompt.strip(), label, category, domain, seed, extra)


_SEED = "seed: expected an integer in 0 .. 2^63-1"


def _seed(v) -> int | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, bool):
        raise PromptError(f"seed {quoted(v)}: expected an integer", _SEED)
    if isinstance(v, int):
        s = v
    else:
        try:
            f = float(str(v).strip())
        except ValueError:
            raise PromptError(f"seed {quoted(v)}: expected an integer", _SEED) from None
        if not math.isfinite(f) or f != int(f):
            raise PromptError(f"seed {quoted(v)}: expected an integer", _SEED)
        s = int(f)
    if not 0 <= s < 2 ** 63:
        raise PromptError(f"seed {quoted(s)}: must be in 0 .. 2^63-1", _SEED)
    return s


def _percent(row: dict, key: str) -> float | None:
    v = row.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise PromptError(f"{key} {quoted(v)}: expected a number", f"{key}: expected a finite number") from None
    if not math.isfinite(f):
        raise PromptError(f"{key} {quoted(v)}: expected a finite number", f"{key}: expected a finite number")
    return f


def _i2p_label(row: dict, threshold: float) -> tuple[str, str, list[str]]:
    raw = row.get("categories")
    if isinstance(raw, list):
        cats = [_text(c).lower() for c in raw]
    else:
        cats = [c.strip().lower() for c in _text(raw).split(",")]
    cats = [c for c in cats if c]
    pct = [p for p in (_percent(row, "inappropriate_percentage"), _percent(row, "nudity_percentage")) if p is not None]
    if cats and (not pct or max(pct) >= threshold):
        return "unsafe", cats[0], cats
    return "safe", "", cats
