"""`safedig demo`: the whole SafeDIG pipeline measured on the testbed over several seeds, on a 2-core CPU.

Per seed (a fresh prompt draw, DiT noise and SAE training): build prompts (source risks + a small target
adaptation set) → collect activations of the testbed DiT through ComfyUI (`adapters.comfy.runner.ComfyRunner`,
the same path as `safedig collect` on FLUX) → route → train → adapt (`build.build`, as `safedig build`) →
the ablations' dictionaries (`variants`) → every variant swept over its knob through the same block patches
as the Apply Steering node (`sweep`), judged on a calibration subset of the building prompts and on the
evaluation prompts → each variant's operating point chosen on the building prompts only (`sweep.choose`).
The evaluation prompts and seeds are disjoint from the building ones and nothing is tuned on them.

Then SafeDIG at that point on two-object scenes (`pairs`: is the risky object gone, the safe one kept?).

Writes `report.json` (`report.aggregate`: means over seeds, intervals, curves, claims, the goal; `pairs`),
`curves.png`, and for the first seed `grid.png`, `pairs.png`, `routing.png`, `features.png`, `feature_map.png`; prints
the table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np
import torch

from ..adapters.comfy import runtime as comfyui
from ..adapters.comfy.patches import SharedSteerers
from ..adapters.comfy.runner import ComfyRunner
from ..evaluation import plots
from ..formats.atomic import write_text
from ..formats.dictionary import load
from ..formats.prompts import PromptRecord
from ..formats.store import ActivationStore
from ..pipeline.adapt import AdaptConfig
from ..pipeline.build import BuildConfig, build
from ..pipeline.collect import collect
from ..pipeline.metrics import splice, spliced_error
from ..pipeline.train import TrainConfig
from ..steering import SteeringConfig
from . import kernels, pictures, sweep, world
from . import pairs as pairs_mod
from . import report as report_mod
from . import variants as variants_mod
from .model import generate, load_testbed
from .seeds import DEFAULT_SEED, DEVELOPMENT_SEEDS

SIZES = {  # "full" is the default run: three seeds in about ten minutes on two cores
    "full": {"sets": {"build_safe": 40, "build_source_per_category": 20, "build_target_per_category": 6,
                      "build_target_safe": 6, "eval_safe": 32, "eval_per_category": 8,
                      "eval_target_per_category": 6},
             "calibration": {"safe": 24, "source_per_concept": 3, "target_per_concept": 2},
             "seeds": 3, "steps": 10, "train_steps": 400, "adapt_steps": 150, "batch": 512, "budget": 16,
             "grid": (2.0, 1.5, 1.25, 1.0, 0.75), "dense_grid": (0.5, 1.0), "strength_grid": (0.5, 2.0),
             "pairs_per_category": 8},
    "quick": {"sets": {"build_safe": 24, "build_source_per_category": 10, "build_target_per_category": 4,
                       "build_target_safe": 4, "eval_safe": 12, "eval_per_category": 4,
                       "eval_target_per_category": 4},
              "calibration": {"safe": 12, "source_per_concept": 2, "target_per_concept": 1},
              "seeds": 1, "steps": 10, "train_steps": 300, "adapt_steps": 100, "batch": 512, "budget": 16,
              "grid": (1.5, 1.25, 1.0, 0.75), "dense_grid": (0.5, 1.0), "strength_grid": (),
              "pairs_per_category": 3},
}
# the default (`--no-pooled` turns it off): the pooled text vector is collected too; SafeDIG steers at the text
# positions and there, where the pooled vector of a flagged prompt becomes the nearest safe building prompt's
# (docs/METHOD_NOTES.md)
POOLED = {"pooled": True, "act": "txt"}
# `--pair-scenes` (measured, not the default: docs/METHOD_NOTES.md): the dictionary is also built from two-object
# building scenes (`world.building_pairs`) and SafeDIG steers with `focus`
PAIR_SCENES = {"full": {"build_pairs": {"safe": 16, "per_category": 6}, "focus": 0.5},
               "quick": {"build_pairs": {"safe": 8, "per_category": 4}, "focus": 0.5}}
CFG_SCALE = 3.0
RECORD_STEPS = "0,0.25,0.5,0.75"
STEER = SteeringConfig(blend=1.0, repel=1.0, threshold=1.0, gate="image")  # SafeDIG: per-image gate, see variants
MAX_FIDELITY_DROP = report_mod.MAX_FIDELITY_DROP
BUILD_MARGIN = 0.0  # ungated (dense) steering: the building prompts' fidelity may not drop at all
PEAK_MARGIN = sweep.PEAK_MARGIN  # gated steering: τ 10 % above the largest safe building peak (`sweep.peak_rule`)


def _records(rows: list[dict]) -> list[PromptRecord]:
    return [PromptRecord(f"{r['split']}-{i}", r["prompt"], r["label"], r["category"], r["domain"], r["seed"],
                         {"concept": r["concept"]}) for i, r in enumerate(rows)]


def block_positions(model, pooled: bool = False) -> list:
    """Every block position of the testbed DiT (its text input, `input.txt`, is left out: detecting there was
    measured and lost to `double.0.txt`, docs/METHOD_NOTES.md), and with `pooled` its pooled text vector
    `input.pooled`, which `build` adds to the routed positions."""
    return [p for p in comfyui.layout_of(model).positions() if p.kind != "input" and (pooled or p.kind != "pooled")]


def steering(size: dict) -> SteeringConfig:
    """SafeDIG's steering at a demo size (`focus` under `--pair-scenes`)."""
    return STEER.with_(focus=size.get("focus", 0.0))


def building_rows(seed: int, size: dict, singles: list[dict] | None = None) -> list[dict]:
    """What the dictionary is built from: the one-object building prompts (`singles`, drawn when not given) and
    the two-object building scenes (`world.building_pairs`, none unless `--pair-scenes`); the operating point is
    chosen on one-object prompts only (`calibration_rows`)."""
    if singles is None:
        singles = world.prompt_sets(seed, **size["sets"])["build"]
    return singles + world.building_pairs(seed, **size.get("build_pairs", {}))


def calibration_rows(build_rows: list[dict], safe: int, source_per_concept: int, target_per_concept: int) -> list:
    """The building prompts the operating point is chosen on: safe source prompts and a few risk prompts of
    each concept and domain (the first ones of the draw, which is already shuffled)."""
    out, seen = [], {}
    for r in build_rows:
        if r["label"] == "safe":
            key, cap = ("safe", r["domain"]), (safe if r["domain"] == "source" else 0)
        else:
            key = (r["concept"], r["domain"])
            cap = source_per_concept if r["domain"] == "source" else target_per_concept
        if seen.get(key, 0) < cap:
            seen[key] = seen.get(key, 0) + 1
            out.append(r)
    return out


class _Splice:
    """Stands in for a steerer: every token of the position becomes the SAE's reconstruction."""

    def __init__(self, sae):
        self.replace = splice(sae)

    def to(self, device=None, dtype=None):
        return self

    def steer(self, x, cfg, rows=None):
        return self.replace(x)


def _spliced(model, encode_fn, dict_path, rows, gen, base=None) -> dict:
    """Per position, how much the generated images move when the reconstruction replaces the activation
    (METHOD §4's spliced error, measured on building prompts)."""
    prompts, seeds = [r["prompt"] for r in rows], [r["seed"] for r in rows]
    clean = generate(model, encode_fn, prompts, seeds, **gen) if base is None else base
    out = {}
    for p, e in load(dict_path).entries.items():
        m = comfyui.steer_model(model, SharedSteerers({p: _Splice(e.sae)}), [p], SteeringConfig(repel=1.0))
        spliced = generate(m, encode_fn, prompts, seeds, **gen)
        # images centred on mid-grey, so the norm measures content, not brightness
        out[p.name] = round(spliced_error(lambda pair: pair, zip(clean - 0.5, spliced - 0.5))["rel_change"], 5)
    return out


def run_seed(seed: int, size: dict, out_dir: str, pictures_dir: str | None, log=print, threads: int | None = None) -> dict:
    """Everything measured on one seed: per-prompt outcomes of every variant at every point, its operating
    point, and the seed's dictionary facts. Pictures go to `pictures_dir` (None: none)."""
    t0, timings = time.time(), {}

    def lap(name):
        timings[name] = round(time.time() - t0 - sum(timings.values()), 1)

    torch.manual_seed(seed)
    work = os.path.join(out_dir, "work")
    sets = world.prompt_sets(seed, **size["sets"])
    cal_rows = calibration_rows(sets["build"], **size["calibration"])
    build_rows, eval_rows = building_rows(seed, size, sets["build"]), sets["eval"]
    model, encode_fn = load_testbed()
    log(f"[demo seed {seed}] {len(build_rows)} building prompts ({len(cal_rows)} to choose the operating point "
        f"on), {len(eval_rows)} evaluation prompts")

    # 1. collect, exactly as `safedig collect` does for FLUX
    runner = ComfyRunner(model, lambda p: encode_fn([p]), cfg=CFG_SCALE, latent_shape=(3, world.SIZE, world.SIZE),
                         name="safedig-testbed")
    res = collect(runner, _records(build_rows), block_positions(model, size.get("pooled", False)),
                  os.path.join(work, "store"), size["steps"],
                  RECORD_STEPS, size["budget"], seed)
    store = ActivationStore(res.path)
    lap("collect")

    # 2. route → train → adapt, exactly as `safedig build`; SAE training on one thread: its long chains of
    # sums are where thread count and kernels change the numbers most
    tcfg = TrainConfig(expansion=8, k=8, steps=size["train_steps"], batch_size=size["batch"], seed=seed,
                       checkpoint_every=max(100, size["train_steps"] // 4))
    acfg = AdaptConfig(steps=size["adapt_steps"], batch_size=size["batch"], seed=seed)
    dict_path = os.path.join(out_dir, "testbed_dictionary.safetensors")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rules = BuildConfig(top_k=3, train=tcfg, adapt=acfg)
        rules = dataclasses.replace(rules, rescore=size.get("rescore", rules.rescore))
        summary = build(store, dict_path, rules, os.path.join(work, "build"), progress=False, overwrite=True)
        lap("build")
        variants = variants_mod.make(store, dict_path, summary, work, tcfg, acfg, steering(size), size["grid"],
                                     size["dense_grid"], size.get("act", "all"))
        lap("ablation dictionaries")
    finally:
        torch.set_num_threads(threads or before)
    routed, best_fixed = summary["positions"], summary["routing"]["best_fixed"]
    log(f"[demo seed {seed}] dictionary at {routed} (fixed layer: {best_fixed}) ({time.time() - t0:.0f}s)")

    # 3. unsteered images once per prompt set (recording every variant's gate peaks), then every curve
    gen = dict(steps=size["steps"], cfg=CFG_SCALE)
    build_set = sweep.prepare(model, encode_fn, "build", cal_rows, variants, gen)
    eval_set = sweep.prepare(model, encode_fn, "eval", eval_rows, variants, gen)
    lap("unsteered")
    result = {"seed": seed, "rows": {"build": cal_rows, "eval": eval_rows},
              "unsteered": {"build": build_set.base_out, "eval": eval_set.base_out}, "variants": {}}
    generated = 0
    for v in variants:
        if v.gated and v.knob == "threshold":  # τ from the safe building peaks, measured beside the grid
            tau = sweep.peak_rule(build_set, v.name, PEAK_MARGIN)
            run_v = dataclasses.replace(v, grid=tuple(sorted(set(v.grid) | {tau}, reverse=True)))
            found = sweep.sweep(model, encode_fn, run_v, [build_set, eval_set], gen)
            operating = next(p for p in found if p["value"] == tau)
            points = [p for p in found if p["value"] in v.grid]
        else:
            found = points = sweep.sweep(model, encode_fn, v, [build_set, eval_set], gen)
            operating = points[sweep.choose(points, build_set, BUILD_MARGIN)]
        generated += sum(p["generated"] for p in found)
        result["variants"][v.name] = {"knob": v.knob, "points": points, "operating": operating}
        log(f"[demo seed {seed}] {v.name}: {v.knob} {operating['value']} chosen on the building prompts; "
            f"eval {sweep.figures(eval_rows, operating['outcomes']['eval'])} ({time.time() - t0:.0f}s)")
    lap("curves")

    # 4. SafeDIG's strength curve at its chosen τ (the chosen point itself is strength 1)
    main = variants[0]
    tau = result["variants"]["steered"]["operating"]["value"]
    if size["strength_grid"]:
        grid = tuple(sorted(set(size["strength_grid"]) - {1.0}))
        sv = sweep.Variant("steered_strength", main.store, main.positions, main.base.with_(threshold=tau), "strength",
                           grid)
        build_set.peaks[sv.name], eval_set.peaks[sv.name] = build_set.peaks[main.name], eval_set.peaks[main.name]
        points = sweep.sweep(model, encode_fn, sv, [build_set, eval_set], gen)
        generated += sum(p["generated"] for p in points)
        at_one = dict(result["variants"]["steered"]["operating"], value=1.0)
        points = sorted(points + [at_one], key=lambda p: p["value"])
        result["strength"] = True
        result["variants"]["steered_strength"] = {"knob": "strength", "points": points, "operating": at_one}
        lap("strength curve")

    # 5. two-object scenes (a safe and a risky object) at that operating point: evaluation only
    pair_rows = world.pair_prompts(seed, size["pairs_per_category"])
    judged, pair_base, pair_steered = pairs_mod.measure(model, encode_fn, pair_rows, main.store, main.positions,
                                                        main.base.with_(threshold=tau), gen)
    result["pairs"] = {"rows": pair_rows, **{arm: {k: v.tolist() for k, v in j.items()} for arm, j in judged.items()}}
    lap("two-object prompts")

    wf = variants_mod.word_filter(build_rows)
    blocked = [wf.blocks(r["prompt"]) for r in eval_rows]
    result["word_filter"] = {"eval": sweep.judge(eval_rows, eval_set.base, None, blocked),
                             "blocked_safe": int(sum(b for b, r in zip(blocked, eval_rows) if r["label"] == "safe"))}

    spliced_rows = cal_rows[::3]
    spliced = _spliced(model, encode_fn, dict_path, spliced_rows, gen, build_set.base[::3])
    lap("spliced error")
    peaks = {}
    if pictures_dir:
        chosen_eval = _images_at(model, encode_fn, main, main.base.with_(threshold=tau), eval_set, gen)
        pictures.grid(eval_rows, eval_set.base, chosen_eval, os.path.join(pictures_dir, "grid.png"))
        pictures.grid(pair_rows, pair_base, pair_steered, os.path.join(pictures_dir, "pairs.png"),
                      groups=pictures.PAIR_GROUPS)
        plots.plot_features(dict_path, os.path.join(pictures_dir, "features.png"))
        peaks = pictures.feature_maps(model, encode_fn, eval_rows, dict_path,
                                      os.path.join(pictures_dir, "feature_map.png"), gen)
        shutil.copyfile(os.path.join(work, "build", "routing.png"), os.path.join(pictures_dir, "routing.png"))
        lap("pictures")
    d = load(dict_path)
    result["info"] = {
        "seed": seed, "routing": {"selected": routed, "best_fixed": best_fixed,
                                  "scores": {s["name"]: {k: s.get(k) for k in ("R", "T", "T_min", "S", "A")}
                                             for s in summary["routing"]["scores"]}},
        "dictionary": {p.name: {k: v for k, v in e.metrics.items() if isinstance(v, (int, float))}
                       | {"harmful": len(e.harmful), "spliced_rel_change": spliced[p.name]}
                       for p, e in d.entries.items()},
        "gate": {"gate": main.base.gate, "detect": main.base.detect},
        "feature_map_peaks": peaks, "gate_peaks": gate_peaks(main.name, {"build": build_set, "eval": eval_set}),
        "images_generated_for_curves": generated,
        "timings_s": timings, "seconds": round(time.time() - t0, 1)}
    return result


SEED_RESULT = "seed_result.json"


def _identity(seed: int, size: dict) -> str:
    return json.dumps({"seed": seed, "size": size, "cfg": CFG_SCALE, "record": RECORD_STEPS, "steer": repr(STEER),
                       "margin": BUILD_MARGIN, "peak_margin": PEAK_MARGIN, "kernels": kernels.describe()},
                      sort_keys=True, default=str)


def _encode(v):
    if isinstance(v, sweep.Outcomes):
        return {"__outcomes__": [v.unsafe.tolist(), v.concept_ok.tolist(), v.change.tolist()]}
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"cannot keep {type(v).__name__}")


def _decode(d: dict):
    if "__outcomes__" in d:
        u, c, ch = d["__outcomes__"]
        return sweep.Outcomes(np.asarray(u, bool), np.asarray(c, bool), np.asarray(ch, float))
    return d


def _keep(seed_dir: str, seed: int, size: dict, result: dict) -> None:
    """A finished seed's measurements, so that an interrupted multi-seed run resumes after its last whole seed."""
    write_text(os.path.join(seed_dir, SEED_RESULT), json.dumps({"identity": _identity(seed, size), "result": result},
                                                               default=_encode))


def _finished(seed_dir: str, seed: int, size: dict) -> dict | None:
    """The kept measurements of this seed made with the same settings (None: none, or other settings)."""
    path = os.path.join(seed_dir, SEED_RESULT)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            kept = json.load(f, object_hook=_decode)
    except (OSError, ValueError, TypeError):  # unreadable or truncated: measure again
        return None
    if not isinstance(kept, dict) or kept.get("identity") != _identity(seed, size):
        return None
    return kept.get("result")


def gate_peaks(name: str, sets: dict) -> dict:
    """Per prompt set and group (safe, unsafe source, unsafe target), the min / 10 % / median / 90 % / max of a
    variant's gate statistic along the unsteered trajectories (τ units): how far apart the gate's unit puts
    safe and risky prompts."""
    out = {}
    for split, pset in sets.items():
        peaks, groups = pset.peaks[name], {}
        for label, domain, key in (("safe", None, "safe"), ("unsafe", "source", "unsafe_source"),
                                   ("unsafe", "target", "unsafe_target")):
            idx = [i for i, r in enumerate(pset.rows) if r["label"] == label and (domain is None or r["domain"] == domain)]
            if idx:
                groups[key] = [round(float(v), 3) for v in np.quantile(peaks[idx], [0, 0.1, 0.5, 0.9, 1])]
        out[split] = groups
    return out


def _images_at(model, encode_fn, variant, cfg, pset, gen) -> torch.Tensor:
    """The steered images of `pset` at `cfg` (for the grid picture), regenerating only those the gate opens on."""
    v = sweep.Variant(variant.name, variant.store, variant.positions, cfg, "threshold", (cfg.threshold,))
    need = (pset.peaks[variant.name] > cfg.threshold).nonzero()[0]
    images = pset.base.clone()
    if len(need):
        m = comfyui.steer_model(model, v.store, v.positions, cfg)
        images[torch.as_tensor(need)] = sweep.generate_rows(m, encode_fn, [pset.rows[i] for i in need], gen)
    return images


def run(out_dir: str = "out/demo", seed: int = DEFAULT_SEED, quick: bool = False, seeds: int | None = None,
        threads: int | None = None, log=print, pair_scenes: bool = False, pooled: bool = True,
        rescore: str | None = None) -> dict:
    """Seeds `seed`, `seed + 1`, … (`seeds` of them; default 3, 1 with `quick`); writes report.json and the
    pictures to `out_dir`, returns the report. `pair_scenes`: build from two-object scenes too and steer with
    focus (`PAIR_SCENES`); `pooled`: steer the pooled text vector too and act at the text positions only (`POOLED`;
    False: every routed position acts, the default before held-out seeds 11-13); `rescore`: `BuildConfig.rescore`
    instead of its default."""
    t0 = time.time()
    size = SIZES["quick" if quick else "full"]
    if pair_scenes:
        size = size | PAIR_SCENES["quick" if quick else "full"]
    if pooled:
        size = size | POOLED
    if rescore is not None:
        size = size | {"rescore": rescore}
    n = seeds or size["seeds"]
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.makedirs(out_dir, exist_ok=True)
    per_seed = []
    for k in range(n):
        s = seed + k
        seed_dir = os.path.join(out_dir, f"seed-{s}")
        done = _finished(seed_dir, s, size)
        if done is not None:
            log(f"[demo seed {s}] measured before with the same settings: {os.path.join(seed_dir, SEED_RESULT)}")
        else:
            done = run_seed(s, size, seed_dir, out_dir if k == 0 else None, log, threads)
            _keep(seed_dir, s, size, done)
        per_seed.append(done)
    names = [name for name in per_seed[0]["variants"] if name != "steered_strength"]
    agg = report_mod.aggregate(per_seed, names)
    res = agg["results"]
    first = per_seed[0]["info"]
    rep = {
        "seeds": [s["seed"] for s in per_seed], "quick": quick,
        "development_seeds": [s for s in DEVELOPMENT_SEEDS],
        "held_out_seeds": [s["seed"] for s in per_seed if s["seed"] not in DEVELOPMENT_SEEDS],
        "unsafe_rate": {"unsteered": res["unsteered"]["unsafe_rate"], "steered": res["steered"]["unsafe_rate"]},
        "safe_fidelity": {"unsteered": res["unsteered"]["safe_fidelity"], "steered": res["steered"]["safe_fidelity"]},
        "safe_change": res["steered"]["safe_change"],
        "ablations": {k: res[k] | {"operating_point": agg["operating_point"].get(k, {}).get("per_seed")}
                      for k in variants_mod.ABLATIONS},
        "intervals": agg["intervals"],
        "operating_point": agg["operating_point"],
        "curves": agg["curves"],
        "best_at_matched_fidelity": agg["best_at_matched_fidelity"],
        "goal": agg["goal"], "claims": agg["claims"],
        "routing": first["routing"] | {"selected_per_seed": [s["info"]["routing"]["selected"] for s in per_seed]},
        "dictionary": first["dictionary"],
        "pairs": pairs_mod.aggregate(per_seed),
        "threshold_calibration": agg["curves"]["steered"]["points"],
        "feature_map_peaks": first["feature_map_peaks"],
        "per_seed": [s["info"] for s in per_seed],
        "prompts": {"build": len(building_rows(seed, size)),
                    "calibration": len(per_seed[0]["rows"]["build"]), "eval": len(per_seed[0]["rows"]["eval"]),
                    "eval_unsafe": {dom: sum(r["label"] == "unsafe" and r["domain"] == dom
                                             for r in per_seed[0]["rows"]["eval"]) for dom in ("source", "target")},
                    "eval_safe": sum(r["label"] == "safe" for r in per_seed[0]["rows"]["eval"])},
        "settings": {"sampler_steps": size["steps"], "cfg": CFG_SCALE, "record_steps": RECORD_STEPS,
                     "token_budget": size["budget"], "train_steps": size["train_steps"],
                     "adapt_steps": size["adapt_steps"], "grid": list(size["grid"]),
                     "dense_grid": list(size["dense_grid"]), "strength_grid": list(size["strength_grid"]),
                     "build_fidelity_margin": BUILD_MARGIN, "max_fidelity_drop": MAX_FIDELITY_DROP,
                     "steering": {"blend": STEER.blend, "repel": STEER.repel, "gate": STEER.gate,
                                  "focus": steering(size).focus, "pair_scenes": pair_scenes,
                                  "pooled": pooled, "act": size.get("act", "all"),
                                  "rescore": size.get("rescore", BuildConfig.rescore),
                                  "detect_per_seed": [s["info"]["gate"]["detect"] for s in per_seed],
                                  "threshold": agg["operating_point"]["steered"]["per_seed"]}},
        "environment": report_mod.environment(threads),
        "seconds": round(time.time() - t0, 1),
    }
    write_text(os.path.join(out_dir, "report.json"), json.dumps(rep, indent=1, default=float))
    plots.plot_curves(rep, os.path.join(out_dir, "curves.png"))
    table = report_mod.markdown(rep) + ("\n\n" + pairs_mod.markdown(rep["pairs"]) if rep["pairs"] else "")
    write_text(os.path.join(out_dir, "table.md"), table + "\n")
    log(report_mod.table(res, agg["intervals"], names))
    if rep["pairs"]:
        g = rep["pairs"]["goal"]
        log(f"two-object prompts: unsafe rate {g['unsafe_rate']['unsteered']:.3f} -> {g['unsafe_rate']['steered']:.3f}, "
            f"safe-object recall {g['safe_recall']['unsteered']:.3f} -> {g['safe_recall']['steered']:.3f} "
            f"(goal {'holds' if g['all_hold'] else 'does not hold'})")
    log(f"routed (first seed): {', '.join(rep['routing']['selected'])}; fixed layer: {rep['routing']['best_fixed']}; "
        f"seeds {rep['seeds']}; {rep['seconds']:.0f} s")
    return rep
