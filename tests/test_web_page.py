"""The search page in headless Chromium against a real server on loopback: type a query and see the thumbnails
the library ranks first, with matched tokens; drop an image and see it found. Saves a screenshot artefact
(``$STAIR_ARTIFACTS`` or ``artifacts/`` at the repository root, which git ignores)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from server import ServerSettings, create_app
from server.background import serve_in_background
from stair_search.index.reader import Index
from stair_search.retrieve.router import QueryRouter
from tests.conftest import draw_shape
from tests.test_server import png_bytes, registry, shapes_index  # noqa: F401 - fixtures shared with the API tests

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("STAIR_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (the test extra)")


@pytest.fixture(scope="module")
def base_url(registry):  # noqa: F811 - the fixture imported above
    with serve_in_background(create_app(registry, ServerSettings(reload_interval_s=0))) as url:
        yield url


@pytest.fixture(scope="module")
def page(base_url):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.on("console", lambda m: print("CONSOLE", m.text))
        page.on("requestfailed", lambda r: print("FAILED", r.url, r.failure))
        page.on("response", lambda r: print("RESP", r.status, r.url))
        page.goto(base_url + "/")
        page.wait_for_selector("#mode option[value=hybrid]", state="attached")
        yield page
        browser.close()


@pytest.fixture(scope="module")
def library_router(shapes_index, tiny_encoder):  # noqa: F811
    return QueryRouter(Index(shapes_index), tiny_encoder)


def shown_hits(page) -> list[str]:
    return page.eval_on_selector_all(".hit", "cards => cards.map(c => c.dataset.id)")


def wait_for_thumbnails(page, count: int) -> None:
    """Every card's thumbnail has settled: loaded, or marked missing (the symlink out of the index's sources)."""
    page.wait_for_function(
        "n => { const imgs = [...document.querySelectorAll('.hit img')];"
        " return imgs.length === n && imgs.every(i => i.classList.contains('missing')"
        " || (i.complete && i.naturalWidth > 0)); }", arg=count, timeout=8000)


def missing_thumbnails(page) -> list[str]:
    return page.eval_on_selector_all(".hit:has(img.missing)", "cards => cards.map(c => c.dataset.id)")


def test_typing_a_query_shows_the_expected_thumbnails_and_matched_tokens(page, library_router):
    page.fill("#k", "6")
    page.select_option("#mode", "hybrid")
    page.fill("#query", "a red circle")
    page.press("#query", "Enter")
    expected = library_router.search(text="a red circle", mode="hybrid", k=6, explain=True).hits
    try:
        wait_for_thumbnails(page, len(expected))
    finally:
        print("STATUS", page.text_content("#status"), shown_hits(page))
        print(page.eval_on_selector_all(".hit img", "imgs => imgs.map(i => [i.src, i.complete, i.naturalWidth])"))
    assert shown_hits(page) == [hit.id for hit in expected]
    assert missing_thumbnails(page) == [h.id for h in expected if h.id == "linked/outside"]  # refused, not shown
    first_tokens = page.eval_on_selector_all(".hit:first-child .token", "spans => spans.map(s => s.textContent)")
    assert first_tokens == list(expected[0].matched)[:8]
    assert "6 hits" in page.text_content("#status")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "search-page.png"), full_page=True)
    assert (ARTIFACTS / "search-page.png").stat().st_size > 10_000


def test_dropping_an_image_searches_with_it(page):
    page.fill("#query", "")
    page.fill("#k", "4")
    page.select_option("#mode", "dense")
    data = base64.b64encode(png_bytes(draw_shape("yellow", "triangle"))).decode()
    page.evaluate("""data => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "query.png", { type: "image/png" }));
        const drop = new DragEvent("drop", { dataTransfer: transfer, bubbles: true });
        document.getElementById("dropzone").dispatchEvent(drop);
    }""", data)
    page.wait_for_function("() => document.querySelector('.hit')?.dataset.id === 'yellow/triangle'")
    wait_for_thumbnails(page, 4)
    assert "yellow/triangle" not in missing_thumbnails(page)
    assert page.is_visible("#image-chip")


def test_the_api_docs_render_offline(page, base_url):
    """/docs draws every operation of the OpenAPI document with every request outside the server blocked."""
    docs = page.context.browser.new_page()  # the module's browser: one playwright per process
    outside = []

    def only_this_server(route):
        if route.request.url.startswith(base_url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    docs.route("**/*", only_this_server)
    docs.goto(base_url + "/docs")
    docs.wait_for_selector(".opblock", timeout=15000)
    paths = docs.eval_on_selector_all(".opblock-summary-path", "nodes => nodes.map(n => n.textContent)")
    docs.close()
    assert {"/search", "/search/batch", "/classify", "/documents/{doc_id}"} <= {p.replace("\u200b", "") for p in paths}
    assert outside == []  # nothing was asked of a CDN
