"""The real ComfyUI frontend (comfyui-frontend-package) in headless Chromium, driven by selenium.

Debian's `chromium` and `chromium-driver` (installed by scripts/setup.sh) are used as they are: nothing
downloads a browser build. `tests/test_browser.py` and `scripts/make_thumbnails.py` share this driver.
What a user does is what the driver does: templates are opened by clicking their card in the template
browser, prompts are queued with the Run button; page scripts only read the frontend's state.
"""
from __future__ import annotations

import os
import shutil
import time

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = ("chromedriver",)
APP_TIMEOUT_S = 90.0


def _which(names) -> str | None:
    for n in names:
        path = shutil.which(n) or (f"/usr/bin/{n}" if os.path.exists(f"/usr/bin/{n}") else None)
        if path:
            return path
    return None


def unavailable() -> str | None:
    """Why the browser cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -c constraints.txt selenium; scripts/setup.sh does)"
    if not _which(CHROMIUM) or not _which(DRIVER):
        return ("Debian's chromium and chromium-driver are not installed (scripts/setup.sh installs them with "
                "apt-get where it can: apt-get install -y chromium chromium-driver)")
    return None


# Page-side checks, written against the frontend's own objects (window.app, LiteGraph widgets).
LOADED_STATE = """
const g = window.app.graph;
return {missing: window.__safedigMissing || [], nodes: g._nodes.map(n => ({
  id: n.id, type: n.type, title: n.title, registered: !!LiteGraph.registered_node_types[n.type],
  values: n.widgets_values === undefined ? null : n.widgets_values,
  widgets: (n.widgets || []).map(w => {
    const o = w.options || {};
    const vals = typeof o.values === "function" ? o.values() : o.values;
    return {name: w.name, type: w.type, value: w.value, min: o.min ?? null, max: o.max ?? null,
            options: Array.isArray(vals) ? vals : null};
  })}))};
"""
WATCH_MISSING = """
window.__safedigMissing = [];
const a = window.app;
if (!a.__safedigWatched) {
  const show = a.showMissingNodesError.bind(a);
  a.showMissingNodesError = (types, ...rest) => { window.__safedigMissing.push(...types); return show(types, ...rest); };
  a.__safedigWatched = true;
}
"""
PREVIEW_STATE = """
const n = window.app.graph._nodes.find(n => n.title === arguments[0]);
if (!n) return null;
const imgs = n.imgs || [];
return imgs.map(i => ({src: i.src, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}));
"""


class Browser:
    def __init__(self, url: str, artifacts: str, width: int = 1600, height: int = 1000):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        opts = webdriver.ChromeOptions()
        opts.binary_location = _which(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--window-size={width},{height}", "--no-first-run", "--no-default-browser-check",
                    "--disable-extensions", "--disable-background-networking"):
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.url, self.artifacts = url, artifacts
        os.makedirs(artifacts, exist_ok=True)
        self.driver = webdriver.Chrome(service=Service(_which(DRIVER)), options=opts)
        self.driver.set_script_timeout(30)
        self.driver.get(url)
        self.wait(lambda: self.js("return !!(window.app && window.app.graph && window.app.canvas && "
                                  "window.app.extensionManager)"), APP_TIMEOUT_S, "the ComfyUI app to start")
        self.js(WATCH_MISSING)

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, cond, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                self.screenshot("timeout")
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.2)

    def screenshot(self, name: str) -> str:
        path = os.path.join(self.artifacts, f"{name}.png")
        self.driver.save_screenshot(path)
        return path

    def open_template(self, title: str) -> None:
        """Open the template browser and click the card titled `title` (the template's file name)."""
        from selenium.webdriver.common.by import By

        self.js(WATCH_MISSING)
        self.js("return window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        xpath = f"//h3[normalize-space(.)={_xpath_literal(title)}]"
        card = self.wait(lambda: self.driver.find_elements(By.XPATH, xpath), 20, f"the template card {title!r}")
        before = self.js("return window.app.graph._nodes.map(n => n.id).join(',') + '|' + "
                         "(window.app.extensionManager.workflow.activeWorkflow?.path || '')")
        self.wait(lambda: self._click(card[0]), 20, f"the template card {title!r} to take a click")
        self.wait(lambda: self.js("return window.app.graph._nodes.map(n => n.id).join(',') + '|' + "
                                  "(window.app.extensionManager.workflow.activeWorkflow?.path || '')") != before
                  and not self.driver.find_elements(By.XPATH, xpath), 20, f"the template {title!r} to load")
        time.sleep(0.5)  # let the canvas draw

    def _click(self, element) -> bool:
        """Scroll `element` into view and click it; False while something (the dialog opening) covers it."""
        from selenium.common.exceptions import ElementClickInterceptedException

        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        try:
            element.click()
        except ElementClickInterceptedException:
            return False
        return True

    def loaded_state(self) -> dict:
        return self.js(LOADED_STATE)

    def run(self) -> None:
        """Click the Run button of the action bar."""
        from selenium.webdriver.common.by import By

        buttons = self.driver.find_elements(By.XPATH, "//button[@aria-label='Run']")
        assert buttons, "no Run button in the action bar"
        buttons[0].click()

    def preview(self, title: str) -> list | None:
        return self.js(PREVIEW_STATE, title)

    def fit_view(self) -> None:
        self.js("return window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        time.sleep(0.3)

    def hide_chrome(self) -> None:
        """Hide the minimap (a picture of the graph should be the graph)."""
        self.js("return window.app.extensionManager.setting.set('Comfy.Minimap.Visible', false)")
        time.sleep(0.3)

    def canvas_png(self) -> bytes:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, "graph-canvas").screenshot_as_png

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]

    def close(self) -> None:
        self.driver.quit()


def _xpath_literal(s: str) -> str:
    if "'" not in s:
        return f"'{s}'"
    return "concat('" + "', \"'\", '".join(s.split("'")) + "')"
