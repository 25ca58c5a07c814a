"""Make the template browser's thumbnails: `workflows/<name>.jpg` for every `workflows/<name>.json`, a picture
of the workflow as the real frontend draws it (the testbed one after a run, so its previews show the
unsteered and the steered image).

    python scripts/make_thumbnails.py     # needs chromium + chromium-driver + selenium (scripts/setup.sh)
"""
from __future__ import annotations

import io
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import browser as ui  # noqa: E402
from server_fixture import start_server  # noqa: E402

SIZE = (512, 384)  # the cards are about 4:3
RUN_FIRST = {"SafeDIG - Testbed steering on a CPU"}


def thumbnail(png: bytes, path: str, top: int = 110) -> None:
    """The canvas without the tab and action bars (`top` pixels), cropped to the cards' aspect."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    img = img.crop((0, top, img.size[0], img.size[1]))
    w, h = img.size
    target = SIZE[0] / SIZE[1]
    if w / h > target:  # crop the sides, keep the middle
        nw = int(h * target)
        img = img.crop(((w - nw) // 2, 0, (w - nw) // 2 + nw, h))
    else:
        nh = int(w / target)
        img = img.crop((0, (h - nh) // 2, w, (h - nh) // 2 + nh))
    img.resize(SIZE, Image.LANCZOS).save(path, "JPEG", quality=85, optimize=True)


def steering_pair(server, page, path: str) -> None:
    """The testbed's card: its two previews side by side, as the workflow shows them after a run."""
    import urllib.parse

    from PIL import Image, ImageDraw
    from server_fixture import _OPENER

    card = Image.new("RGB", SIZE, (24, 24, 24))
    draw = ImageDraw.Draw(card)
    side = 224
    for i, title in enumerate(("Unsteered", "Steered")):
        url = urllib.parse.urlsplit(page.preview(title)[0]["src"])
        with _OPENER.open(f"{server.url}{url.path}?{url.query}", timeout=30) as r:
            img = Image.open(io.BytesIO(r.read())).convert("RGB").resize((side, side), Image.NEAREST)
        x = 20 + i * (side + 24)
        card.paste(img, (x, 70))
        draw.text((x, 302), title.lower() + " (same prompt, same seed)", fill=(230, 230, 230))
    draw.text((20, 20), "SafeDIG testbed: steering on a CPU, nothing to download", fill=(255, 255, 255))
    draw.text((20, 40), f"prompt: {page.js(PROMPT)!r}", fill=(180, 180, 180))
    card.save(path, "JPEG", quality=90, optimize=True)


PROMPT = "return window.app.graph._nodes.find(n => n.title === 'Prompt').widgets[0].value"


def main() -> None:
    why = ui.unavailable()
    if why:
        sys.exit(why)
    names = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(REPO, "workflows")) if f.endswith(".json"))
    with tempfile.TemporaryDirectory(prefix="safedig-thumbs-") as base:
        server = start_server(os.path.join(base, "server"))
        page = None
        try:
            page = ui.Browser(server.url, os.path.join(base, "shots"), width=1600, height=1200)
            for name in names:
                page.open_template(name)
                if name in RUN_FIRST:
                    page.run()
                    page.wait(lambda: all((page.preview(t) or [{}])[0].get("complete") for t in ("Unsteered", "Steered")),
                              180, "the testbed previews")
                path = os.path.join(REPO, "workflows", f"{name}.jpg")
                if name in RUN_FIRST:
                    steering_pair(server, page, path)
                else:
                    page.hide_chrome()
                    page.fit_view()
                    thumbnail(page.canvas_png(), path)
                print(f"wrote {path}")
        finally:
            if page is not None:
                page.close()
            server.stop()


if __name__ == "__main__":
    main()
