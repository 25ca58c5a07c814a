"""Position names, model layouts, position lists, functional groups and depth (safedig_core.positions)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safedig_core.positions import (
    FAMILIES,
    GROUPS,
    ModelLayout,
    Position,
    PositionError,
    depth,
    group,
    parse,
    parse_list,
)

FLUX = ModelLayout("flux", {"double": 19, "single": 38}, 3072)
SD3 = ModelLayout("sd3", {"joint": 38}, 2432, last_txt_absent=True)


positions = st.builds(Position, st.sampled_from(["double", "single", "joint"]), st.integers(0, 10_000),
                      st.sampled_from(["img", "txt"]))


@settings(max_examples=50, deadline=None, database=None)
@given(p=positions, pad=st.sampled_from(["", " ", "\t", "  \n"]))
def test_parse_format_round_trip(p, pad):
    assert parse(p.name) == p
    assert str(p) == p.name == f"{p.kind}.{p.index}.{p.stream}"
    assert parse(pad + p.name + pad) == p
    assert p.family == ("sd3" if p.kind == "joint" else "flux")
    assert p.kind in FAMILIES[p.family]


def test_examples():
    p = parse("single.37.txt")
    assert (p.kind, p.index, p.stream) == ("single", 37, "txt")
    assert p.slot == ("single_block", 37)
    assert parse("double.3.img").slot == ("double_block", 3)
    assert parse("joint.5.txt").slot == ("double_block", 5), "ComfyUI registers MMDiT joint blocks as double_block"
    assert parse("double.01.img") == parse("double.1.img")
    assert sorted([parse("single.0.img"), parse("double.10.img"), parse("double.2.txt"), parse("double.2.img")]) == [
        parse("double.2.img"), parse("double.2.txt"), parse("double.10.img"), parse("single.0.img")]
    assert len({parse("double.0.img"), Position("double", 0, "img")}) == 1


@pytest.mark.parametrize("name", ["", "double", "double.0", "double.0.img.x", "double.a.img", "double.-1.img",
                                  "double.1.5.img", "Double.0.img", "double.0.IMG", "double.0.image", "single.0.text",
                                  "triple.0.img", "joint..img", "double_0_img", "double 0 img", "double.0 .img"])
def test_bad_names(name):
    with pytest.raises(PositionError) as e:
        parse(name)
    msg = str(e.value)
    assert repr(name) in msg and "bad position name" in msg
    assert "double.<i>.img|txt" in msg and "joint.<i>.img|txt" in msg, "the message says what is expected"
    assert isinstance(e.value, ValueError)


# --------------------------------------------------------------------------------------------- ModelLayout


def test_flux_positions():
    ps = FLUX.positions()
    assert len(ps) == (19 + 38) * 2 - 1  # the last single block's text tokens are discarded by FLUX
    assert len(set(ps)) == len(ps)
    assert ps[0] == parse("double.0.img") and ps[1] == parse("double.0.txt")
    assert ps[-1] == parse("single.37.img")
    assert all(FLUX.has(p) for p in ps)
    assert [p.kind for p in ps] == ["double"] * 38 + ["single"] * 75, "double blocks come first"
    for name in ("double.18.txt", "single.37.img", "single.0.txt"):
        assert FLUX.has(parse(name))
        FLUX.check(parse(name))
    assert FLUX.width_of(parse("double.0.txt")) == FLUX.width_of(parse("single.3.img")) == 3072


def test_flux_last_single_text_is_rejected():
    assert not FLUX.has(parse("single.37.txt"))
    with pytest.raises(PositionError, match=r"single\.37\.txt: FLUX discards the text tokens of its last single block"):
        FLUX.check(parse("single.37.txt"))


def test_sd3_last_block_has_no_text():
    ps = SD3.positions()
    assert len(ps) == 38 * 2 - 1
    assert parse("joint.37.img") in ps and parse("joint.37.txt") not in ps
    assert parse("joint.36.txt") in ps
    assert not SD3.has(parse("joint.37.txt"))
    with pytest.raises(PositionError, match=r"position joint\.37\.txt: the last joint block outputs no text"):
        SD3.check(parse("joint.37.txt"))
    SD3.check(parse("joint.37.img"))
    with_txt = ModelLayout("sd3", {"joint": 24}, 1536)
    assert with_txt.has(parse("joint.23.txt")) and len(with_txt.positions()) == 48


@pytest.mark.parametrize("layout,name,fragment", [
    (FLUX, "double.19.img", "the model has 19 double blocks (indices 0..18)"),
    (FLUX, "single.38.txt", "the model has 38 single blocks (indices 0..37)"),
    (SD3, "joint.38.img", "the model has 38 joint blocks (indices 0..37)"),
    (FLUX, "joint.0.img", "belongs to SD3, but the model is FLUX"),
    (SD3, "double.0.img", "belongs to FLUX, but the model is SD3"),
    (SD3, "single.0.img", "belongs to FLUX, but the model is SD3"),
])
def test_check_rejects(layout, name, fragment):
    p = parse(name)
    assert not layout.has(p)
    with pytest.raises(PositionError) as e:
        layout.check(p)
    assert str(e.value).startswith(f"position {name}") and fragment in str(e.value)


def test_layout_without_a_kind():
    double_only = ModelLayout("flux", {"double": 2}, 64)
    assert [p.name for p in double_only.positions()] == ["double.0.img", "double.0.txt", "double.1.img",
                                                         "double.1.txt"]
    with pytest.raises(PositionError, match="the model has 0 single blocks"):
        double_only.check(parse("single.0.img"))


def test_txt_width():
    layout = ModelLayout("flux", {"double": 2, "single": 2}, 64, txt_width=32)
    assert layout.width_of(parse("double.1.txt")) == 32 and layout.width_of(parse("single.0.txt")) == 32
    assert layout.width_of(parse("double.1.img")) == 64


@settings(max_examples=40, deadline=None, database=None)
@given(double=st.integers(0, 30), single=st.integers(0, 50), joint=st.integers(1, 40), last=st.booleans(),
       p=positions)
def test_has_agrees_with_positions(double, single, joint, last, p):
    for layout in (ModelLayout("flux", {"double": double, "single": single}, 8),
                   ModelLayout("sd3", {"joint": joint}, 8, last_txt_absent=last)):
        listed = layout.positions()
        if p.index < 60:
            assert layout.has(p) == (p in listed)
        if layout.has(p):
            layout.check(p)
        else:
            with pytest.raises(PositionError):
                layout.check(p)


# ------------------------------------------------------------------------------------------------ parse_list

AVAILABLE = [parse(n) for n in ("double.0.img", "double.3.txt", "single.7.img", "single.20.txt")]


@pytest.mark.parametrize("spec", ["all", "ALL", " All ", ""])
def test_parse_list_all(spec):
    got = parse_list(spec, AVAILABLE)
    assert got == AVAILABLE and got is not AVAILABLE


def test_parse_list_comma_lists():
    assert parse_list("single.7.img", AVAILABLE) == [parse("single.7.img")]
    assert parse_list(" single.20.txt , double.0.img ", AVAILABLE) == [parse("single.20.txt"), parse("double.0.img")]
    assert parse_list("double.3.txt,,double.3.txt,", AVAILABLE) == [parse("double.3.txt")], "duplicates and blanks"
    assert parse_list("double.03.txt", AVAILABLE) == [parse("double.3.txt")]


@settings(max_examples=50, deadline=None, database=None)
@given(chosen=st.lists(st.sampled_from(AVAILABLE + [parse("input.pooled"), parse("input.txt")]), unique=True,
                       min_size=1), word=st.sampled_from(["txt", "text", " TXT ", "img", "image"]))
def test_parse_list_one_stream(chosen, word):
    """`txt` / `img`: the holder's positions of that stream, in its order (the pooled text vector is text);
    a holder with none of them is refused with what it has."""
    stream = "txt" if word.strip().lower() in ("txt", "text") else "img"
    want = [p for p in chosen if p.stream == stream]
    if want:
        assert parse_list(word, chosen) == want
    else:
        with pytest.raises(PositionError, match=rf"has no {stream} stream position \(it has: "):
            parse_list(word, chosen)


def test_parse_list_unknown_position():
    with pytest.raises(PositionError) as e:
        parse_list("double.0.img,double.5.img", AVAILABLE)
    msg = str(e.value)
    assert "position double.5.img was asked for but is not in the dictionary" in msg
    for p in AVAILABLE:
        assert p.name in msg, "the message lists what the dictionary has"
    with pytest.raises(PositionError, match=r"\(it has: none\)"):
        parse_list("double.0.img", [])


def test_parse_list_bad_name():
    with pytest.raises(PositionError, match=r"bad position name ' ?double\.zero\.img'"):
        parse_list("double.0.img, double.zero.img", AVAILABLE)


# --------------------------------------------------------------------------------------------- group, depth


def test_groups_flux():
    assert group(parse("double.0.txt")) == "text_binding"
    assert group(parse("single.30.txt")) == "text_binding"
    assert group(parse("double.5.img")) == "visual_binding"
    assert group(parse("single.0.img"), FLUX) == "rendering"
    assert {group(p, FLUX) for p in FLUX.positions()} == set(GROUPS)


def test_groups_sd3_split_at_two_thirds():
    # 38 joint blocks: images of blocks 0..24 bind visual content, 25..37 render
    assert group(parse("joint.24.img"), SD3) == "visual_binding"
    assert group(parse("joint.25.img"), SD3) == "rendering"
    assert group(parse("joint.37.img"), SD3) == "rendering"
    assert group(parse("joint.30.txt"), SD3) == "text_binding"
    assert group(parse("joint.30.img")) == "visual_binding", "without a layout, joint images are not split"
    counts = {g: sum(group(p, SD3) == g for p in SD3.positions()) for g in GROUPS}
    assert counts == {"text_binding": 37, "visual_binding": 25, "rendering": 13}


def test_depth():
    assert depth(parse("double.0.img"), FLUX) == 0.0
    assert depth(parse("single.37.txt"), FLUX) == 1.0
    assert depth(parse("single.0.img"), FLUX) == pytest.approx(19 / 56), "single blocks follow the double ones"
    assert depth(parse("double.18.txt"), FLUX) == pytest.approx(18 / 56)
    assert depth(parse("joint.37.img"), SD3) == 1.0 and depth(parse("joint.0.txt"), SD3) == 0.0
    assert depth(parse("joint.0.img"), ModelLayout("sd3", {"joint": 1}, 8)) == 0.0, "one block: no division by zero"
    ds = [depth(p, FLUX) for p in FLUX.positions()]
    assert ds == sorted(ds) and all(0.0 <= v <= 1.0 for v in ds)
    assert depth(parse("double.4.img"), FLUX) == depth(parse("double.4.txt"), FLUX), "both streams of a block"
