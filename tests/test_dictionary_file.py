"""The safety dictionary file (safedig_core.formats.dictionary): round trip, atomic save, and a clear
DictionaryError (naming the file and the problem) for every kind of bad file; check_layout."""
from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from safedig_core.formats import dictionary
from safedig_core.formats.dictionary import DictionaryEntry, DictionaryError, SafetyDictionary
from safedig_core.positions import ModelLayout, parse
from safedig_core.sae import SparseAutoencoder
from safedig_core.steering import SteeringConfig

D, L = 16, 40  # width and latents of the test SAEs


def make_sae(d: int, latents: int, act: str, seed: int, k: int = 6, scale: float = 1.0) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d, latents, k, act, scale)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(torch.randn(getattr(sae, name).shape, generator=g))
        if act == "jumprelu":
            sae.threshold.copy_(torch.rand(latents, generator=g))
    return sae


def make_dict(family: str = "flux") -> SafetyDictionary:
    names = {"flux": ["double.0.img", "double.3.txt", "single.7.img"],
             "sd3": ["joint.0.img", "joint.2.txt", "joint.5.img"]}[family]
    acts = ["topk", "jumprelu", "relu"]
    entries = {}
    for i, (name, act) in enumerate(zip(names, acts)):
        p = parse(name)
        sae = make_sae(D, L + 8 * i, act, seed=i, scale=[1.0, 0.0123456789, 3.5][i])
        harmful = [[5, 2, 11], [0, 39, 17, 8], []][i]
        scores = [1.25 - 0.1 * j for j in range(len(harmful))]
        safe = [0.0, 0.125, 0.5, 0.0] if i == 1 else None
        metrics = {"fvu": 0.123, "l0": 6, "dead_fraction": 0.0} if i == 0 else {}
        entries[p] = DictionaryEntry(p, sae, harmful, scores, safe, metrics)
    return SafetyDictionary(family, entries, {"blend": 0.8, "repel": 1.5, "threshold": 0.1, "apply_to": "cond"},
                            {"made_by": "tests", "prompts": 42, "note": "ünïcode ok"})


@pytest.fixture
def good(tmp_path):
    """A good dictionary file, its tensors and its metadata, to be broken one thing at a time."""
    path = str(tmp_path / "good.safetensors")
    dictionary.save(make_dict("flux"), path)
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["safedig"])
    return path, load_file(path), meta


def write(tmp_path, tensors: dict, meta, name: str = "bad.safetensors", raw: str | None = None) -> str:
    path = str(tmp_path / name)
    metadata = None if meta is None and raw is None else {"safedig": raw if raw is not None else json.dumps(meta)}
    save_file(tensors, path, metadata=metadata)
    return path


def expect_error(path: str, *fragments: str) -> str:
    with pytest.raises(DictionaryError) as e:
        dictionary.load(path)
    msg = str(e.value)
    assert path in msg, f"message does not name the file: {msg}"
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in: {msg}"
    assert "\n" not in msg, "one line"
    return msg


# ----------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_round_trip(tmp_path, dtype, family):
    d = make_dict(family)
    path = str(tmp_path / "sub" / "dict.safetensors")  # the folder is created
    dictionary.save(d, path, dtype=dtype)
    back = dictionary.load(path)
    assert back.family == family
    assert back.positions == d.positions
    assert back.steering_defaults == d.steering_defaults and back.provenance == d.provenance
    for p, e in d.entries.items():
        b = back.entries[p]
        assert b.position == p
        s, t = e.sae, b.sae
        assert (t.d, t.latents, t.activation) == (s.d, s.latents, s.activation)
        if s.activation == "topk":
            assert t.k == s.k
        names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if s.activation == "jumprelu" else [])
        for n in names:
            got, want = getattr(t, n), getattr(s, n).detach().to(dtype)
            assert got.dtype == dtype, n
            assert torch.equal(got, want), n
        # the scale is metadata (a JSON float), held by the SAE in the file's dtype
        assert float(t.scale) == pytest.approx(float(s.scale), rel={torch.float32: 1e-7}.get(dtype, 1e-2))
        assert b.harmful == e.harmful and b.scores == e.scores
        assert b.safe_values == e.safe_values
        assert b.metrics == e.metrics
    assert back.default_config() == SteeringConfig(blend=0.8, repel=1.5, threshold=0.1, apply_to="cond")
    assert [f for f in os.listdir(tmp_path / "sub") if f.endswith(".tmp")] == []


def test_round_trip_steers_the_same(tmp_path):
    d = make_dict("flux")
    path = str(tmp_path / "d.safetensors")
    dictionary.save(d, path)
    back = dictionary.load(path)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(0)) * 3
    cfg = SteeringConfig(blend=1.0, repel=0.5)
    for p in d.positions:
        a, b = d.entries[p].steerer(), back.entries[p].steerer()
        assert torch.equal(a.harmful_mass(x), b.harmful_mass(x))
        assert torch.equal(a.steer(x, cfg), b.steer(x, cfg))


def test_summary_names_everything(tmp_path):
    d = make_dict("sd3")
    text = dictionary.summary(d, "some/path.safetensors")
    assert "some/path.safetensors" in text and "family SD3" in text and "3 position(s)" in text
    assert "made_by=tests" in text and "blend=0.8" in text
    for p, e in d.entries.items():
        line = next(ln for ln in text.splitlines() if ln.split() and ln.split()[0] == p.name)
        cols = line.split()
        assert cols[1:4] == [str(e.sae.d), str(e.sae.latents), str(e.sae.k)]
        assert cols[4] == e.sae.activation
        assert float(cols[6]) == e.gate_scale and cols[7] == str(len(e.harmful))


# ---------------------------------------------------------------------------------------------- atomic save


def test_save_replaces_atomically_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "d.safetensors")
    dictionary.save(make_dict("flux"), path)
    d2 = make_dict("flux")
    d2.provenance = {"version": 2}
    dictionary.save(d2, path, dtype=torch.float16)
    assert dictionary.load(path).provenance == {"version": 2}
    assert sorted(os.listdir(tmp_path)) == ["d.safetensors"]


def test_failing_save_leaves_existing_file_untouched(tmp_path, monkeypatch):
    path = str(tmp_path / "d.safetensors")
    dictionary.save(make_dict("flux"), path)
    before = open(path, "rb").read()

    def half_written(tensors, target, metadata=None):
        with open(target, "wb") as f:
            f.write(b"\x00" * 100)  # a truncated file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(dictionary, "save_file", half_written)
    d2 = make_dict("flux")
    d2.provenance = {"version": 2}
    with pytest.raises(OSError, match="No space"):
        dictionary.save(d2, path)
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["d.safetensors"], "a temporary file was left behind"


def test_save_rejects_scores_not_matching_harmful(tmp_path):
    d = make_dict("flux")
    e = d.entries[parse("double.0.img")]
    e.scores = e.scores[:-1]
    path = str(tmp_path / "d.safetensors")
    with pytest.raises(DictionaryError, match=r"double\.0\.img has 3 harmful latents but 2 scores") as err:
        dictionary.save(d, path)
    assert path in str(err.value)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ bad files


def test_missing_file(tmp_path):
    expect_error(str(tmp_path / "nope.safetensors"), "no such file")


@pytest.mark.parametrize("content", [
    random.Random(0).randbytes(300),
    b"",
    b"this is a text file, not a dictionary\n" * 4,
    (12).to_bytes(8, "little") + b"not json at all",  # a plausible header length, then garbage
], ids=["random-bytes", "empty", "text", "garbage-header"])
def test_not_safetensors(tmp_path, content):
    path = str(tmp_path / "x.safetensors")
    open(path, "wb").write(content)
    expect_error(path, "not a safetensors file")


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_safetensors_without_safedig_metadata(tmp_path, metadata):
    path = str(tmp_path / "x.safetensors")
    save_file({"w": torch.zeros(3)}, path, metadata=metadata)
    expect_error(path, "not a SafeDIG dictionary", "'safedig' metadata")


@pytest.mark.parametrize("raw,fragment", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2, 3]", "must be a JSON object"),
    ('"a string"', "must be a JSON object"),
])
def test_bad_json(good, tmp_path, raw, fragment):
    _, tensors, _ = good
    expect_error(write(tmp_path, tensors, None, raw=raw), fragment)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_format_version(good, tmp_path, version):
    _, tensors, meta = good
    if version is None:
        del meta["format_version"]
    else:
        meta["format_version"] = version
    expect_error(write(tmp_path, tensors, meta), f"unknown format version {version!r}", "upgrade SafeDIG")


@pytest.mark.parametrize("family", ["sdxl", "FLUX", None])
def test_unknown_family(good, tmp_path, family):
    _, tensors, meta = good
    meta["family"] = family
    expect_error(write(tmp_path, tensors, meta), f"unknown model family {family!r}", "flux", "sd3")


@pytest.mark.parametrize("positions", [{}, None, ["double.0.img"]])
def test_no_positions(good, tmp_path, positions):
    _, tensors, meta = good
    meta["positions"] = positions
    expect_error(write(tmp_path, tensors, meta), "names no positions")


@pytest.mark.parametrize("key", ["double.0.img.W_dec", "double.0.img.b_enc", "double.3.txt.threshold",
                                 "single.7.img.b_dec"])
def test_missing_tensor(good, tmp_path, key):
    _, tensors, meta = good
    del tensors[key]
    expect_error(write(tmp_path, tensors, meta), f"missing tensor '{key}'")


@pytest.mark.parametrize("key,shape", [("double.0.img.W_enc", (L, D + 1)), ("double.0.img.W_dec", (D, L)),
                                       ("double.3.txt.b_enc", (L + 8, 1)), ("single.7.img.b_dec", (D - 1,)),
                                       ("double.3.txt.threshold", (L,))])
def test_wrong_shape(good, tmp_path, key, shape):
    _, tensors, meta = good
    want = list(tensors[key].shape)
    tensors[key] = torch.zeros(shape)
    expect_error(write(tmp_path, tensors, meta), f"tensor '{key}' has shape {list(shape)}", f"expected {want}")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.int8, torch.bool])
def test_wrong_dtype(good, tmp_path, dtype):
    _, tensors, meta = good
    key = "double.0.img.W_enc"
    tensors[key] = tensors[key].to(dtype)
    expect_error(write(tmp_path, tensors, meta), f"tensor '{key}' has dtype {dtype}", "float32, float16 or bfloat16")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_tensor(good, tmp_path, bad, dtype):
    _, tensors, meta = good
    key = "double.3.txt.W_dec"
    t = tensors[key].clone()
    t[3, 4] = bad
    tensors[key] = t.to(dtype)
    expect_error(write(tmp_path, tensors, meta), f"tensor '{key}'", "NaN or Inf")


@pytest.mark.parametrize("field,value", [("width", D + 4), ("latents", L - 1)])
def test_metadata_size_not_matching_tensors(good, tmp_path, field, value):
    _, tensors, meta = good
    meta["positions"]["double.0.img"][field] = value
    want = [value, D] if field == "latents" else [L, value]
    expect_error(write(tmp_path, tensors, meta), "tensor 'double.0.img.W_enc' has shape", f"expected {want}")


@pytest.mark.parametrize("field,value", [("width", 0), ("width", "16"), ("width", 16.0), ("latents", None),
                                         ("width", True), ("k", 0)])
def test_bad_size_field(good, tmp_path, field, value):
    _, tensors, meta = good
    meta["positions"]["double.0.img"][field] = value
    expect_error(write(tmp_path, tensors, meta), "position double.0.img", f"'{field}' must be an integer")


def test_k_beyond_latents(good, tmp_path):
    _, tensors, meta = good
    meta["positions"]["double.0.img"]["k"] = L + 1
    expect_error(write(tmp_path, tensors, meta), "position double.0.img", f"k={L + 1} exceeds the {L} latents")


def test_unknown_activation(good, tmp_path):
    _, tensors, meta = good
    meta["positions"]["single.7.img"]["activation"] = "gelu"
    expect_error(write(tmp_path, tensors, meta), "position single.7.img", "unknown activation 'gelu'")


@pytest.mark.parametrize("scale", [0, -1.0, "big", None])
def test_bad_scale(good, tmp_path, scale):
    _, tensors, meta = good
    meta["positions"]["double.0.img"]["scale"] = scale
    expect_error(write(tmp_path, tensors, meta), "position double.0.img", "scale must be a positive number")


def test_non_finite_scale(good, tmp_path):
    _, tensors, meta = good
    meta["positions"]["double.0.img"]["scale"] = math.nan  # json writes NaN, and Python's json reads it back
    expect_error(write(tmp_path, tensors, meta), "position double.0.img", "scale must be a positive number")


@pytest.mark.parametrize("latent", [L, L + 100, -1])
def test_harmful_latent_out_of_range(good, tmp_path, latent):
    _, tensors, meta = good
    meta["positions"]["double.0.img"]["harmful"].append([latent, 0.5])
    expect_error(write(tmp_path, tensors, meta), "position double.0.img", f"harmful latent {latent} is out of range",
                 f"0..{L - 1}")


def test_duplicate_harmful_latents(good, tmp_path):
    _, tensors, meta = good
    meta["positions"]["double.0.img"]["harmful"].append([11, 0.1])
    expect_error(write(tmp_path, tensors, meta), "position double.0.img", "listed more than once")


@pytest.mark.parametrize("harmful", [[3, 4], [[1, 2, 3]], [["a", 1.0]], 5, [[1.7, 1.0]], [["12", 1.0]],
                                     {"12": 1.0}, [[True, 1.0]], [[3, "high"]]])
def test_malformed_harmful_list(good, tmp_path, harmful):
    _, tensors, meta = good
    meta["positions"]["double.0.img"]["harmful"] = harmful
    expect_error(write(tmp_path, tensors, meta), "position double.0.img", "list of [latent, score] pairs")


def test_safe_values_count(good, tmp_path):
    _, tensors, meta = good
    meta["positions"]["double.3.txt"]["safe_values"] = [0.0, 0.1]
    expect_error(write(tmp_path, tensors, meta), "position double.3.txt", "2 safe values for 4 harmful latents")


@pytest.mark.parametrize("safe", [5, "0.1", [0.0, "a", 0.0, 0.0], [0.0, math.nan, 0.0, 0.0], [True] * 4,
                                  {"0": 0.0}])
def test_bad_safe_values(good, tmp_path, safe):
    _, tensors, meta = good
    meta["positions"]["double.3.txt"]["safe_values"] = safe
    expect_error(write(tmp_path, tensors, meta), "position double.3.txt", "'safe_values' must be a list of finite")


def test_bad_metrics(good, tmp_path):
    _, tensors, meta = good
    meta["positions"]["double.0.img"]["metrics"] = [0.1, 0.2]
    expect_error(write(tmp_path, tensors, meta), "position double.0.img", "'metrics' must be a JSON object")


@pytest.mark.parametrize("key", ["steering_defaults", "provenance"])
@pytest.mark.parametrize("value", [[1, 2], "text", 3])
def test_top_level_objects(good, tmp_path, key, value):
    _, tensors, meta = good
    meta[key] = value
    expect_error(write(tmp_path, tensors, meta), f"'{key}' must be a JSON object")


@pytest.mark.parametrize("defaults,field", [({"blend": 7}, "blend="), ({"apply_to": "sideways"}, "apply_to="),
                                            ({"repel": "strong"}, "repel")])
def test_bad_steering_defaults(good, tmp_path, defaults, field):
    _, tensors, meta = good
    meta["steering_defaults"] = defaults
    expect_error(write(tmp_path, tensors, meta), "bad steering defaults", field)


def test_unknown_steering_default_keys_are_ignored(good, tmp_path):
    _, tensors, meta = good
    meta["steering_defaults"] = {"blend": 0.5, "future_option": True}
    d = dictionary.load(write(tmp_path, tensors, meta))
    assert d.default_config() == SteeringConfig(blend=0.5)


def test_k_of_non_topk(good, tmp_path):
    _, tensors, meta = good
    meta["positions"]["single.7.img"]["k"] = "many"
    expect_error(write(tmp_path, tensors, meta), "position single.7.img", "'k' must be an integer")
    del meta["positions"]["single.7.img"]["k"]
    assert dictionary.load(write(tmp_path, tensors, meta, name="ok.safetensors")).entries[parse("single.7.img")].sae.k == 1


@pytest.mark.parametrize("name", ["double.x.img", "double.0.rgb", "triple.0.img", "double.-1.img", "double.0"])
def test_bad_position_name(good, tmp_path, name):
    _, tensors, meta = good
    meta["positions"][name] = meta["positions"].pop("double.0.img")
    expect_error(write(tmp_path, tensors, meta), "bad position name", repr(name))


def test_position_of_other_family(good, tmp_path):
    _, tensors, meta = good
    meta["positions"]["joint.0.img"] = meta["positions"].pop("double.0.img")
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
        tensors[f"joint.0.img.{n}"] = tensors.pop(f"double.0.img.{n}")
    expect_error(write(tmp_path, tensors, meta), "position joint.0.img is not a FLUX position")


def test_position_metadata_not_an_object(good, tmp_path):
    _, tensors, meta = good
    meta["positions"]["double.0.img"] = [16, 40]
    expect_error(write(tmp_path, tensors, meta), "position double.0.img", "metadata must be an object")


@pytest.mark.parametrize("key", ["double.0.img.extra", "single.9.img.W_enc", "loose"])
def test_extra_tensor(good, tmp_path, key):
    _, tensors, meta = good
    tensors[key] = torch.zeros(4)
    msg = expect_error(write(tmp_path, tensors, meta), f"tensor '{key}'", "belongs to no position")
    assert "double.0.img.W_enc" not in msg


def test_threshold_of_a_non_jumprelu_position(good, tmp_path):
    """A JumpReLU SAE labelled TopK would otherwise load with its thresholds silently dropped."""
    _, tensors, meta = good
    tensors["double.0.img.threshold"] = torch.zeros(L)
    expect_error(write(tmp_path, tensors, meta), "tensor 'double.0.img.threshold' is a JumpReLU threshold",
                 "position double.0.img has activation topk")


def test_error_is_a_value_error_and_names_only_the_first_problem(good, tmp_path):
    _, tensors, meta = good
    del tensors["double.0.img.W_dec"]
    tensors["zzz"] = torch.zeros(1)
    path = write(tmp_path, tensors, meta)
    with pytest.raises(ValueError):
        dictionary.load(path)
    expect_error(path, "missing tensor 'double.0.img.W_dec'")


def test_read_metadata_reads_only_the_header(good):
    path, tensors, meta = good
    got = dictionary.read_metadata(path)
    assert got["family"] == "flux" and set(got["positions"]) == set(meta["positions"])
    assert got["_keys"] == set(tensors)


# ----------------------------------------------------------------------------------------------- check_layout

FLUX = ModelLayout("flux", {"double": 19, "single": 38}, D)
SD3 = ModelLayout("sd3", {"joint": 6}, D, last_txt_absent=True)


def test_check_layout_accepts_a_fitting_model():
    make_dict("flux").check_layout(FLUX)
    make_dict("sd3").check_layout(SD3)


def test_check_layout_family_mismatch():
    with pytest.raises(DictionaryError, match=r"^my\.safetensors: made for FLUX, but the model is SD3$"):
        make_dict("flux").check_layout(SD3, source="my.safetensors")
    with pytest.raises(DictionaryError, match="made for SD3, but the model is FLUX"):
        make_dict("sd3").check_layout(FLUX)


def test_check_layout_block_beyond_the_model():
    small = ModelLayout("flux", {"double": 2, "single": 38}, D)
    with pytest.raises(DictionaryError, match=r"^f: position double\.3\.txt: the model has 2 double blocks \(indices 0\.\.1\)"):
        make_dict("flux").check_layout(small, source="f")
    few_single = ModelLayout("flux", {"double": 19, "single": 7}, D)
    with pytest.raises(DictionaryError, match=r"single\.7\.img: the model has 7 single blocks"):
        make_dict("flux").check_layout(few_single)
    # only the chosen positions are checked
    make_dict("flux").check_layout(small, positions=[parse("double.0.img")])


def test_check_layout_sd3_last_block_has_no_text():
    d = make_dict("sd3")
    last = ModelLayout("sd3", {"joint": 3}, D, last_txt_absent=True)  # joint.2 is the last, pre-only block
    with pytest.raises(DictionaryError, match=r"position joint\.2\.txt: the last joint block outputs no text"):
        d.check_layout(last, positions=[parse("joint.2.txt")])
    d.check_layout(last, positions=[parse("joint.0.img")])
    d.check_layout(ModelLayout("sd3", {"joint": 3}, D), positions=[parse("joint.2.txt")])  # a model with it


def test_check_layout_width_mismatch():
    d = make_dict("flux")
    with pytest.raises(DictionaryError) as e:
        d.check_layout(ModelLayout("flux", {"double": 19, "single": 38}, 3072), source="dict.safetensors")
    msg = str(e.value)
    assert msg.startswith("dict.safetensors: position double.0.img")
    assert f"width {D} in the dictionary" in msg and "3072 in the model" in msg
    txt = ModelLayout("flux", {"double": 19, "single": 38}, D, txt_width=24)
    with pytest.raises(DictionaryError, match=rf"position double\.3\.txt has width {D} in the dictionary but 24"):
        d.check_layout(txt)


# ------------------------------------------------------------------------------------- the gate units


def test_gate_units_round_trip_and_old_files_keep_loading(good, tmp_path):
    path, tensors, meta = good
    assert all("image_gate_scale" not in m for m in meta["positions"].values())  # not written when unset
    old = dictionary.load(path)
    assert all(e.image_gate_scale is None for e in old.entries.values())
    st = old.entries[parse("double.0.img")].steerer()
    assert st.image_gate_scale == st.gate_scale == 1.0  # files without the key: the token unit
    d = make_dict("flux")
    e = d.entries[parse("double.0.img")]
    e.gate_scale, e.image_gate_scale = 2.5, 7.25
    dictionary.save(d, str(tmp_path / "units.safetensors"))
    back = dictionary.load(str(tmp_path / "units.safetensors"))
    b = back.entries[parse("double.0.img")]
    assert (b.gate_scale, b.image_gate_scale) == (2.5, 7.25)
    assert (b.steerer().gate_scale, b.steerer().image_gate_scale) == (2.5, 7.25)
    assert "per-image gate unit: 7.25" in dictionary.summary(back)


@pytest.mark.parametrize("value", [0, -1.0, "big", math.inf, True])
def test_bad_image_gate_unit(good, tmp_path, value):
    _, tensors, meta = good
    meta["positions"]["double.0.img"]["image_gate_scale"] = value
    expect_error(write(tmp_path, tensors, meta), "position double.0.img", "'image_gate_scale' must be a positive number")


def test_per_image_defaults_load(good, tmp_path):
    _, tensors, meta = good
    meta["steering_defaults"] = {"repel": 1.0, "gate": "image", "detect": "text"}
    cfg = dictionary.load(write(tmp_path, tensors, meta)).default_config()
    assert (cfg.gate, cfg.detect) == ("image", "text")
    meta["steering_defaults"] = {"gate": "token", "detect": "text"}
    expect_error(write(tmp_path, tensors, meta, "bad2.safetensors"), "bad steering defaults", "needs gate='image'")
