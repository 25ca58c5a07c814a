"""Hostile dictionary and prompt files: mutated at random (hypothesis) and built to hurt (huge declared
sizes, deep or huge metadata, values that break steering). Each gives one line naming the file, or a valid
load whose steering is finite; nothing allocates what the file only claims."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, make_dictionary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from safedig_core.formats import dictionary
from safedig_core.formats.dictionary import DictionaryError
from safedig_core.formats.prompts import PromptError, load_prompts
from safedig_core.steering import SteeringConfig

POSITIONS = ["double.0.img", "single.1.img"]
WIDTH = 8
FUZZ = settings(max_examples=int(os.environ.get("SAFEDIG_FUZZ_EXAMPLES", "120")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def good_file(folder) -> tuple[bytes, dict, dict]:
    path = os.path.join(folder, "good.safetensors")
    d = make_dictionary("flux", WIDTH, POSITIONS, latents=16, k=4, harmful=3)
    d.entries[dictionary.parse(POSITIONS[0])].safe_values = [0.5, 0.0, 1.0]
    dictionary.save(d, path)
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["safedig"])
    return open(path, "rb").read(), load_file(path), meta


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return good_file(str(tmp_path_factory.mktemp("good")))


def write(folder, tensors, meta_text: str, name="hostile.safetensors") -> str:
    path = os.path.join(folder, name)
    save_file(tensors, path, metadata={"safedig": meta_text})
    return path


def holds(path: str) -> None:
    """One line naming the file, or a dictionary whose steering of ordinary tokens is finite."""
    try:
        d = dictionary.load(path)
    except DictionaryError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith(path) and len(msg) < len(path) + 400, msg
        return
    cfg = SteeringConfig(blend=1.0, repel=1.0, threshold=0.0)
    x = torch.randn(5, WIDTH, generator=torch.Generator().manual_seed(0)) * 3
    for e in d.entries.values():
        s = e.steerer()
        assert torch.isfinite(s.harmful_mass(x)).all()
        assert torch.isfinite(s.steer(x, cfg)).all(), f"{e.position}: steering gave NaN/Inf"


@FUZZ
@given(data=st.data())
def test_byte_mutations(good, tmp_path, data):
    raw = bytearray(good[0])
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        # half the edits land in the 8-byte length and the JSON header, where the parsing happens
        limit = min(len(raw) - 1, 8 + int.from_bytes(raw[:8], "little")) if data.draw(st.booleans()) else len(raw) - 1
        at = data.draw(st.integers(0, max(0, min(limit, len(raw) - 1))))
        if kind == "flip" and raw:
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and raw:
            raw[at] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del raw[at:]
        elif kind == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del raw[at:at + data.draw(st.integers(1, 16))]
    path = str(tmp_path / "mutated.safetensors")
    with open(path, "wb") as f:
        f.write(bytes(raw))
    holds(path)


HOSTILE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1e-30, 1e30, 1e300, 10 ** 9, 8 * 10 ** 6, 3 * 10 ** 6, "nan", "1", "", [], {}]),
    st.text(max_size=20), st.lists(st.integers(-5, 20), max_size=5), st.lists(st.lists(st.integers(-2, 20), max_size=3),
                                                                               max_size=4))


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(data=st.data())
def test_metadata_mutations(good, tmp_path, data):
    _, tensors, meta = good
    meta = json.loads(json.dumps(meta))
    paths = [p for p in _paths(meta) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(paths))
        node = meta
        for key in where[:-1]:
            node = node[key]
        if data.draw(st.booleans()) or not isinstance(node, dict):
            node[where[-1]] = data.draw(HOSTILE_VALUES)
        else:
            del node[where[-1]]
        paths = [p for p in _paths(meta) if p]
        if not paths:
            break
    holds(write(str(tmp_path), tensors, json.dumps(meta, allow_nan=True)))


@FUZZ
@given(data=st.data())
def test_tensor_mutations(good, tmp_path, data):
    _, tensors, meta = good
    tensors = dict(tensors)
    key = data.draw(st.sampled_from(sorted(tensors)))
    t = tensors[key].clone()
    kind = data.draw(st.sampled_from(["value", "shape", "dtype", "drop", "extra"]))
    if kind == "value":
        t.view(-1)[data.draw(st.integers(0, t.numel() - 1))] = data.draw(
            st.sampled_from([float("nan"), float("inf"), 1e30, -1e30, 1e6, 1e5, 0.0]))
        tensors[key] = t
    elif kind == "shape":
        tensors[key] = torch.zeros(*[data.draw(st.integers(1, 20)) for _ in range(data.draw(st.integers(1, 3)))])
    elif kind == "dtype":
        tensors[key] = t.to(data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32])))
    elif kind == "drop":
        del tensors[key]
    else:
        tensors[key + "x"] = t
    holds(write(str(tmp_path), tensors, json.dumps(meta)))


@pytest.mark.parametrize("key, value, fragment", [
    ("scale", 1e-30, "activation scale must be a positive number in [1e-06, 1e+06] (key 'scale')"),
    ("scale", 1e30, "(key 'scale')"),
    ("gate_scale", 1e-300, "(key 'gate_scale')"),
    ("safe_values", [1e30, 0.0, 0.0], "'safe_values' must be a list of finite numbers of magnitude at most"),
])
def test_values_that_break_steering_name_file_position_and_key(good, tmp_path, key, value, fragment):
    _, tensors, meta = good
    meta = json.loads(json.dumps(meta))
    meta["positions"][POSITIONS[0]][key] = value
    path = write(str(tmp_path), tensors, json.dumps(meta))
    with pytest.raises(DictionaryError) as e:
        dictionary.load(path)
    assert str(e.value).startswith(f"{path}: position {POSITIONS[0]}: ") and fragment in str(e.value), e.value


@pytest.mark.parametrize("tensor", ["W_enc", "W_dec", "b_enc", "b_dec"])
def test_huge_weights_are_refused(good, tmp_path, tensor):
    _, tensors, meta = good
    key = f"{POSITIONS[1]}.{tensor}"
    tensors = {**tensors, key: tensors[key].clone().fill_(3e5)}
    with pytest.raises(DictionaryError, match=rf"tensor '{key}' has a value of magnitude 3e\+05"):
        dictionary.load(write(str(tmp_path), tensors, json.dumps(meta)))


def test_metadata_size_and_nesting_are_bounded(good, tmp_path):
    _, tensors, meta = good
    deep = dict(meta, provenance={"x": "[" * 50_000 + "]" * 50_000})  # inside a string: no nesting
    dictionary.load(write(str(tmp_path), tensors, json.dumps(deep), "string.safetensors"))
    text = json.dumps(meta)[:-1] + ', "metrics": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(DictionaryError, match="nested 100001 levels deep"):
        dictionary.load(write(str(tmp_path), tensors, text, "deep.safetensors"))
    big = dict(meta, provenance={"x": "a" * (dictionary.MAX_METADATA_BYTES + 1)})
    with pytest.raises(DictionaryError, match="metadata of .* bytes is over the limit"):
        dictionary.load(write(str(tmp_path), tensors, json.dumps(big), "big.safetensors"))


MEMORY_PROBE = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import torch
from safetensors.torch import save_file
from safedig_core.formats import dictionary
latents, path = int(sys.argv[2]), sys.argv[3]
meta = {"format_version": 1, "family": "flux", "positions": {"double.0.img": {
    "width": 64, "latents": latents, "k": 4, "activation": "topk", "scale": 1.0, "harmful": [[0, 1.0]]}}}
t = {"double.0.img.W_enc": torch.zeros(16, 64), "double.0.img.b_enc": torch.zeros(16),
     "double.0.img.W_dec": torch.zeros(16, 64), "double.0.img.b_dec": torch.zeros(64)}
save_file(t, path, metadata={"safedig": json.dumps(meta)})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    dictionary.load(path)
    print("LOADED")
except dictionary.DictionaryError as e:
    print("ERROR", e)
print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.parametrize("latents, fragment", [
    (10 ** 9, "'latents' must be an integer in 1..4194304"),
    (8 * 10 ** 6, "'latents' must be an integer in 1..4194304"),
    (3 * 10 ** 6, "tensor 'double.0.img.W_enc' has shape [16, 64], expected [3000000, 64]"),  # 0.7 GB per matrix
])
def test_declared_sizes_are_checked_before_allocating(tmp_path, latents, fragment):
    """A 34 KB file declaring millions of latents: refused by name, with no allocation of the claimed size."""
    path = str(tmp_path / "claims.safetensors")
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, REPO, str(latents), path], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"ERROR {path}: ") and fragment in lines[0], lines
    growth_mb = int(lines[1].split()[1]) / 1024
    assert growth_mb < 64, f"loading grew the process by {growth_mb:.0f} MB"


def test_save_keeps_the_umask_permissions(tmp_path):
    d = make_dictionary("flux", WIDTH, POSITIONS[:1], latents=16, k=4)
    old = os.umask(0o022)
    try:
        dictionary.save(d, str(tmp_path / "a.safetensors"))
        os.umask(0o077)
        dictionary.save(d, str(tmp_path / "b.safetensors"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "b.safetensors").st_mode & 0o777 == 0o600


# ------------------------------------------------------------------------------------------ prompt files

GOOD_CSV = ("prompt,label,category,domain,seed\n"
            "a calm lake,safe,,source,1\n\"fire, smoke\",unsafe,fire,source,\nquiet field,safe,,target,3\n")
GOOD_JSONL = "".join(json.dumps(r) + "\n" for r in [
    {"prompt": "a calm lake", "label": "safe"}, {"prompt": "fire", "label": "unsafe", "category": "fire", "seed": 2},
    {"prompt": "a meadow", "label": False, "domain": "target"}])


def prompt_holds(path: str) -> None:
    try:
        records = load_prompts(path)
    except PromptError as e:
        assert "\n" not in str(e) and "\n" not in e.public and len(e.public) < 300, str(e)
        assert path not in e.public
        return
    assert records and all(r.prompt.strip() and r.label in ("safe", "unsafe") for r in records)
    assert all(r.category for r in records if r.label == "unsafe")


@FUZZ
@given(data=st.data(), ext=st.sampled_from([".csv", ".jsonl"]))
def test_prompt_file_mutations(tmp_path, data, ext):
    raw = bytearray((GOOD_CSV if ext == ".csv" else GOOD_JSONL).encode())
    for _ in range(data.draw(st.integers(1, 5))):
        at = data.draw(st.integers(0, len(raw)))
        piece = data.draw(st.one_of(
            st.binary(max_size=6),
            st.sampled_from([b",", b"\"", b"\n", b"\x00", b"\xff", b"{", b"[" * 5000, b"1e400", b"-1", b"unsafe",
                             b'"seed": 1e300', b'{"prompt": {"a": 1}}', b"\t", b"\r"])))
        raw[at:at + data.draw(st.integers(0, 3))] = piece
    path = str(tmp_path / f"p{ext}")
    with open(path, "wb") as f:
        f.write(bytes(raw))
    prompt_holds(path)


def test_deep_json_and_huge_cells_are_one_line(tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"prompt": "x", "label": "safe", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(PromptError, match="line 1: JSON nested too deeply"):
        load_prompts(str(deep))
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"prompt": "x", "label": "s" * 1_000_000}) + "\n")
    with pytest.raises(PromptError) as e:
        load_prompts(str(huge))
    assert len(str(e.value)) < 300 and "sss" not in e.value.public
