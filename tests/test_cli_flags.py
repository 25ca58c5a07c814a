"""Every `safedig` flag is checked where argparse reads it: a bad value costs nothing (no file made, no
model loaded, no store opened) and gives one short line naming the flag and what it takes."""
from __future__ import annotations

import argparse
import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safedig_core import cli
from safedig_core.cli import args as A

HUGE = "9" * 5000


def subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in subparsers(sub))


def test_no_flag_takes_a_bare_int_or_float():
    """Every typed flag goes through safedig_core.cli.args (ranges, finiteness), none through int/float."""
    bare = [(name, a.dest) for name, sub in subparsers(cli.build_parser()) for a in sub._actions
            if a.type in (int, float)]
    assert not bare, f"flags read with a bare int/float (no range, NaN accepted): {bare}"


def run(argv, capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    return code, err


def one_line(err: str, command: str) -> str:
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith(f"safedig {command}: error:"), err
    assert len(last) <= 400, f"{len(last)} characters: {last[:200]}"
    return last


OUT, STORE, TMP = "{tmp}/d.safetensors", "{tmp}/no_store", "{tmp}"
TINY = ["collect", "--prompts", "p.csv", "--out", "{tmp}/s", "--tiny", "flux"]
CASES = [  # (argv, command in the message, what the message must say)
    (["build", STORE, "--out", OUT, "--steps", "0"], "build", "--steps: 0 is out of range"),
    (["build", STORE, "--out", OUT, "--expansion", "0"], "build", "--expansion: 0 is out of range"),
    (["build", STORE, "--out", OUT, "--expansion", "1000000"], "build", "--expansion: 1000000 is out of range"),
    (["build", STORE, "--out", OUT, "-k", "-3"], "build", "-k: -3 is out of range"),
    (["build", STORE, "--out", OUT, "--device", "warp9"], "build", "--device: 'warp9' is not a device"),
    (["build", STORE, "--out", OUT, "--device", "cuda:7"], "build", "--device: cuda:7"),
    (["build", STORE, "--out", TMP], "build", "is a folder; give a file name"),
    (["build", STORE, "--out", OUT, "--batch-size", HUGE], "build", "--batch-size"),
    (["train", STORE, "--lr", "inf"], "train", "--lr: inf is not allowed"),
    (["train", STORE, "--lr", "0"], "train", "--lr: 0 is out of range"),
    (["train", STORE, "--steps", "1.5"], "train", "--steps: '1.5' is not an integer"),
    (["train", STORE, "--harmful-threshold", "nan"], "train", "--harmful-threshold: nan is not allowed"),
    (["adapt", "d.safetensors", STORE, "--out", OUT, "--anchor", "-1"], "adapt", "--anchor: -1 is out of range"),
    (["adapt", "d.safetensors", STORE, "--out", OUT, "--lr", "nan"], "adapt", "--lr: nan is not allowed"),
    (["route", STORE, "--out", TMP, "--weights", "1,nan,2"], "route", "--weights: nan is not allowed"),
    (["route", STORE, "--out", TMP, "--weights", "1,2"], "route", "expected 3 comma-separated numbers"),
    (["route", STORE, "--out", TMP, "--top", "0"], "route", "--top: 0 is out of range"),
    (["eval", TMP, "--detector", "testbed", "--threshold", "2"], "eval", "--threshold: 2 is out of range"),
    (["plot", "grid", "a", "b", "--cols", "0"], "plot grid", "--cols: 0 is out of range"),
    (TINY + ["--cfg", "nan"], "collect", "--cfg: nan is not allowed"),
    (TINY + ["--width", "0"], "collect", "--width: 0 is out of range"),
    (TINY + ["--steps", "0"], "collect", "--steps: 0 is out of range"),
    (TINY + ["--guidance=-inf"], "collect", "--guidance: -inf is not allowed"),
    (TINY + ["--positions", "x" * 10 ** 6], "collect", ""),  # a megabyte argument: the line stays short
    (["collect", "--prompts", "p.csv", "--out", "{tmp}/blocker", "--tiny", "flux"], "collect", "is a file; give a folder"),
]


@pytest.mark.parametrize("argv, command, fragment", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_bad_flag_is_one_short_line_and_costs_nothing(argv, command, fragment, tmp_path, capsys):
    (tmp_path / "blocker").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before = sorted(os.listdir(tmp_path))
    code, err = run(argv, capsys)
    assert code == 2, err
    assert fragment in one_line(err, command), err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


@pytest.mark.comfy
def test_unknown_sampler_and_scheduler(comfy, tmp_path, capsys):
    base = ["collect", "--prompts", "p.csv", "--out", str(tmp_path / "s"), "--tiny", "flux"]
    code, err = run(base + ["--sampler", "eulr"], capsys)
    assert code == 2 and "--sampler: unknown sampler 'eulr' (ComfyUI's are: euler" in one_line(err, "collect")
    code, err = run(base + ["--scheduler", "nope"], capsys)
    assert code == 2 and "--scheduler: unknown scheduler 'nope'" in one_line(err, "collect")


def test_build_refuses_an_existing_file_before_opening_the_store(tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    out.write_bytes(b"mine")
    code, err = run(["build", str(tmp_path / "missing"), "--out", str(out)], capsys)
    assert code == 2 and "already exists; pass --overwrite" in one_line(err, "build")
    code, err = run(["build", str(tmp_path / "missing"), "--out", str(out), "--overwrite"], capsys)
    assert code == 2 and "no such activation store folder" in one_line(err, "build")
    assert out.read_bytes() == b"mine"


def test_output_paths_checked_before_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file, not a folder"):
        A.output_file(str(blocker / "sub" / "d.safetensors"))
    with pytest.raises(argparse.ArgumentTypeError, match="is a file; give a folder"):
        A.output_dir(str(blocker))
    assert A.output_file(str(tmp_path / "new" / "deeper" / "d.safetensors"))  # made later, when written
    assert not (tmp_path / "new").exists()
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(argparse.ArgumentTypeError, match="cannot write"):
            A.output_file(str(ro / "d.safetensors"))


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=40), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                 st.integers(-10 ** 30, 10 ** 30).map(str)))
def test_number_types_accept_only_what_they_say(text):
    for parse, lo, hi in ((A.integer(1, 100), 1, 100), (A.number(0.0, 1.0), 0.0, 1.0), (A.LR, 0.0, 1.0)):
        try:
            v = parse(text)
        except argparse.ArgumentTypeError as e:
            assert "\n" not in str(e) and len(str(e)) < 200
            continue
        assert math.isfinite(v) and lo <= v <= hi and (parse is not A.LR or v > 0)
