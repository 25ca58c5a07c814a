"""Collection through diffusers pipelines (`DiffusersRunner`) on tiny random FLUX, SD3, Chroma and Qwen-Image
pipelines without text encoders or VAE: what reaches the store is what the adapter's hooks see (cond rows, first call of each step),
interruption resumes to the same store, other settings are refused, and the store builds a dictionary that
steers the same pipeline."""
from __future__ import annotations

import os
import types

import pytest
import torch
from test_diffusers_adapter import tiny_diffusers

from safedig_core.adapters.diffusers.hooks import record, steer
from safedig_core.adapters.diffusers.runner import DiffusersRunner
from safedig_core.formats.prompts import PromptRecord
from safedig_core.formats.store import ActivationStore, StoreError
from safedig_core.pipeline.build import BuildConfig, build
from safedig_core.pipeline.collect import CollectError, collect, prompt_seed, token_indices
from safedig_core.pipeline.train import TrainConfig
from safedig_core.steering import SteeringConfig

diffusers = pytest.importorskip("diffusers")

STEPS, RECORD, BUDGET = 4, "0,0.5,-1", 5  # records steps 0, 2, 3
WANT_STEPS = [0, 2, 3]
SIDE = 64  # pixels: an 8×8 latent (vae_scale_factor 8 without a VAE), 16 image tokens


def tiny_pipe(family: str):
    parts = dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    if family == "flux":
        pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                      transformer=tiny_diffusers("flux"), **parts)
    elif family in ("chroma", "qwen_image"):
        cls = diffusers.ChromaPipeline if family == "chroma" else diffusers.QwenImagePipeline
        pipe = cls(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                   transformer=tiny_diffusers(family))
    else:
        pipe = diffusers.StableDiffusion3Pipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                                  transformer=tiny_diffusers("sd3"), text_encoder_3=None,
                                                  tokenizer_3=None, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


FAMILIES = ("flux", "sd3", "chroma", "qwen_image")
SEPARATE_CFG = ("chroma", "qwen_image")  # guidance runs the negative prompt as a second call of each step


@pytest.fixture(scope="module")
def pipes():
    return {f: tiny_pipe(f) for f in FAMILIES}


def encode(text: str) -> dict:
    """Stand-in text states (5 tokens) seeded by the text; the negative is a fixed small one."""
    g = torch.Generator().manual_seed(sum(map(ord, text)) * 7919 + len(text))
    z = torch.Generator().manual_seed(12345)
    return {"prompt_embeds": torch.randn(1, 5, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(1, 32, generator=g),
            "negative_prompt_embeds": 0.1 * torch.randn(1, 5, 32, generator=z),
            "negative_pooled_prompt_embeds": 0.1 * torch.randn(1, 32, generator=z)}


def flux_encode(text: str) -> dict:  # FluxPipeline takes negatives only for true CFG
    e = encode(text)
    return {k: e[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}


def chroma_encode(text: str) -> dict:
    e, mask = encode(text), torch.ones(1, 5)
    return {"prompt_embeds": e["prompt_embeds"], "negative_prompt_embeds": e["negative_prompt_embeds"],
            "prompt_attention_mask": mask, "negative_prompt_attention_mask": mask}


def qwen_encode(text: str) -> dict:
    e, mask = encode(text), torch.ones(1, 5, dtype=torch.long)
    return {"prompt_embeds": e["prompt_embeds"], "negative_prompt_embeds": e["negative_prompt_embeds"],
            "prompt_embeds_mask": mask, "negative_prompt_embeds_mask": mask}


ENCODE = {"flux": flux_encode, "sd3": encode, "chroma": chroma_encode, "qwen_image": qwen_encode}
GUIDANCE = {"flux": 3.5, "sd3": 5.0, "chroma": 5.0, "qwen_image": 1.0}  # Qwen-Image guides by true_cfg_scale


def runner(pipes, family, **kw):
    kw.setdefault("guidance_scale", GUIDANCE[family])
    if family == "qwen_image":
        kw.setdefault("true_cfg_scale", 4.0)
    return DiffusersRunner(pipes[family], ENCODE[family], height=SIDE, width=SIDE, **kw)


def prompts(n=4):
    return [PromptRecord(f"p{i}", f"prompt number {i}", "unsafe" if i % 2 else "safe", "nudity" if i % 2 else "",
                         "source", 100 + i if i == 2 else None) for i in range(n)]


def hooked(pipe, kwargs, seed, **call) -> dict:
    """Every transformer call's streams at every position, by (name, step), in call order, seen through the
    adapter's record hooks on a plain pipeline call."""
    calls: dict = {}

    def cb(p, x, info):
        calls.setdefault((p.name, round(info["progress"] * STEPS)), []).append(x.clone())

    with record(pipe.transformer, "all", cb, schedule=pipe.scheduler), torch.no_grad():
        pipe(**kwargs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), output_type="latent",
             height=SIDE, width=SIDE, **call)
    return calls


def files(path) -> dict:
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


@pytest.mark.parametrize("family", FAMILIES)
def test_store_holds_the_cond_rows_the_hooks_see(pipes, tmp_path, family):
    r = runner(pipes, family)
    recs = prompts()
    res = collect(r, recs, "all", str(tmp_path / "s"), STEPS, RECORD, BUDGET, seed=7, prompts_per_shard=2)
    assert res.complete and res.collected == len(recs)
    s = ActivationStore(str(tmp_path / "s"))
    names = [p.name for p in r.layout.positions()]
    assert [p.name for p in s.positions] == names and s.steps == WANT_STEPS and s.complete
    assert s.config["runner"]["runner"] == "diffusers" and s.config["runner"]["family"] == family
    assert s.config["runner"]["variant"] == r.layout.variant
    guidance = {"guidance_scale": r.guidance_scale, **r.options}
    for i in (0, 2):
        calls = hooked(pipes[family], r.encode(recs[i].prompt), prompt_seed(recs[i], i, 7), **guidance)
        for name in names:
            batch = next(s.iter_batches(name, 10 ** 6))
            pooled = s.pooled(name)
            for step in WANT_STEPS:
                first = calls[(name, step)][0]
                if family == "sd3":  # CFG: [uncond, cond] in one call
                    assert first.shape[0] == 2 and not torch.equal(first[0], first[1])
                if family in SEPARATE_CFG:  # the positive call first, the negative second
                    later = calls[(name, step)][1]
                    assert first.shape[0] == later.shape[0] == 1 and not torch.equal(first, later)
                cond = first[-1]
                sel = (batch.prompt == i) & (batch.step == step)
                tok = batch.token[sel]
                assert torch.equal(tok, token_indices(len(cond), BUDGET, 7, i, step)) and len(tok) == BUDGET
                assert torch.equal(batch.x[sel], cond[tok].half().float())
                row = (pooled.prompt == i) & (pooled.step == step)
                torch.testing.assert_close(pooled.x[row][0], cond.float().mean(0), rtol=1e-5, atol=1e-6)
    assert len(next(s.iter_batches(names[0], 10 ** 6)).x) == len(recs) * BUDGET * len(WANT_STEPS)


def test_sd3_guidance_records_the_cond_half(pipes):
    """At step 0 the latents are the seed's noise whatever the guidance, so the cond rows with CFG must equal the
    single-row call without it, and differ from the uncond rows."""
    rec, positions = prompts()[1], runner(pipes, "sd3").layout.positions()

    def step0(r):
        got = {}
        r.run(rec, 5, STEPS, positions, lambda s: s == 0, lambda p, x, s: got.__setitem__(p.name, x.clone()))
        return got

    cfg, plain = step0(runner(pipes, "sd3", guidance_scale=5.0)), step0(runner(pipes, "sd3", guidance_scale=1.0))
    calls = hooked(pipes["sd3"], encode(rec.prompt), 5, guidance_scale=5.0)
    for name in plain:
        assert cfg[name].shape[0] == 1
        torch.testing.assert_close(cfg[name], plain[name], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(cfg[name], calls[(name, 0)][0][:1], atol=1e-3)


def test_flux_true_cfg_records_the_positive_call(pipes):
    """FluxPipeline with true_cfg_scale > 1 calls the transformer twice per step (positive, then negative)."""
    rec = prompts()[0]
    r = DiffusersRunner(pipes["flux"], encode, height=SIDE, width=SIDE, true_cfg_scale=4.0)
    assert r.describe()["options"] == {"true_cfg_scale": 4.0}
    got = {}
    r.run(rec, 3, STEPS, r.layout.positions(), lambda s: True, lambda p, x, s: got.__setitem__((p.name, s), x.clone()))
    calls = hooked(pipes["flux"], encode(rec.prompt), 3, true_cfg_scale=4.0, guidance_scale=r.guidance_scale)
    assert set(got) == set(calls)
    for key, xs in calls.items():
        assert len(xs) == 2 and not torch.equal(xs[0], xs[1])
        assert torch.equal(got[key], xs[0])


def test_stop_then_resume_equals_uninterrupted_and_other_settings_are_refused(pipes, tmp_path):
    r = runner(pipes, "flux")
    recs = prompts()
    kw = {"positions": "double.1.img,single.0.txt", "steps": STEPS, "record_steps": RECORD, "token_budget": BUDGET,
          "seed": 3, "prompts_per_shard": 1}
    ref = str(tmp_path / "ref")
    collect(r, recs, store_path=ref, **kw)
    path = str(tmp_path / "run")
    asked = []
    res = collect(r, recs, store_path=path, should_stop=lambda: asked.append(1) or len(asked) > 1, **kw)
    assert res.stopped and res.collected == 1 and ActivationStore(path).done_prompts() == 1
    res = collect(r, recs, store_path=path, **kw)
    assert res.complete and res.resumed == 1 and res.collected == 3
    assert files(path) == files(ref)

    for other, message in ((runner(pipes, "flux", guidance_scale=2.0), "guidance_scale"),
                           (DiffusersRunner(pipes["flux"], flux_encode, height=SIDE, width=2 * SIDE), "image_width"),
                           (runner(pipes, "flux", name="another-model"), "model")):
        with pytest.raises(StoreError, match=f"different settings .*{message}"):
            collect(other, recs, store_path=path, **kw)


def test_store_builds_a_dictionary_that_steers_the_pipeline(pipes, tmp_path):
    recs = [PromptRecord(f"s{i}", f"a calm lake {i}", "safe", "", "source") for i in range(4)]
    recs += [PromptRecord(f"u{i}", f"fire scene {i}", "unsafe", "fire", "source") for i in range(4)]
    path = str(tmp_path / "s")
    collect(runner(pipes, "flux"), recs, "double.1.img,single.0.img", path, 3, "0,1,2", 8, seed=0)
    out = str(tmp_path / "d.safetensors")
    build(ActivationStore(path), out, BuildConfig(positions=["double.1.img"], adapt=None, train=TrainConfig(
        expansion=2, k=4, steps=20, batch_size=64, checkpoint_every=10)), str(tmp_path / "work"), progress=False)
    pipe = pipes["flux"]

    def latents():
        return pipe(**flux_encode("fire scene 9"), num_inference_steps=3, generator=torch.Generator().manual_seed(1),
                    output_type="latent", height=SIDE, width=SIDE).images

    with torch.no_grad():
        base = latents()
        with steer(pipe.transformer, out, SteeringConfig(blend=1.0, repel=1.0, threshold=0.0),
                   schedule=pipe.scheduler):
            steered = latents()
        assert torch.equal(latents(), base)  # the hooks are gone again
    assert not torch.equal(steered, base)


@pytest.mark.parametrize("family, label", [("hunyuan_image", r"HUNYUAN_IMAGE \(HunyuanImage21\)"),
                                           ("z_image", r"LUMINA2 \(ZImage\)"), ("hidream", r"HIDREAM \(HiDream\)")])
def test_pipelines_that_batch_guidance_otherwise_are_refused(family, label):
    """The adapter steers these transformers, but the runner cannot yet tell their pipelines' cond rows."""
    pipe = types.SimpleNamespace(transformer=tiny_diffusers(family))
    with pytest.raises(CollectError, match=f"does not collect from {label} pipelines yet .*collect through ComfyUI"):
        DiffusersRunner(pipe)
