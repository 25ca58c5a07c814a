"""The pack as a user meets it: the real ComfyUI frontend in headless Chromium against the real server.

Every bundled workflow is opened from the template browser and must load with no missing node types and every
widget value as saved and within its widget's range / options; the testbed workflow is queued with the Run
button and its previews must show the unsteered and the steered image. Screenshots go to
`out/test-artifacts/browser/` (or `$SAFEDIG_TEST_ARTIFACTS/browser/`).
"""
from __future__ import annotations

import io
import json
import os
import urllib.parse

import numpy as np
import pytest

pytest.register_assert_rewrite("server_fixture", "browser")
import browser as ui  # noqa: E402
from server_fixture import _OPENER, REPO  # noqa: E402
from test_workflows import FILE_COMBOS, FRONTEND_ONLY, TESTBED, WORKFLOWS, load  # noqa: E402

pytest_plugins = ("server_fixture",)
pytestmark = [pytest.mark.comfy, pytest.mark.server, pytest.mark.timeout(240)]

ARTIFACTS = os.path.join(os.environ.get("SAFEDIG_TEST_ARTIFACTS") or os.path.join(REPO, "out", "test-artifacts"),
                         "browser")
RUN_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def page(comfy_server):
    why = ui.unavailable()
    if why:
        pytest.skip(why)
    b = ui.Browser(comfy_server.url, ARTIFACTS)
    try:
        yield b
    finally:
        b.close()


def widget_problems(name: str, state: dict) -> list[str]:
    wf = load(name)
    problems = [f"missing node types: {state['missing']}"] if state["missing"] else []
    loaded = {n["id"]: n for n in state["nodes"]}
    for node in wf["nodes"]:
        got = loaded.get(node["id"])
        where = f"node {node['id']} {node['type']}"
        if got is None or got["type"] != node["type"]:
            problems.append(f"{where}: not in the loaded graph")
            continue
        if not got["registered"]:
            problems.append(f"{where}: the frontend has no such node type")
        if node["type"] in FRONTEND_ONLY:
            continue
        if got["values"] != node["widgets_values"]:
            problems.append(f"{where}: widgets hold {got['values']}, the file says {node['widgets_values']}")
        for w in got["widgets"]:
            if w["options"] is not None and w["value"] not in w["options"] and (node["type"], w["name"]) not in FILE_COMBOS:
                problems.append(f"{where}: {w['name']}={w['value']!r} is not among {w['options']}")
            number = isinstance(w["value"], (int, float)) and not isinstance(w["value"], bool)
            low, high = w["min"], w["max"]
            if number and ((low is not None and w["value"] < low) or (high is not None and w["value"] > high)):
                problems.append(f"{where}: {w['name']}={w['value']} outside [{low}, {high}]")
    return problems


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_opens_clean_from_the_template_browser(page, name):
    page.open_template(name)
    page.fit_view()
    page.screenshot(f"loaded - {name}")
    problems = widget_problems(name, page.loaded_state())
    assert not problems, "\n".join(problems)


def _image(comfy_server, src: str) -> np.ndarray:
    from PIL import Image

    url = urllib.parse.urlsplit(src)
    with _OPENER.open(f"{comfy_server.url}{url.path}?{url.query}", timeout=30) as r:
        return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"), dtype=np.int16)


def test_testbed_workflow_runs_from_the_run_button(page, comfy_server):
    page.open_template(TESTBED)
    page.run()
    shown = page.wait(lambda: all((page.preview(t) or [{}])[0].get("complete") for t in ("Unsteered", "Steered"))
                      and {t: page.preview(t) for t in ("Unsteered", "Steered")}, RUN_TIMEOUT_S,
                      "both previews of the testbed workflow")
    page.fit_view()
    page.screenshot("ran - testbed")
    for title, imgs in shown.items():
        assert (imgs[0]["width"], imgs[0]["height"]) == (256, 256), (title, imgs)
    plain, steered = (_image(comfy_server, shown[t][0]["src"]) for t in ("Unsteered", "Steered"))
    assert np.abs(plain - steered).mean() > 2.0, "the steered preview shows the unsteered image"
    with open(os.path.join(ARTIFACTS, "console.json"), "w") as f:
        json.dump(page.console_errors(), f, indent=1)
