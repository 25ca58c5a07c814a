"""`safedig convert`: SAEs saved by SAE-Lens, sparsify and dictionary_learning (the real libraries; dictionary_learning
also as plain state dicts) and by OpenAI's sparse_autoencoder (not on PyPI: plain state dicts checked against its
forward written out below) encode and
decode as in their source; bad and hostile files are refused in one line; converted files steer."""
from __future__ import annotations

import functools
import json
import os
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from safedig_core import cli
from safedig_core.formats import dictionary
from safedig_core.positions import parse
from safedig_core.steering import SteeringConfig

TOL = 1e-5
# sparsify's documented switch to its eager decoder (its Triton kernel needs a GPU); set before it is imported
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")


def cli_convert(capsys, *args):
    rc = cli.main(["convert", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def convert(src, fmt, out, *extra, positions=("double.0.img",), family="flux"):
    argv = ["convert", "--format", fmt, str(src), "--family", family, "--out", str(out), *map(str, extra)]
    for p in positions:
        argv += ["--position", p]
    assert cli.main(argv) == 0
    return dictionary.load(str(out))


def converted_sae(d, name="double.0.img"):
    return d.entries[parse(name)].sae


def randomize(module, seed, skip=()):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name not in skip:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim == 1 else min(p.shape) ** -0.5))


def inputs(d, seed, n=24):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(n, d, generator=g) + torch.randn(d, generator=g)  # an offset, so centring matters


def assert_close(a, b):
    assert a.shape == b.shape
    err = (a.double() - b.double()).abs().max().item()
    assert err <= TOL, err


# ---------------------------------------------------------------- SAE-Lens (the real library)

def saelens_sae(arch, d, L, seed, k=3, apply_b_dec=True, normalize="none", rescale=False):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    common = dict(d_in=d, d_sae=L, apply_b_dec_to_input=apply_b_dec, normalize_activations=normalize)
    if arch == "standard":
        sae = StandardSAE(StandardSAEConfig(**common))
    elif arch == "topk":
        sae = TopKSAE(TopKSAEConfig(**common, k=k, rescale_acts_by_decoder_norm=rescale))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
    randomize(sae, seed)
    if arch == "jumprelu":
        with torch.no_grad():
            sae.threshold.copy_(torch.linspace(-1.0, 2.0, L))  # negative ones too: relu must still apply
    if arch == "topk" and rescale:
        with torch.no_grad():
            sae.W_dec.mul_(torch.linspace(0.5, 2.0, L)[:, None])
    return sae


def check_against_saelens(folder, out, d, seed):
    from sae_lens import SAE

    ref = SAE.load_from_disk(str(folder))  # the library's own reading of what it saved
    mine = converted_sae(convert(folder, "saelens", out))
    x = inputs(d, seed)
    with torch.no_grad():
        z_ref = ref.encode(x)
        assert_close(mine.encode(x), z_ref)
        assert_close(mine.decode(mine.encode(x), x), ref.decode(z_ref))
        assert_close(mine(x), ref(x))
    return mine


@settings(max_examples=12, deadline=None)
@given(arch=st.sampled_from(["standard", "topk", "jumprelu"]), apply_b_dec=st.booleans(),
       normalize=st.sampled_from(["none", "layer_norm", "constant_norm_rescale"]),
       d=st.integers(4, 24), mult=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_saelens_saes_encode_and_decode_as_in_saelens(arch, apply_b_dec, normalize, d, mult, seed):
    L = d * mult + 3
    sae = saelens_sae(arch, d, L, seed, k=min(3, L), apply_b_dec=apply_b_dec, normalize=normalize)
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_model(os.path.join(tmp, "sae"))
        mine = check_against_saelens(os.path.join(tmp, "sae"), os.path.join(tmp, "out.safetensors"), d, seed)
    assert mine.normalize == normalize
    assert mine.activation == {"standard": "relu"}.get(arch, arch)


@pytest.mark.parametrize("rescale", [False, True])
def test_saelens_topk_with_decoder_norm_rescaling(tmp_path, rescale):
    sae = saelens_sae("topk", 12, 40, seed=3, k=5, rescale=rescale)
    sae.save_model(tmp_path / "sae")
    mine = check_against_saelens(tmp_path / "sae", tmp_path / "out.safetensors", 12, 3)
    assert mine.k == 5


def test_saelens_expected_average_scaling_is_folded_into_scale(tmp_path):
    from sae_lens import SAE

    sae = saelens_sae("standard", 10, 30, seed=4, normalize="expected_average_only_in")
    sae.save_model(tmp_path / "sae")
    (tmp_path / "sae" / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.5}))
    mine = converted_sae(convert(tmp_path / "sae", "saelens", tmp_path / "out.safetensors"))
    ref = SAE.load_from_disk(str(tmp_path / "sae"))
    ref.fold_activation_norm_scaling_factor(2.5)  # what SAE-Lens does with the factor at the end of training
    x = inputs(10, 4)
    with torch.no_grad():
        assert_close(mine.encode(x), ref.encode(x))
        assert_close(mine(x), ref(x))
    assert float(mine.scale) == 2.5


def test_saelens_batchtopk_saved_for_inference_as_jumprelu(tmp_path):
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=4))
    randomize(sae, 5)
    sae.topk_threshold = torch.tensor(0.7, dtype=torch.double)
    sae.save_inference_model(tmp_path / "sae")
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["architecture"] == "jumprelu"
    mine = check_against_saelens(tmp_path / "sae", tmp_path / "out.safetensors", 8, 5)
    assert mine.activation == "jumprelu" and torch.allclose(mine.threshold, torch.full((32,), 0.7))


@pytest.mark.parametrize("topk", [False, True])
def test_saelens_pre_6_config_written_by_hand(tmp_path, topk):
    d, L = 9, 27
    g = torch.Generator().manual_seed(6)
    weights = {"W_enc": torch.randn(d, L, generator=g), "b_enc": torch.randn(L, generator=g),
               "W_dec": torch.randn(L, d, generator=g), "b_dec": torch.randn(d, generator=g),
               "scaling_factor": torch.ones(L)}  # pre-6 files carried a unit finetuning factor
    cfg = {"d_in": d, "d_sae": L, "dtype": "float32", "device": "cpu", "hook_point": "blocks.4.hook_resid_post",
           "activation_fn_str": "topk" if topk else "relu", "normalize_activations": False,
           "apply_b_dec_to_input": False, "sae_lens_training_version": "3.13.0"}
    if topk:
        cfg["activation_fn_kwargs"] = {"k": 4}
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(tmp_path / "sae" / "sae_weights.safetensors"))
    mine = check_against_saelens(tmp_path / "sae", tmp_path / "out.safetensors", d, 6)
    assert (mine.activation, mine.k) == (("topk", 4) if topk else ("relu", mine.k))
    meta = dictionary.load(str(tmp_path / "out.safetensors")).provenance
    assert meta["hookpoint"] == "blocks.4.hook_resid_post" and meta["source_library"] == "sae_lens"


# ---------------------------------------------------------------- sparsify (the real library)

def sparsify_sae(d, L, k, seed, **cfg):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=L, k=k, **cfg))
    randomize(sae, seed)
    return sae


def sparsify_reference(sae, x):
    with torch.no_grad():
        acts, idx, _ = sae.encode(x)
        dense = torch.zeros(x.shape[0], sae.num_latents).scatter_(1, idx, acts)
        return dense, sae.decode(acts, idx)


@settings(max_examples=8, deadline=None)
@given(d=st.integers(4, 24), mult=st.integers(1, 4), k=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_sparsify_saes_encode_and_decode_as_in_sparsify(d, mult, k, seed):
    from sparsify import SparseCoder

    L = d * mult + 2
    sae = sparsify_sae(d, L, min(k, L), seed)
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_to_disk(os.path.join(tmp, "layers.3"))
        ref = SparseCoder.load_from_disk(os.path.join(tmp, "layers.3"))
        mine = converted_sae(convert(os.path.join(tmp, "layers.3"), "sparsify", os.path.join(tmp, "o.safetensors")))
    x = inputs(d, seed)
    dense, recon = sparsify_reference(ref, x)
    with torch.no_grad():
        assert_close(mine.encode(x), dense)
        assert_close(mine.decode(mine.encode(x)), recon)
        assert_close(mine(x), recon)


def test_sparsify_folder_of_hookpoints_maps_in_natural_order_or_by_name(tmp_path):
    saes = {name: sparsify_sae(8, 24, 3, seed) for seed, name in enumerate(["layers.10", "layers.2", "layers.7"])}
    for name, sae in saes.items():
        sae.save_to_disk(tmp_path / "run" / name)
    d = convert(tmp_path / "run", "sparsify", tmp_path / "a.safetensors",
                positions=["double.0.img", "double.1.txt", "single.0.img"])
    order = {"double.0.img": "layers.2", "double.1.txt": "layers.7", "single.0.img": "layers.10"}  # 2 < 7 < 10
    for pos, hook in order.items():
        assert torch.equal(converted_sae(d, pos).W_dec, saes[hook].W_dec.detach())
    assert d.provenance["hookpoint"] == "double.0.img=layers.2, double.1.txt=layers.7, single.0.img=layers.10"
    d = convert(tmp_path / "run", "sparsify", tmp_path / "b.safetensors", "--harmful", "single.3.img:1,5",
                positions=["layers.10=single.3.img"])
    assert [str(p) for p in d.positions] == ["single.3.img"]
    assert torch.equal(converted_sae(d, "single.3.img").W_enc, saes["layers.10"].encoder.weight.detach())
    assert d.entries[parse("single.3.img")].harmful == [1, 5]


# ---------------------------------------------------------------- dictionary_learning (reference forwards)

def dl_state(kind, d, L, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * (min(s) ** -0.5 if len(s) == 2 else 0.5)
    if kind == "AutoEncoder":
        return {"bias": r(d), "encoder.weight": r(L, d), "encoder.bias": r(L), "decoder.weight": r(d, L)}
    if kind == "AutoEncoderNew":
        return {"encoder.weight": r(L, d), "encoder.bias": r(L), "decoder.weight": r(d, L), "decoder.bias": r(d)}
    if kind == "JumpReluAutoEncoder":
        return {"W_enc": r(d, L), "b_enc": r(L), "W_dec": r(L, d), "b_dec": r(d), "threshold": r(L).abs() - 0.3}
    return {"encoder.weight": r(L, d), "encoder.bias": r(L), "decoder.weight": r(d, L), "b_dec": r(d),
            "k": torch.tensor(3, dtype=torch.int), "threshold": torch.tensor(0.8)}


def dl_forward(kind, sd, x):
    """dictionary_learning's encode/decode, as its classes define them."""
    relu = torch.relu
    if kind == "AutoEncoder":
        f = relu((x - sd["bias"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
        return f, f @ sd["decoder.weight"].T + sd["bias"]
    if kind == "AutoEncoderNew":
        f = relu(x @ sd["encoder.weight"].T + sd["encoder.bias"])
        return f, f @ sd["decoder.weight"].T + sd["decoder.bias"]
    if kind == "JumpReluAutoEncoder":  # apply_b_dec_to_input is False
        pre = x @ sd["W_enc"] + sd["b_enc"]
        f = relu(pre * (pre > sd["threshold"]))
        return f, f @ sd["W_dec"] + sd["b_dec"]
    post = relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    if kind == "AutoEncoderTopK":
        top = post.topk(int(sd["k"]), dim=-1)
        f = torch.zeros_like(post).scatter_(-1, top.indices, top.values)
    else:  # BatchTopKSAE at inference: use_threshold=True
        f = post * (post > sd["threshold"])
    return f, f @ sd["decoder.weight"].T + sd["b_dec"]


@pytest.mark.parametrize("kind", ["AutoEncoder", "AutoEncoderNew", "JumpReluAutoEncoder", "AutoEncoderTopK",
                                  "BatchTopKSAE"])
def test_dictionary_learning_state_dicts(tmp_path, kind):
    d, L = 10, 33
    sd = dl_state(kind, d, L, seed=7)
    torch.save(sd, tmp_path / "ae.pt")
    if kind in ("AutoEncoderTopK", "BatchTopKSAE"):
        (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": kind, "k": 3}}))
    mine = converted_sae(convert(tmp_path / "ae.pt", "dictionary_learning", tmp_path / "o.safetensors"))
    x = inputs(d, 7)
    f, x_hat = dl_forward(kind, sd, x)
    with torch.no_grad():
        assert_close(mine.encode(x), f)
        assert_close(mine.decode(mine.encode(x)), x_hat)
    assert (f > 0).any() and (f == 0).any()  # the check saw both active and silent latents


def test_dictionary_learning_topk_without_config_needs_k(tmp_path, capsys):
    sd = dl_state("AutoEncoderTopK", 6, 20, seed=8)
    torch.save(sd, tmp_path / "ae.pt")
    rc, _, err = cli_convert(capsys, "--format", "dictionary_learning", tmp_path / "ae.pt", "--family", "flux",
                             "--position", "double.0.img", "--out", tmp_path / "o.safetensors")
    assert rc == 2 and "AutoEncoderTopK (per-token TopK) and BatchTopKSAE" in err and "--k" in err
    mine = converted_sae(convert(tmp_path / "ae.pt", "dictionary_learning", tmp_path / "o.safetensors", "--k", 3))
    assert_close(mine.encode(inputs(6, 8)), dl_forward("AutoEncoderTopK", sd, inputs(6, 8))[0])


@functools.cache
def real_dictionary_learning():
    """saprmarks' dictionary_learning 0.1.0 (installed --no-deps by the setup): its package __init__ imports the
    activation buffer (nnsight), so its modules are imported without running it; they need only torch/einops."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None:
        pytest.skip("dictionary_learning is not installed (scripts/setup.sh installs it)")
    root = spec.submodule_search_locations[0]
    for name, path in (("dictionary_learning", root), ("dictionary_learning.trainers", os.path.join(root, "trainers"))):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            sys.modules[name] = pkg
    from dictionary_learning.dictionary import AutoEncoder, AutoEncoderNew, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    return {c.__name__: c for c in (AutoEncoder, AutoEncoderNew, JumpReluAutoEncoder, AutoEncoderTopK, BatchTopKSAE)}


@pytest.mark.parametrize("kind", ["AutoEncoder", "AutoEncoderNew", "JumpReluAutoEncoder", "AutoEncoderTopK",
                                  "BatchTopKSAE"])
def test_dictionary_learning_real_classes(tmp_path, kind):
    """Files saved from the library's own classes encode and decode as those classes do."""
    cls = real_dictionary_learning()[kind]
    d, L, k = 12, 40, 4
    ae = cls(d, L, k) if "TopK" in kind else cls(d, L)
    randomize(ae, seed=11)
    with torch.no_grad():
        if kind == "JumpReluAutoEncoder":
            ae.threshold.copy_(torch.rand(L) * 0.5)
        if kind == "BatchTopKSAE":
            ae.threshold.fill_(0.3)
    torch.save(ae.state_dict(), tmp_path / "ae.pt")
    if "TopK" in kind:
        (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": kind, "k": k}}))
    mine = converted_sae(convert(tmp_path / "ae.pt", "dictionary_learning", tmp_path / "o.safetensors"))
    x = inputs(d, 11)
    with torch.no_grad():
        f = ae.encode(x)
        assert_close(mine.encode(x), f)
        assert_close(mine.decode(mine.encode(x)), ae.decode(f))
    assert (f > 0).any() and (f == 0).any()


# ---------------------------------------------------------------- OpenAI sparse_autoencoder (reference forward)

def openai_state(d, L, seed, topk):
    g = torch.Generator().manual_seed(seed)
    sd = {"pre_bias": torch.randn(d, generator=g) * 0.5, "encoder.weight": torch.randn(L, d, generator=g) / d ** 0.5,
          "latent_bias": torch.randn(L, generator=g) * 0.5, "decoder.weight": torch.randn(d, L, generator=g) / d ** 0.5,
          "stats_last_nonzero": torch.zeros(L, dtype=torch.long),
          "latents_activation_frequency": torch.ones(L), "latents_mean_square": torch.zeros(L)}
    if topk:
        sd.update(activation="TopK", activation_state_dict={"k": 4, "postact_fn": "ReLU"})
    else:
        sd.update(activation="ReLU", activation_state_dict={})
    return sd


def openai_forward(sd, x):
    """OpenAI's Autoencoder.from_state_dict(sd) forward: TopK models layer-normalise the input."""
    topk = sd["activation"] == "TopK"
    if topk:
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
    pre = (x - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    if topk:
        top = pre.topk(sd["activation_state_dict"]["k"], dim=-1)
        z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    else:
        z = pre.relu()
    out = z @ sd["decoder.weight"].T + sd["pre_bias"]
    return z, (out * std + mu if topk else out)


@settings(max_examples=8, deadline=None)
@given(topk=st.booleans(), d=st.integers(4, 24), mult=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_openai_state_dicts_with_their_layer_norm(topk, d, mult, seed):
    L = d * mult + 4
    sd = openai_state(d, L, seed, topk)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(sd, os.path.join(tmp, "v5_32k_layer_8.pt"))
        mine = converted_sae(convert(os.path.join(tmp, "v5_32k_layer_8.pt"), "openai", os.path.join(tmp, "o.safetensors")))
    assert mine.normalize == ("layer_norm" if topk else "none")
    x = inputs(d, seed)
    z, x_hat = openai_forward(sd, x)
    with torch.no_grad():
        assert_close(mine.encode(x), z)
        assert_close(mine.decode(mine.encode(x), x), x_hat)
        assert_close(mine(x), x_hat)


# ---------------------------------------------------------------- bad and hostile files: one line, exit 2

class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_cases(tmp_path):
    """(name, argv after `convert`, expected text in the error line)."""
    cases = []
    marker = tmp_path / "PWNED"
    torch.save({"encoder.weight": torch.zeros(4, 2), "x": Payload(marker)}, tmp_path / "evil.pt")
    cases.append(("pickle payload", ["--format", "openai", tmp_path / "evil.pt"], "refused: loading it would run code"))
    cases.append(("pickle payload (dl)", ["--format", "dictionary_learning", tmp_path / "evil.pt"], "refused"))
    (tmp_path / "junk.pt").write_bytes(b"not a zip or pickle at all")
    cases.append(("junk .pt", ["--format", "openai", tmp_path / "junk.pt"], "not a PyTorch state dict"))

    sd = openai_state(6, 20, 0, topk=True)
    sd["decoder.weight"] = torch.randn(20, 7)  # neither [6, 20] nor its transpose
    torch.save(sd, tmp_path / "orient.pt")
    cases.append(("unresolvable orientation", ["--format", "openai", tmp_path / "orient.pt"],
                  "tensor 'decoder.weight' has shape [20, 7], expected [6, 20]"))
    sd = openai_state(6, 20, 0, topk=True)
    del sd["latent_bias"]
    torch.save(sd, tmp_path / "missing.pt")
    cases.append(("missing key", ["--format", "openai", tmp_path / "missing.pt"], "missing tensor 'latent_bias'"))
    sd = dl_state("AutoEncoder", 6, 20, 0)
    sd["bias"] = torch.zeros(5)
    torch.save(sd, tmp_path / "width.pt")
    cases.append(("b_dec of the wrong width", ["--format", "dictionary_learning", tmp_path / "width.pt"],
                  "tensor 'bias' has shape [5], expected [6]"))
    torch.save({"decoder_bias": torch.zeros(3), "r_mag": torch.zeros(4), "gate_bias": torch.zeros(4),
                "mag_bias": torch.zeros(4), "encoder.weight": torch.zeros(4, 3), "decoder.weight": torch.zeros(3, 4)},
               tmp_path / "gated.pt")
    cases.append(("gated dictionary_learning", ["--format", "dictionary_learning", tmp_path / "gated.pt"],
                  "GatedAutoEncoder"))

    sae = saelens_sae("standard", 6, 20, seed=0)
    sae.save_model(tmp_path / "sl")
    w = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    w["W_dec"] = torch.randn(20, 5)
    (tmp_path / "sl_width").mkdir()
    (tmp_path / "sl_width" / "cfg.json").write_text((tmp_path / "sl" / "cfg.json").read_text())
    save_file(w, str(tmp_path / "sl_width" / "sae_weights.safetensors"))
    cases.append(("mismatched widths", ["--format", "saelens", tmp_path / "sl_width"],
                  "tensor 'W_dec' has shape [20, 5], expected [20, 6]"))
    (tmp_path / "sl_noweights").mkdir()
    (tmp_path / "sl_noweights" / "cfg.json").write_text((tmp_path / "sl" / "cfg.json").read_text())
    cases.append(("missing weights file", ["--format", "saelens", tmp_path / "sl_noweights"],
                  "sae_weights.safetensors: no such file"))
    cases.append(("missing source", ["--format", "saelens", tmp_path / "nowhere"], "no such file or folder"))
    (tmp_path / "empty").mkdir()
    cases.append(("not an SAE-Lens folder", ["--format", "saelens", tmp_path / "empty"],
                  "no cfg.json here or in its subfolders"))

    from sae_lens import GatedSAE, GatedSAEConfig
    GatedSAE(GatedSAEConfig(d_in=6, d_sae=20)).save_model(tmp_path / "sl_gated")
    cases.append(("gated SAE-Lens", ["--format", "saelens", tmp_path / "sl_gated"], "architecture 'gated' is not supported"))
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    (tmp_path / "sl_unknown").mkdir()
    (tmp_path / "sl_unknown" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "mystery"}))
    save_file(load_file(str(tmp_path / "sl" / "sae_weights.safetensors")), str(tmp_path / "sl_unknown" / "sae_weights.safetensors"))
    cases.append(("unknown architecture", ["--format", "saelens", tmp_path / "sl_unknown"], "architecture 'mystery'"))
    saelens_sae("standard", 6, 20, 0, normalize="expected_average_only_in").save_model(tmp_path / "sl_avg")
    cases.append(("unknown scaling factor", ["--format", "saelens", tmp_path / "sl_avg"], "no activation_scaler.json"))

    sparsify_sae(6, 20, 3, 0, skip_connection=True).save_to_disk(tmp_path / "sp_skip")
    cases.append(("skip connection", ["--format", "sparsify", tmp_path / "sp_skip"], "skip connections (W_skip)"))
    sparsify_sae(6, 20, 3, 0, transcode=True).save_to_disk(tmp_path / "sp_tc")
    cases.append(("transcoder", ["--format", "sparsify", tmp_path / "sp_tc"], "a transcoder"))
    for name in ("layers.0", "layers.1"):
        sparsify_sae(6, 20, 3, 0).save_to_disk(tmp_path / "sp_multi" / name)
    cases.append(("one position for two SAEs", ["--format", "sparsify", tmp_path / "sp_multi"],
                  "holds 2 SAE(s) (layers.0, layers.1) but 1 --position was given"))

    good = ["--format", "saelens", tmp_path / "sl"]
    cases.append(("harmful out of range", good + ["--harmful", "3,20"],
                  "latent 20 is out of range for position double.0.img, whose SAE has 20 latents (0..19)"))
    cases.append(("harmful not a number", good + ["--harmful", "3,x"], "'x' is not a latent index"))
    cases.append(("position of the other family", good + ["--family", "sd3"], "position double.0.img is not a SD3"))
    cases.append(("bad position name", good + ["--position", "blocks.3"], "bad position name 'blocks.3'"))
    return cases, marker


def test_bad_and_hostile_files_give_one_line_and_exit_2(tmp_path, capsys):
    cases, marker = _bad_cases(tmp_path)
    for name, argv, expected in cases:
        argv = [*argv]
        if "--family" not in argv:
            argv += ["--family", "flux"]
        if "--position" not in argv:
            argv += ["--position", "double.0.img"]
        rc, _, err = cli_convert(capsys, *argv, "--out", tmp_path / "out.safetensors")
        lines = err.strip().splitlines()
        assert rc == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("safedig convert: error: "), (name, err)
        assert expected in lines[0], (name, lines[0])
        assert "Traceback" not in err and not (tmp_path / "out.safetensors").exists(), name
    assert not marker.exists()  # the payload never ran


# ---------------------------------------------------------------- round trip and steering

def test_round_trip_summary_and_steering_follows_the_marked_latents(tmp_path, capsys):
    from sae_lens import SAE

    sae = saelens_sae("topk", 16, 64, seed=11, k=4, normalize="layer_norm")
    sae.save_model(tmp_path / "sae")
    x = inputs(16, 11, n=64)
    ref = SAE.load_from_disk(str(tmp_path / "sae"))
    with torch.no_grad():
        z = ref.encode(x)
    harmful = [int(j) for j in z[0].nonzero().squeeze(1)[:2]]  # latents active on token 0
    rc, out, _ = cli_convert(capsys, "--format", "saelens", tmp_path / "sae", "--family", "flux", "--position",
                             "single.2.img", "--harmful", ",".join(map(str, harmful)), "--out", tmp_path / "c.safetensors")
    assert rc == 0 and "single.2.img" in out and "input normalisation: layer_norm" in out
    d = dictionary.load(str(tmp_path / "c.safetensors"))
    e = d.entries[parse("single.2.img")]
    assert e.harmful == harmful and e.gate_scale == 1.0
    assert d.provenance["source_library"] == "sae_lens" and d.provenance["source"] == "sae"
    assert d.provenance["format"] == "sae_lens topk"
    assert "provenance: made_by=safedig convert" in dictionary.summary(d)

    steerer = e.steerer()
    gated = z[:, harmful].sum(-1) > 0  # the source library's own code decides which tokens carry the latents
    assert 0 < int(gated.sum()) < len(x)
    assert torch.equal(steerer.harmful_mass(x) > 0, gated)
    for cfg in (SteeringConfig(blend=1.0), SteeringConfig(repel=1.0), SteeringConfig(blend=0.5, repel=2.0)):
        y = steerer.steer(x, cfg)
        assert torch.equal(y[~gated], x[~gated])
        assert (y[gated] != x[gated]).any(-1).all()
    y = steerer.steer(x, SteeringConfig(blend=1.0))
    assert (steerer.harmful_mass(y)[gated] < steerer.harmful_mass(x)[gated]).all()


# ---------------------------------------------------------------- per-token normalisation in the core

@settings(max_examples=20, deadline=None)
@given(normalize=st.sampled_from(["layer_norm", "constant_norm_rescale"]), d=st.integers(4, 20),
       seed=st.integers(0, 2**16), beta=st.floats(0.25, 3.0), scale=st.floats(0.5, 2.0))
def test_repel_shift_is_mapped_back_with_each_tokens_own_factor(normalize, d, seed, beta, scale):
    from safedig_core.sae import SparseAutoencoder
    from safedig_core.steering import PositionSteerer

    L, g = 3 * d, torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d, L, activation="relu", scale=scale, normalize=normalize)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.copy_(torch.randn(L, d, generator=g) / d ** 0.5)
        sae.b_enc.copy_(torch.randn(L, generator=g) * 0.5)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.5)
    H = torch.tensor([0, 2, 5])
    x = inputs(d, seed, n=16) * torch.linspace(0.5, 3.0, 16)[:, None]  # tokens of different size and spread
    y = PositionSteerer(sae, H).steer(x, SteeringConfig(repel=beta))
    z = sae.encode(x)
    xf = x.double()
    spread = ((xf - xf.mean(-1, keepdim=True)).std(-1, keepdim=True) if normalize == "layer_norm"
              else xf.norm(dim=-1, keepdim=True) / d ** 0.5)
    want = x.double() - beta * (z[:, H].double() @ sae.W_dec[H].double()) * spread / scale
    assert (y.double() - want).abs().max() <= 1e-5 * (1 + want.abs().max())
    # and the source's decoder sees exactly that move: D(z − βz_H) − D(z) in model units
    z2 = z.clone()
    z2[:, H] *= 1 - beta
    moved = sae.decode(z2, x) - sae.decode(z, x)
    assert (y - x - moved).abs().max() <= 1e-5 * (1 + moved.abs().max())


def test_normalize_is_stored_only_when_used_and_validated(tmp_path):
    from conftest import make_dictionary
    from safetensors import safe_open

    d = make_dictionary("flux", 16, ["double.0.img"], latents=32, k=4)
    dictionary.save(d, str(tmp_path / "plain.safetensors"))
    with safe_open(str(tmp_path / "plain.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["safedig"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert "normalize" not in meta["positions"]["double.0.img"]  # files of SafeDIG-trained SAEs are as before
    assert dictionary.load(str(tmp_path / "plain.safetensors")).entries[parse("double.0.img")].sae.normalize == "none"
    for value, ok in (("layer_norm", True), ("constant_norm_rescale", True), ("batch_norm", False)):
        meta["positions"]["double.0.img"]["normalize"] = value
        save_file(tensors, str(tmp_path / "n.safetensors"), metadata={"safedig": json.dumps(meta)})
        if ok:
            assert dictionary.load(str(tmp_path / "n.safetensors")).entries[parse("double.0.img")].sae.normalize == value
        else:
            with pytest.raises(dictionary.DictionaryError, match="unknown input normalisation 'batch_norm'"):
                dictionary.load(str(tmp_path / "n.safetensors"))
