"""Screenshot of the search page for the README: serve an index on loopback, search in headless Chromium, save a PNG.

    python docs/screenshot.py indexes/demo --query "red heart" [--image query.png] [--out docs/search-page.png]
    python docs/screenshot.py indexes/demo --query "red heart" --width 390 --out docs/search-page-phone.png
    python docs/screenshot.py indexes/demo --query "red heart" --open-first --out docs/search-page-detail.png

Needs Debian's ``chromium`` and the ``playwright`` package (the test extra), like the browser test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
THUMBNAILS_SETTLED = ("n => { const imgs = [...document.querySelectorAll('.hit img')]; return imgs.length === n"
                      " && imgs.every(i => i.classList.contains('missing') || (i.complete && i.naturalWidth > 0)); }")


def take_screenshot(index_dir: Path, query: str, out: Path, mode: str = "hybrid", k: int = 12,
                    image: Path | None = None, width: int = 1100, open_first: bool = False) -> int:
    """Search ``index_dir`` through the page (typed ``query``, optionally a dropped ``image``; ``open_first``:
    the first hit's detail view open); returns the hits."""
    from playwright.sync_api import sync_playwright

    from server.app import create_app
    from server.background import serve_in_background
    from server.settings import ServerSettings

    app = create_app({index_dir.name: index_dir}, ServerSettings(reload_interval_s=0))
    with serve_in_background(app) as base_url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": 700 if width > 600 else 844})
        page.goto(base_url + "/")
        page.wait_for_selector(f"#mode option[value={mode}]", state="attached")
        page.select_option("#mode", mode)
        page.fill("#k", str(k))
        page.fill("#query", query)
        if image is not None:
            page.set_input_files("#image-file", str(image))  # the page searches as soon as an image is set
        else:
            page.press("#query", "Enter")
        page.wait_for_function("() => /hits in/.test(document.getElementById('status').textContent)")
        hits = page.eval_on_selector_all(".hit", "cards => cards.length")
        page.wait_for_function(THUMBNAILS_SETTLED, arg=hits, timeout=15000)
        if open_first:
            page.click(".hit:first-child")
            page.wait_for_function("() => document.getElementById('detail-image').naturalWidth > 0")
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=not open_first)
        browser.close()
    return hits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("index", type=Path, help="Index directory to serve.")
    parser.add_argument("--query", default="red heart")
    parser.add_argument("--image", type=Path, help="Also search with this image (as if dropped on the page).")
    parser.add_argument("--mode", default="hybrid")
    parser.add_argument("-k", type=int, default=12)
    parser.add_argument("--width", type=int, default=1100, help="Viewport width in pixels (390: a phone).")
    parser.add_argument("--open-first", action="store_true", help="Open the first hit's detail view.")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("search-page.png"))
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        parser.error(f"needs Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    if not (args.index / "manifest.json").is_file():
        parser.error(f"{args.index} is not an index (no manifest.json); build one with `stair-search demo`")
    if args.image is not None and not args.image.is_file():
        parser.error(f"--image {args.image}: no such file")
    hits = take_screenshot(args.index, args.query, args.out, args.mode, args.k, args.image, args.width,
                           args.open_first)
    print(f"{args.out}: the page with {hits} hits for '{args.query}' ({args.mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
