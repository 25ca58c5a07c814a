"""`python -m safedig_core inspect FILE` as a user runs it: a summary and exit 0 for a good file; for a bad
one, a non-zero exit and exactly one line on stderr naming the file and the problem, never a traceback.
A few subprocesses (each pays about 3 CPU-seconds for importing torch) start together once per module;
the rest of the bad files go through the same `cli.main` in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from safedig_core.cli import main
from safedig_core.formats import dictionary
from safedig_core.formats.dictionary import DictionaryEntry, SafetyDictionary
from safedig_core.positions import parse
from safedig_core.sae import SparseAutoencoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def good_dictionary() -> SafetyDictionary:
    g = torch.Generator().manual_seed(0)
    entries = {}
    for name, d, latents, act, harmful in [("double.2.img", 24, 64, "topk", [7, 3, 50]),
                                           ("single.10.txt", 24, 96, "jumprelu", [1]),
                                           ("double.0.txt", 24, 48, "topk", [])]:
        p = parse(name)
        sae = SparseAutoencoder.init_random(d, latents, 8, scale=0.5, generator=g)
        if act == "jumprelu":
            sae.activation = "jumprelu"
        entries[p] = DictionaryEntry(p, sae, harmful, [0.9 - 0.1 * i for i in range(len(harmful))],
                                     metrics={"fvu": 0.25} if harmful else {})
    return SafetyDictionary("flux", entries, {"blend": 1.0, "repel": 0.5}, {"made_by": "cli test"})


def bad_files(folder: str, good: str) -> dict[str, tuple[str, str]]:
    """name -> (path, a fragment the error must contain)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(good, "pt") as f:
        meta = json.loads(f.metadata()["safedig"])
    tensors = load_file(good)
    out = {}

    def put(name, tensors, metadata):
        path = os.path.join(folder, name + ".safetensors")
        save_file(tensors, path, metadata=metadata)
        return path

    path = os.path.join(folder, "random.safetensors")
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 3)
    out["random"] = (path, "not a safetensors file")
    out["no-meta"] = (put("no-meta", {"w": torch.zeros(2)}, None), "not a SafeDIG dictionary")
    out["bad-json"] = (put("bad-json", tensors, {"safedig": "{oops"}), "not valid JSON")
    m = dict(meta, format_version=9)
    out["version"] = (put("version", tensors, {"safedig": json.dumps(m)}), "unknown format version 9")
    t = dict(tensors)
    del t["single.10.txt.threshold"]
    out["missing"] = (put("missing", t, {"safedig": json.dumps(meta)}), "missing tensor 'single.10.txt.threshold'")
    t = dict(tensors)
    t["double.2.img.b_dec"] = torch.full((24,), float("nan"))
    out["nan"] = (put("nan", t, {"safedig": json.dumps(meta)}), "NaN or Inf")
    m = json.loads(json.dumps(meta))
    m["positions"]["double.2.img"]["metrics"] = ["not", "an", "object"]
    out["metrics"] = (put("metrics", tensors, {"safedig": json.dumps(m)}), "'metrics' must be a JSON object")
    out["absent"] = (os.path.join(folder, "absent.safetensors"), "no such file")
    return out


def start(*files: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "safedig_core", "inspect", *files], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("cli"))
    good = os.path.join(folder, "good.safetensors")
    dictionary.save(good_dictionary(), good)
    bad = bad_files(folder, good)
    jobs = {"good": (start(good), good, None)}
    jobs.update({name: (start(bad[name][0]), *bad[name]) for name in SUBPROCESS})
    results = {}
    for name, (proc, path, frag) in jobs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err, path, frag)
    return results, good, bad


SUBPROCESS = ["random", "metrics"]  # "metrics" once ended in a traceback


def test_good_file_prints_the_summary(runs):
    rc, out, err, path, _ = runs[0]["good"]
    assert rc == 0, err
    assert "Traceback" not in err
    lines = out.splitlines()
    assert lines[0] == f"SafeDIG dictionary {path}"
    assert "family FLUX" in out and "3 position(s)" in out
    assert "blend=1.0" in out and "made_by=cli test" in out
    table = {ln.split()[0]: ln.split() for ln in lines if ln.strip() and ln.split()[0][:1] in "ds"}
    # position, width, latents, k, activation, scale, gate unit, harmful count, top latents
    assert table["double.2.img"][1:8] == ["24", "64", "8", "topk", "0.5", "1", "3"]
    assert table["double.2.img"][8] == "7(0.90)"
    assert table["single.10.txt"][1:3] == ["24", "96"] and table["single.10.txt"][4] == "jumprelu"
    assert table["single.10.txt"][7] == "1"
    assert table["double.0.txt"][7] == "0" and table["double.0.txt"][8] == "-"
    order = [ln.split()[0] for ln in lines[1:] if ln.startswith("  ") and ln.split()[0] in table]
    order = [name for name in order if name[:1] in "ds" and "." in name]
    assert order == ["double.0.txt", "double.2.img", "single.10.txt"], "positions are listed in order"
    assert "fvu=0.25" in out


def check_one_line_error(rc, out, err, path, frag):
    assert rc != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("safedig inspect: error: ")
    assert path in lines[0] and frag in lines[0], lines[0]
    assert out == ""


@pytest.mark.parametrize("name", SUBPROCESS)
def test_bad_file_subprocess(runs, name):
    check_one_line_error(*runs[0][name])


@pytest.mark.parametrize("name", ["random", "no-meta", "bad-json", "version", "missing", "nan", "metrics", "absent"])
def test_bad_file_in_process(runs, capsys, name):
    path, frag = runs[2][name]
    rc = main(["inspect", path])
    captured = capsys.readouterr()
    check_one_line_error(rc, captured.out, captured.err, path, frag)


def test_good_then_bad_prints_the_good_summary_and_fails(runs, capsys):
    good, bad = runs[1], runs[2]["nan"][0]
    rc = main(["inspect", good, bad])
    captured = capsys.readouterr()
    assert rc != 0
    assert captured.out.startswith(f"SafeDIG dictionary {good}") and "family FLUX" in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and bad in lines[0] and "NaN or Inf" in lines[0]
