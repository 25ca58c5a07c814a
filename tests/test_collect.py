"""Collection on tiny random FLUX and SD3 models in the real ComfyUI: what is stored, the cond half only,
bad settings, interruption and resume, the CLI and the SafeDIG Collect Activations node."""
from __future__ import annotations

import os
import signal
import sys

import pytest
import torch
from node_exec import FakeClip

from safedig_core import cli
from safedig_core.adapters.comfy import runtime as comfyui
from safedig_core.adapters.comfy.runner import ComfyRunner, tiny_encoder
from safedig_core.formats.prompts import PromptRecord
from safedig_core.formats.store import ActivationStore, summary
from safedig_core.pipeline.collect import (
    CollectError,
    collect,
    parse_record_steps,
    prompt_seed,
    token_indices,
)
from safedig_core.positions import PositionError

pytestmark = pytest.mark.comfy

STEPS, RECORD, BUDGET = 4, "0,0.5,-1", 5  # records steps 0, 2, 3
WANT_STEPS = [0, 2, 3]


@pytest.fixture(scope="module")
def models(comfy):
    return {"flux": comfyui.tiny_flux(seed=1), "sd3": comfyui.tiny_sd3(seed=2)}


def runner(models, family, cfg=2.0):
    return ComfyRunner(models[family], tiny_encoder(family), cfg=cfg, latent_shape=(16, 8, 8), name=f"tiny-{family}")


def prompts(n=5):
    return [PromptRecord(f"p{i}", f"prompt number {i}", "unsafe" if i % 2 else "safe", "nudity" if i % 2 else "",
                         "source", 100 + i if i == 3 else None) for i in range(n)]


def files(path) -> dict:
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def full_run(r, rec, i, seed, positions):
    """Every token of every position at every step, from the same runner the collection used."""
    got = {}
    r.run(rec, prompt_seed(rec, i, seed), STEPS, positions, lambda s: True,
          lambda p, x, s: got.__setitem__((p.name, s), x.reshape(-1, x.shape[-1]).clone()))
    return got


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_rows_tokens_and_pooled_means(models, tmp_path, family):
    r = runner(models, family)
    recs = prompts()
    res = collect(r, recs, "all", str(tmp_path / "s"), STEPS, RECORD, BUDGET, seed=7, prompts_per_shard=2)
    assert res.complete and res.collected == 5 and not res.stopped
    s = ActivationStore(str(tmp_path / "s"))
    names = [p.name for p in r.layout.positions()]
    assert [p.name for p in s.positions] == names and s.steps == WANT_STEPS and s.complete
    full = {i: full_run(r, recs[i], i, 7, r.layout.positions()) for i in (0, 3)}
    for name in names:
        batch = next(s.iter_batches(name, 10 ** 6))
        kept = 1 if name == "input.pooled" else BUDGET  # the pooled text vector is one token per image
        assert len(batch.x) == len(recs) * kept * len(WANT_STEPS)  # budget × recorded steps per prompt
        for i in range(len(recs)):
            for step in WANT_STEPS:
                sel = (batch.prompt == i) & (batch.step == step)
                assert int(sel.sum()) == kept and len(set(batch.token[sel].tolist())) == kept
        pooled = s.pooled(name)
        assert pooled.prompt.tolist() == [i for i in range(5) for _ in WANT_STEPS]
        assert pooled.step.tolist() == WANT_STEPS * 5
        for i, acts in full.items():
            for step in WANT_STEPS:
                x = acts[(name, step)]
                row = (pooled.prompt == i) & (pooled.step == step)
                # the pooled mean is over all the stream's tokens, not the budget's sample
                torch.testing.assert_close(pooled.x[row][0], x.float().mean(0), rtol=1e-5, atol=1e-6)
                sel = (batch.prompt == i) & (batch.step == step)
                tok = batch.token[sel]
                assert torch.equal(tok, token_indices(len(x), BUDGET, 7, i, step))
                assert torch.equal(batch.x[sel], x[tok].half().float())  # the sampled tokens, as stored


def test_cond_half_only(models, monkeypatch):
    r = runner(models, "flux", cfg=2.0)
    calls = []
    original = ComfyRunner._record

    def spy(self, p, x, to):
        calls.append((p.name, x.clone(), list(to.get("cond_or_uncond") or [])))
        return original(self, p, x, to)

    monkeypatch.setattr(ComfyRunner, "_record", spy)
    got = full_run(r, prompts()[1], 1, 0, r.layout.positions())
    assert got and all(x.shape[0] > 0 for x in got.values())
    both = [c for c in calls if sorted(c[2]) == [0, 1]]
    assert both, "CFG > 1 should evaluate cond and uncond together"
    for name, x, cu in both[:8]:
        per = x.shape[0] // len(cu)
        cond, uncond = x[cu.index(0) * per:(cu.index(0) + 1) * per], x[cu.index(1) * per:(cu.index(1) + 1) * per]
        recorded = [v for (n, _), v in got.items() if n == name]
        flat = cond.reshape(-1, cond.shape[-1])
        assert any(torch.equal(v, flat) for v in recorded), name
        assert not any(torch.equal(v, uncond.reshape(-1, uncond.shape[-1])) for v in recorded), name


@pytest.mark.parametrize("family,spec,message", [
    ("flux", "joint.0.img", "belongs to SD3"),
    ("flux", "double.0.img,double.2.img", "2 double blocks"),
    ("sd3", "joint.1.txt", "outputs no text"),
    ("sd3", "single.0.img", "belongs to FLUX"),
    ("sd3", "joint.0.image", "bad position name"),
])
def test_bad_positions_are_rejected(models, tmp_path, family, spec, message):
    with pytest.raises(PositionError, match=message):
        collect(runner(models, family), prompts(2), spec, str(tmp_path / "s"), STEPS, RECORD, BUDGET, seed=0)
    assert not (tmp_path / "s").exists()  # refused before anything is written


def test_bad_settings_are_rejected(models, tmp_path):
    assert parse_record_steps("all", 3) == [0, 1, 2] and parse_record_steps([0.0, 1.0, 1, -1], 4) == [0, 1, 3]
    assert parse_record_steps("0.5, 0.25", 28) == [7, 14]
    for spec, message in (("4", "outside the schedule of 4"), ("1.5", r"not in \[0, 1\]"), ("abc", "neither"),
                          ("", "no steps")):
        with pytest.raises(CollectError, match=message):
            parse_record_steps(spec, 4)
    with pytest.raises(CollectError, match="token budget"):
        collect(runner(models, "sd3"), prompts(2), "all", str(tmp_path / "s"), STEPS, RECORD, -1, seed=0)


def test_stop_and_crash_then_resume_equal_uninterrupted(models, tmp_path):
    r = runner(models, "flux")
    recs = prompts(5)
    kw = dict(positions="double.1.img,single.0.txt,single.1.img", steps=STEPS, record_steps=RECORD,
              token_budget=BUDGET, seed=3, prompts_per_shard=2)
    ref = str(tmp_path / "ref")
    collect(r, recs, store_path=ref, **kw)

    path = str(tmp_path / "run")
    asked = []
    res = collect(r, recs, store_path=path, should_stop=lambda: asked.append(1) or len(asked) > 3, **kw)
    assert res.stopped and not res.complete and (res.collected, res.dropped) == (2, 1)
    s = ActivationStore(path)  # valid; the third prompt's shard was not full, so it is not stored
    assert s.done_prompts() == 2 and not s.complete and "INCOMPLETE" in summary(s)

    class Boom(KeyboardInterrupt):
        pass

    seen = []

    def progress(done, total):
        seen.append(done)
        if done == 4:
            raise Boom  # Ctrl-C in the middle of the run
    with pytest.raises(Boom):
        collect(r, recs, store_path=path, progress=progress, **kw)
    assert seen == [2, 3, 4] and ActivationStore(path).done_prompts() == 4
    res = collect(r, recs, store_path=path, **kw)
    assert res.complete and res.resumed == 4 and res.collected == 1
    assert files(path) == files(ref)


def test_cli_collect_and_ctrl_c(models, tmp_path, monkeypatch, capsys):
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,label,category,domain\n" + "".join(
        f"prompt {i},{'unsafe' if i % 2 else 'safe'},{'gore' if i % 2 else ''},source\n" for i in range(5)))
    args = ["collect", "--tiny", "sd3", "--prompts", str(csv), "--steps", "3", "--record-steps", "0,-1",
            "--token-budget", "4", "--prompts-per-shard", "2", "--positions", "joint.0.img,joint.1.img", "--cfg", "2"]
    ref = str(tmp_path / "ref")
    assert cli.main(args + ["--out", ref]) == 0
    out = capsys.readouterr()
    assert "complete" in out.out and "joint.1.img: width 128, 40 token rows" in out.out

    original = ComfyRunner.run
    calls = []

    def run(self, *a, **k):  # the user presses Ctrl-C while the second prompt is sampling
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **k)

    monkeypatch.setattr(ComfyRunner, "run", run)
    path = str(tmp_path / "run")
    before = signal.getsignal(signal.SIGINT)  # the default, or SIG_IGN where a shell started the run in the background
    assert cli.main(args + ["--out", path]) == 130
    err = capsys.readouterr().err
    assert "stopping after this prompt" in err and "run the same command again to resume" in err
    assert ActivationStore(path).done_prompts() == 2 and len(calls) == 2  # stopped after the second prompt
    assert signal.getsignal(signal.SIGINT) == before  # the handler the run found is back
    assert cli.main(args + ["--out", path]) == 0
    assert files(path) == files(ref)
    assert cli.main(args + ["--out", path, "--token-budget", "8"]) == 2
    assert "different settings (config.token_budget: the store has 4, this run 8)" in capsys.readouterr().err


def test_collect_node(comfy, models, tmp_path, monkeypatch):
    import comfy.model_management as mm  # (a plain `import comfy...` would rebind the `comfy` fixture)
    import comfy.utils as cu
    import folder_paths

    node = comfy.NODE_CLASS_MAPPINGS["SafeDIGCollectActivations"]
    old_out, old_in, old_hook = folder_paths.get_output_directory(), folder_paths.get_input_directory(), cu.PROGRESS_BAR_HOOK
    folder_paths.set_output_directory(str(tmp_path / "output"))
    folder_paths.set_input_directory(str(tmp_path))
    updates = []
    cu.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    # shards of 2 prompts, as a real model's would be (the pack's own copy of the core: ComfyUI loads it as a package)
    monkeypatch.setattr(sys.modules[node.__module__].core, "MAX_PROMPTS_PER_SHARD", 2)
    try:
        pfile = tmp_path / "prompts.jsonl"
        pfile.write_text("".join(f'{{"prompt": "a thing {i}", "label": "safe"}}\n' for i in range(4)))
        args = dict(model=models["flux"], clip=FakeClip("flux"), prompt_file="prompts.jsonl", positions="double.0.img,single.0.txt",
                    steps=3, seed=5, token_budget=3, record_steps="all", output_name="tiny/run1", cfg=1.0, guidance=3.5,
                    sampler_name="euler", scheduler="simple", width=64, height=64, negative_prompt="", dtype="float16")

        def interrupt_at_two(value, total, preview, node_id=None):
            updates.append((value, total))
            if value == 2:
                mm.interrupt_current_processing(True)  # the user presses Cancel

        cu.set_progress_bar_global_hook(interrupt_at_two)
        with pytest.raises(mm.InterruptProcessingException):
            node.execute(**args)
        path = tmp_path / "output" / "safedig_activations" / "tiny" / "run1"
        assert ActivationStore(str(path)).done_prompts() == 2  # valid after the interruption
        cu.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
        updates.clear()
        out = node.execute(**args)
        text = out.result[0]
        assert "output/safedig_activations/tiny/run1" in text and str(tmp_path) not in text
        assert "complete" in text and "2 were already stored" in text
        assert updates[0] == (2, 4) and updates[-1] == (4, 4)
        s = ActivationStore(str(path))
        assert s.rows("single.0.txt") == 4 * 3 * 3 and s.config["runner"]["cfg"] == 1.0
        with pytest.raises(ValueError, match="output name"):
            node.execute(**{**args, "output_name": "../escape"})
        with pytest.raises(ValueError, match="give the name of a file in ComfyUI's input folder"):
            node.execute(**{**args, "prompt_file": "missing.csv"})
    finally:
        folder_paths.set_output_directory(old_out)
        folder_paths.set_input_directory(old_in)
        cu.set_progress_bar_global_hook(old_hook)
        mm.interrupt_current_processing(False)


def test_cli_errors_are_one_line(comfy, tmp_path, capsys):
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,label,category\na,safe,\n")
    base = ["collect", "--prompts", str(csv), "--out", str(tmp_path / "s")]
    weights = tmp_path / "flux.safetensors"
    weights.write_bytes(b"not loaded")
    for extra, message in (
            (["--model", str(tmp_path / "missing.safetensors"), "--clip", "x"], "missing.safetensors: not found"),
            (["--model", str(weights)], "--model needs its text encoders"),
            (["--tiny", "flux", "--positions", "joint.0.img"], "belongs to SD3"),
            (["--tiny", "sd3", "--record-steps", "9", "--steps", "4"], "outside the schedule of 4 steps")):
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("safedig collect: error:") and message in err[-1], err
    csv.write_text("prompt,label,category\na,unsafe,\n")
    assert cli.main(base + ["--tiny", "sd3"]) == 2
    assert "p.csv, line 2: unsafe row without a category" in capsys.readouterr().err
