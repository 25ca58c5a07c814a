"""`safedig plot features|routing|grid`: valid PNGs written atomically, labels from eval CSVs, one-line errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import make_dictionary
from PIL import Image

from safedig_core import cli
from safedig_core.evaluation import plots
from safedig_core.formats.dictionary import save
from safedig_core.pipeline.routing import PositionScore, RoutingReport
from safedig_core.testbed import world


def run_cli(args, capsys):
    rc = cli.main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def check_png(path, size=None):
    with Image.open(path) as im:
        assert im.format == "PNG"
        if size:
            assert im.size == size
        im.verify()
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".")]  # no temporary file left


def test_features(tmp_path, capsys):
    d = make_dictionary("flux", 32, ["double.0.img", "single.1.img", "double.1.txt"], harmful=12)
    first, second = (d.entries[p] for p in d.positions[:2])  # double.0.img, double.1.txt
    first.gate_scale, first.metrics = 2.5, {"fvu": 0.12, "l0": 31.0, "dead_frac": 0.2, "harmful_by_category": {"a": 3}}
    second.harmful, second.scores = [], []
    e = first
    path = tmp_path / "d.safetensors"
    save(d, str(path))
    out = tmp_path / "pics" / "features.png"
    rc, stdout, err = run_cli(["plot", "features", str(path), "--out", str(out)], capsys)
    assert rc == 0, err
    assert stdout.strip() == f"wrote {out}"
    check_png(str(out))
    fig = plots.features_figure(d)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles[0].startswith("double.0.img: 12 harmful of 96 latents, gate_scale 2.5, fvu=0.12, l0=31")
    assert "double.1.txt: 0 harmful" in titles[1]
    labels = [t.get_text() for t in fig.axes[0].texts]
    top = [f"#{j}" for _, j in sorted(zip(e.scores, e.harmful), reverse=True)[:8]]
    assert labels == top  # the highest-scoring latents, best first, labelled by index


def report() -> RoutingReport:
    def score(name, stream, depth, r):
        group = "visual_binding" if stream == "img" else "text_binding"
        return PositionScore(name, stream, group, depth, int(depth * 3), r, r, r - 0.1, 0.6, 0.7, 0.5, r + 0.05,
                             {"a": r}, True, 100, 20)

    return RoutingReport("flux", 2, {"w_transfer": 0.5, "w_stability": 0.25, "w_separability": 0.25},
                         "leave-one-category-out", {"a": 10, "b": 10}, 20, [[0, 1]],
                         [score("double.0.img", "img", 0.0, 0.8), score("double.1.txt", "txt", 0.33, 0.6),
                          score("single.0.img", "img", 0.66, 0.7)],
                         ["double.0.img", "single.0.img"], [], "double.0.img")


def test_routing_full_report_and_scores_only(tmp_path, capsys):
    js = tmp_path / "routing.json"
    js.write_text(report().to_json())
    out = tmp_path / "routing.png"
    rc, stdout, err = run_cli(["plot", "routing", str(js), "--out", str(out)], capsys)
    assert rc == 0 and stdout.strip() == f"wrote {out}", err
    check_png(str(out))
    with Image.open(out) as im:
        assert im.size[0] > 1000  # routing.plot_report's wide figure, not the fallback
    partial = tmp_path / "partial.json"  # an older or hand-made report: names and some scores only
    scores = [{"name": "joint.3.img", "R": 0.7, "T": 0.6}, {"name": "joint.5.img", "R": 0.4}]
    partial.write_text(json.dumps({"scores": scores, "selected": ["joint.3.img"]}))
    out2 = tmp_path / "partial.png"
    rc, stdout, err = run_cli(["plot", "routing", str(partial), "--out", str(out2)], capsys)
    assert rc == 0, err
    check_png(str(out2))


def render(concept, seed, size=32):
    img = Image.fromarray((world.render(concept, "white", seed).transpose(1, 2, 0) * 255).round().astype(np.uint8))
    return img.resize((size, size), Image.NEAREST)


RED = (220, 20, 20)


def red_pixels(path):
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"))
    return int((a == RED).all(-1).sum())


def test_grid_pairs_by_name_and_marks_unsafe_from_eval_csvs(tmp_path, capsys):
    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir(), after.mkdir()
    for i, c in enumerate(["fire", "gun", "ball"]):
        render(c, i).save(before / f"p{i}.png")
        render("tree" if c != "ball" else "ball", i, size=48).save(after / f"p{i}.png")  # steered: risks gone
    render("sun", 9).save(before / "only_before.png")
    out = tmp_path / "grid.png"
    rc, stdout, err = run_cli(["plot", "grid", str(before), str(after), "--out", str(out), "--cols", "2"], capsys)
    assert rc == 0, err
    assert "skipped 1 image(s) found in only one folder: only_before.png" in stdout and f"wrote {out}" in stdout
    check_png(str(out))
    assert red_pixels(str(out)) == 0
    csvs = []
    for name, folder in (("b.csv", before), ("a.csv", after)):
        csvs.append(str(tmp_path / name))
        assert cli.main(["eval", "--detector", "testbed", str(folder), "--csv", csvs[-1]]) == 0
    capsys.readouterr()
    labelled = tmp_path / "labelled.png"
    rc, _, err = run_cli(["plot", "grid", str(before), str(after), "--out", str(labelled), "--cols", "2",
                          "--labels", *csvs], capsys)
    assert rc == 0, err
    frame = 4 * 3 * (128 + 3)  # one 3-pixel frame around a 128-pixel cell
    assert red_pixels(str(labelled)) == pytest.approx(2 * frame, rel=0.05)  # fire and gun before; nothing after


def test_grid_same_names_in_one_csv_are_told_apart_by_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("before"), os.makedirs("after")
    render("fire", 1).save("before/x.png")
    render("ball", 1).save("after/x.png")
    assert cli.main(["eval", "--detector", "testbed", "before", "after", "--csv", "both.csv"]) == 0
    capsys.readouterr()
    lookup = plots._label_lookup(["both.csv"])
    assert plots._verdict(lookup, "before/x.png") is True and plots._verdict(lookup, "after/x.png") is False
    assert "x.png" not in lookup  # the bare name is ambiguous


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    a, b, empty = tmp_path / "a", tmp_path / "b", tmp_path / "empty"
    for d in (a, b, empty):
        d.mkdir()
    render("ball", 0).save(a / "one.png")
    render("ball", 0).save(b / "two.png")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    out = str(tmp_path / "o.png")
    cases = [
        (["features", str(tmp_path / "missing.safetensors")], "features", ""),
        (["features", str(tmp_path / "junk.safetensors")], "features", "junk.safetensors"),
        (["routing", str(tmp_path / "missing.json")], "routing", "no such routing report"),
        (["routing", str(tmp_path / "bad.json")], "routing", "is not JSON"),
        (["routing", str(tmp_path / "other.json")], "routing", "is not a routing report"),
        (["grid", str(a), str(b)], "grid", "share no image file names"),
        (["grid", str(a), str(tmp_path / "nope")], "grid", "no such folder"),
        (["grid", str(a), str(empty)], "grid", "holds no png/jpg/jpeg/webp images"),
        (["grid", str(a), str(a), "--labels", str(tmp_path / "bad.csv")], "grid", "is not a `safedig eval` CSV"),
        (["grid", str(a), str(a), "--labels", str(tmp_path / "none.csv")], "grid", "no such eval CSV"),
    ]
    for args, _, message in cases:
        rc, _, err = run_cli(["plot", *args, "--out", out], capsys)
        assert rc == 2, args
        assert err.count("\n") == 1 and err.startswith("safedig plot: error: ") and message in err, err
    assert not os.path.exists(out)
