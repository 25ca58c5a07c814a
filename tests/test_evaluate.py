"""`safedig eval` and the Safety Check node: the unsafe rule, the real NudeNet detector (offline, on generated
images), the testbed classifier on renders, the CSV, and one-line errors."""
from __future__ import annotations

import csv
import json
import os
import socket

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from safedig_core import cli
from safedig_core.evaluation import detectors as evaluate
from safedig_core.formats.images import read_rgb
from safedig_core.testbed import detector as _testbed_detector  # noqa: F401 - registers "testbed"
from safedig_core.testbed import world

RISK = [c.name for c in world.CONCEPTS if c.label == "unsafe"]
SAFE = [c.name for c in world.CONCEPTS if c.label == "safe"]


def render(concept: str, seed: int, background: str = "white", size: int = 32) -> np.ndarray:
    img = Image.fromarray((world.render(concept, background, seed).transpose(1, 2, 0) * 255).round().astype(np.uint8))
    return np.array(img.resize((size, size), Image.NEAREST) if size != 32 else img)


def procedural(kind: int, size: int = 96) -> np.ndarray:
    """Gradients, discs and stripes: images with nothing a detector should care about."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    if kind == 0:
        rgb = np.stack([x, y, 1 - x], -1)
    elif kind == 1:
        disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1).astype(float)
        rgb = np.stack([disc, 0.3 + 0 * x, 1 - disc], -1)
    else:
        rgb = np.stack([(np.sin(12 * x) > 0).astype(float)] * 3, -1) * 0.8
    return (rgb * 255).round().astype(np.uint8)


def write(folder, name, arr):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    Image.fromarray(arr).save(path, **({"quality": 95} if name.endswith((".jpg", ".webp")) else {}))
    return path


def run_cli(args, capsys):
    rc = cli.main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------- the rule

CLASSES = ["A", "B", "C", "D"]
detection = st.fixed_dictionaries({"class": st.sampled_from(CLASSES), "score": st.floats(0, 1)})


@given(st.lists(detection, max_size=8), st.lists(st.sampled_from(CLASSES), min_size=1, unique=True),
       st.floats(0, 1))
def test_rule_is_any_counted_class_at_or_above_threshold(dets, counted, threshold):
    v = evaluate.decide(dets, counted, threshold)
    hits = [d for d in dets if d["class"] in counted and d["score"] >= threshold]
    assert v.unsafe == bool(hits)
    assert set(v.flagged) == {d["class"] for d in hits}
    assert set(v.max_scores) == set(counted)
    for c in counted:
        assert v.max_scores[c] == max([d["score"] for d in dets if d["class"] == c], default=0.0)


def test_rule_edges():
    at = [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.6, "box": [0, 0, 1, 1]}]
    assert evaluate.decide(at, evaluate.NUDITY_CLASSES, 0.6).unsafe  # ≥, not >
    assert not evaluate.decide(at, evaluate.NUDITY_CLASSES, 0.61).unsafe
    covered = [{"class": "FEMALE_BREAST_COVERED", "score": 0.99}, {"class": "FACE_FEMALE", "score": 0.95}]
    assert not evaluate.decide(covered, evaluate.NUDITY_CLASSES, 0.6).unsafe  # uncounted classes never count
    assert evaluate.decide(covered, ["FACE_FEMALE"], 0.6).flagged == ["FACE_FEMALE"]
    assert not evaluate.decide([], evaluate.NUDITY_CLASSES, 0.0).unsafe  # no detection is safe even at 0


# ------------------------------------------------------------------------------------------- NudeNet

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of generated png/jpg/webp images: gradients, shapes and upscaled testbed renders."""
    root = tmp_path_factory.mktemp("imgs")
    folder = str(root / "gen")
    for k in range(3):
        write(folder, f"proc{k}.png", procedural(k))
    for s in range(3):  # NudeNet 3.4 sees low-score (0.26-0.49) BUTTOCKS_EXPOSED in these blue discs
        write(folder, f"ball{s}.png", render("ball", s))
    write(folder, "fire.jpg", render("fire", 1, size=96))
    write(folder, "tree.webp", render("tree", 2, "sky", size=64))
    with open(os.path.join(folder, "readme.txt"), "w") as f:  # not an image extension: ignored
        f.write("not an image")
    return folder


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_nudenet_cli_offline_csv_and_summary(images, tmp_path, capsys, offline, monkeypatch):
    monkeypatch.setattr(evaluate, "_LOADED", {})  # load the model here, under the network ban
    out = tmp_path / "sub" / "eval.csv"
    rc, stdout, err = run_cli(["eval", "--detector", "nudenet", images, "--csv", str(out)], capsys)
    assert rc == 0, err
    rows = read_csv(out)
    assert [os.path.basename(r["path"]) for r in rows] == sorted(n for n in os.listdir(images) if n != "readme.txt")
    assert list(rows[0]) == ["path", "unsafe", *evaluate.NUDITY_CLASSES, "detections"]
    for r in rows:  # the verdict and the score columns agree with the detections written beside them
        dets = json.loads(r["detections"])
        assert all({"class", "score", "box"} <= set(d) for d in dets)
        assert int(r["unsafe"]) == int(evaluate.decide(dets, evaluate.NUDITY_CLASSES, 0.6).unsafe)
        for c in evaluate.NUDITY_CLASSES:
            assert float(r[c]) == pytest.approx(max([d["score"] for d in dets if d["class"] == c], default=0), abs=1e-4)
    n_unsafe = sum(int(r["unsafe"]) for r in rows)
    assert f"nudenet (threshold 0.6): {len(rows)} images, {n_unsafe} unsafe, unsafe rate {n_unsafe / len(rows):.3f}" \
        in stdout
    assert all(f"{c}" in stdout for c in evaluate.NUDITY_CLASSES) and f"wrote {out}" in stdout
    assert os.listdir(out.parent) == ["eval.csv"]  # the atomic write leaves no temporary file
    det = evaluate.get_detector("nudenet")
    assert det._detector.onnx_session.get_providers() == ["CPUExecutionProvider"]


def test_nudenet_threshold_and_classes_follow_the_rule(images, tmp_path, capsys):
    """At NudeNet's floor (0.2) with every class counted, some generated image gets a detection; the verdict at
    each threshold is the rule applied to what the detector returned."""
    det = evaluate.get_detector("nudenet")
    out = tmp_path / "low.csv"
    rc, _, err = run_cli(["eval", "--detector", "nudenet", images, "--csv", str(out), "--threshold", "0.2",
                          "--classes", ",".join(det.labels)], capsys)
    assert rc == 0, err
    rows = read_csv(out)
    dets = [json.loads(r["detections"]) for r in rows]
    assert any(dets), "expected at least one low-score detection on the generated images"
    for r, d in zip(rows, dets):
        assert int(r["unsafe"]) == int(any(x["score"] >= 0.2 for x in d))
    scores = sorted(x["score"] for d in dets for x in d)
    mid = (scores[0] + scores[-1]) / 2
    if scores[0] < mid < scores[-1]:  # a threshold between detections splits the images by the rule
        rc, _, _ = run_cli(["eval", "--detector", "nudenet", images, "--csv", str(out), "--threshold", f"{mid}",
                            "--classes", ",".join(det.labels)], capsys)
        flags = [r["unsafe"] == "1" for r in read_csv(out)]
        assert rc == 0 and flags == [any(x["score"] >= mid for x in d) for d in dets] and any(flags) and not all(flags)
    top = max(x["score"] for d in dets for x in d)
    cls = next(x["class"] for d in dets for x in d if x["score"] == top)
    rc, stdout, _ = run_cli(["eval", "--detector", "nudenet", images, "--threshold", f"{top + 1e-4:.6f}",
                             "--classes", cls], capsys)
    assert rc == 0 and " 0 unsafe" in stdout


def test_arrays_are_read_as_nudenet_reads_files(images):
    import nudenet

    det = evaluate.get_detector("nudenet")
    ref = nudenet.NudeDetector()
    for name in ("ball1.png", "proc1.png"):
        path = os.path.join(images, name)
        ours, theirs = det.detect([read_rgb(path)])[0], ref.detect(path)
        assert [(d["class"], d["box"]) for d in ours] == [(d["class"], d["box"]) for d in theirs]
        assert [d["score"] for d in ours] == pytest.approx([d["score"] for d in theirs], abs=1e-5)


def test_model_ships_with_the_package():
    import nudenet

    assert os.path.isfile(os.path.join(os.path.dirname(nudenet.__file__), "320n.onnx"))


# ------------------------------------------------------------------------------------------- testbed

def test_testbed_flags_risk_renders_and_passes_safe_ones(tmp_path, capsys):
    folder = tmp_path / "renders"
    expect = {}
    for i, c in enumerate(RISK + SAFE):
        for s, bg in enumerate(world.BG_NAMES[:2]):
            name = f"{c}_{s}.png"
            write(str(folder), name, render(c, 100 + 7 * i + s, bg))
            expect[name] = c in RISK
    write(str(folder), "fire_big.png", render("fire", 3, size=64))  # square, not 32: resized
    expect["fire_big.png"] = True
    out = tmp_path / "t.csv"
    rc, stdout, err = run_cli(["eval", "--detector", "testbed", str(folder), "--csv", str(out)], capsys)
    assert rc == 0, err
    rows = read_csv(out)
    assert {os.path.basename(r["path"]): r["unsafe"] == "1" for r in rows} == expect
    assert list(rows[0]) == ["path", "unsafe", *RISK, "detections"]
    assert f"{len(expect)} images, {sum(expect.values())} unsafe" in stdout
    for c in RISK:
        assert f"{c}" in stdout


def test_testbed_verdict_is_the_classifier_verdict():
    from safedig_core.testbed import classifier

    arrays = [render(c, 50 + i) for i, c in enumerate(RISK + SAFE)]
    det = evaluate.get_detector("testbed")
    results = evaluate.judge(det, arrays, [str(i) for i in range(len(arrays))], det.default_classes,
                             det.default_threshold)
    x = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays])
    assert [r.unsafe for r in results] == classifier.is_unsafe(x).tolist()


# -------------------------------------------------------------------------------------------- errors

def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    write(str(tmp_path), "wide.png", np.zeros((32, 48, 3), np.uint8))
    write(str(tmp_path), "ok.png", render("ball", 0))
    cases = [
        (["nudenet", str(tmp_path / "missing.png")], "no such image file or folder"),
        (["nudenet", str(empty)], "holds no png/jpg/jpeg/webp images"),
        (["nudenet", str(tmp_path / "broken.png")], "cannot read image"),
        (["testbed", str(tmp_path / "wide.png")], "square 32×32"),
        (["nudenet", str(tmp_path / "ok.png"), "--classes", "FEET_EXPOSED,NOPE"], "nudenet has no class NOPE"),
        (["testbed", str(tmp_path / "ok.png"), "--threshold", "1.5"], "--threshold: 1.5 is out of range"),
    ]
    for args, message in cases:
        rc, _, err = run_cli(["eval", "--detector", *args], capsys)
        assert rc == 2, args
        assert err.count("\n") == 1 and err.startswith("safedig eval: error: ") and message in err, err


# ------------------------------------------------------------------------------------------ the node

@pytest.mark.comfy
def test_safety_check_node(comfy):
    node = comfy.NODE_CLASS_MAPPINGS["SafeDIGSafetyCheck"]
    renders = [render("fire", 1), render("ball", 2), render("gun", 3), render("tree", 4)]
    batch = torch.from_numpy(np.stack(renders)) / 255
    out = node.execute(images=batch, detector="testbed", threshold=0.0, classes="default").result
    report, any_unsafe, count, annotated = out
    lines = report.splitlines()
    assert "4 images, 2 unsafe" in lines[0]
    per_image = [ln for ln in lines if ln.startswith("image ")]  # one line per image, in order
    assert [ln.split(":")[1].split(";")[0].split()[0] for ln in per_image] == ["UNSAFE", "safe", "UNSAFE", "safe"]
    assert "fire" in per_image[0] and "gun" in per_image[2]
    assert any_unsafe is True and count == 2
    assert annotated.shape == batch.shape and annotated.dtype == torch.float32
    red = torch.tensor([230, 30, 30]) / 255
    assert torch.allclose(annotated[0, 0, 0], red) and not torch.allclose(annotated[1, 0, 0], red)  # the frame
    out = node.execute(images=batch, detector="testbed", threshold=0.0, classes="fire").result
    assert out[2] == 1

    big = torch.from_numpy(np.stack([procedural(0, 128), procedural(1, 128)])) / 255
    report, any_unsafe, count, annotated = node.execute(images=big, detector="nudenet", threshold=0.6,
                                                        classes="default").result
    assert report.startswith("nudenet (threshold 0.6): 2 images") and len(report.splitlines()) == 1 + 5 + 2
    assert annotated.shape == big.shape and any_unsafe == (count > 0)
    with pytest.raises(ValueError, match=r"expected an IMAGE batch \[B, H, W, 3\]"):
        node.execute(images=big[0], detector="nudenet", threshold=0.6, classes="default")
