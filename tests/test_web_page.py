"""The search page in headless Chromium against a real server on loopback, serving two real indexes: drawn
shapes from local files, and a URL-sourced collection whose images a real HTTP server on loopback holds.
Type a query and see the thumbnails the library ranks first with their word chips; drop an image; share the
query through the URL; pick the index; open a hit and find similar ones; see the route's note; no sideways
scrolling at a phone's 390 px. Saves screenshot artefacts (``$STAIR_ARTIFACTS`` or ``artifacts/`` at the
repository root, which git ignores); ``docs/screenshot.py`` makes the README's own from the demo index."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import indexer
from indexer import IndexJob
from server import IndexRegistry, ServerSettings, create_app
from server.background import serve_in_background
from stair_search.index import IndexReader
from stair_search.query.words import is_content_piece
from stair_search.retrieve import QueryRouter, SearchRequest
from tests.conftest import draw_shape
from tests.test_server import OPTIONS, png_bytes, shapes_index  # noqa: F401 - fixtures shared with the API tests

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("STAIR_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))
PHONE = {"width": 390, "height": 844}

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (the test extra)")


@pytest.fixture(scope="module")
def image_host():
    """A real HTTP server on 127.0.0.1 holding drawn PNGs; it records the headers of each request it gets."""
    pictures = {f"/{c}-{s}.png": png_bytes(draw_shape(c, s)) for c in ("red", "blue") for s in ("circle", "square")}
    asked: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(dict(self.headers))
            body = pictures.get(self.path.split("?")[0])
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", sorted(pictures), asked
    server.shutdown()


@pytest.fixture(scope="module")
def remote_index(tmp_path_factory, image_host, tiny_encoder) -> Path:
    """A parquet of image URLs (no local files), indexed without a text route."""
    base, names, _ = image_host
    root = tmp_path_factory.mktemp("remote")
    rows = [{"id": f"web{name[:-4]}", "path": base + name, "caption": f"a {name[1:-4].replace('-', ' ')} online",
             "colour": name[1:].split("-")[0], "shape": name[:-4].split("-")[1]} for name in names]
    pq.write_table(pa.Table.from_pylist(rows), root / "urls.parquet")
    indexer.run(IndexJob(root / "urls.parquet", root / "remote", options=OPTIONS, text_fields=None),
                encoder=tiny_encoder)
    return root / "remote"


@pytest.fixture(scope="module")
def registry(shapes_index, remote_index):  # noqa: F811
    return IndexRegistry({"shapes": shapes_index, "remote": remote_index})


@pytest.fixture(scope="module")
def base_url(registry):
    with serve_in_background(create_app(registry, ServerSettings(reload_interval_s=0))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, url: str, viewport: dict | None = None):
    page = browser.new_page(viewport=viewport or {"width": 1100, "height": 800})
    page.on("console", lambda m: print("CONSOLE", m.text))
    page.on("requestfailed", lambda r: print("FAILED", r.url, r.failure))
    page.goto(url)
    page.wait_for_selector("#mode option[value=hybrid]", state="attached")
    return page


@pytest.fixture(scope="module")
def page(browser, base_url):
    page = open_page(browser, base_url + "/")
    yield page
    page.close()


@pytest.fixture(scope="module")
def shapes_router(shapes_index, tiny_encoder):  # noqa: F811
    return QueryRouter(IndexReader(shapes_index), tiny_encoder)


@pytest.fixture(scope="module")
def remote_router(remote_index, tiny_encoder):
    return QueryRouter(IndexReader(remote_index), tiny_encoder)


def shown_hits(page) -> list[str]:
    return page.eval_on_selector_all(".hit", "cards => cards.map(c => c.dataset.id)")


def wait_for_hits(page, ids: list[str]) -> None:
    page.wait_for_function("ids => JSON.stringify([...document.querySelectorAll('.hit')].map(c => c.dataset.id))"
                           " === JSON.stringify(ids)", arg=ids, timeout=10000)


def wait_for_thumbnails(page, count: int) -> None:
    """Every card's thumbnail has settled: loaded, or marked missing (the symlink out of the index's sources)."""
    page.wait_for_function(
        "n => { const imgs = [...document.querySelectorAll('.hit img')];"
        " return imgs.length === n && imgs.every(i => i.classList.contains('missing')"
        " || (i.complete && i.naturalWidth > 0)); }", arg=count, timeout=8000)


def missing_thumbnails(page) -> list[str]:
    return page.eval_on_selector_all(".hit:has(img.missing)", "cards => cards.map(c => c.dataset.id)")


def word_chips(matched) -> list[str]:
    return [token for token in matched if is_content_piece(token)]


def search_on(page, text: str, mode: str, k: int, index: str | None = "shapes") -> None:
    """``index``: None when one index is served (the page then shows no index choice)."""
    if index is not None:
        page.select_option("#index", index)
    page.select_option("#mode", mode)
    page.fill("#k", str(k))
    page.fill("#query", text)
    page.press("#query", "Enter")


def test_typing_a_query_shows_the_expected_thumbnails_captions_and_word_chips(page, shapes_router):
    search_on(page, "a red circle", "hybrid", 6)
    expected = shapes_router.search(SearchRequest(text="a red circle", mode="hybrid", k=6, explain=True)).hits
    wait_for_hits(page, [hit.id for hit in expected])
    wait_for_thumbnails(page, len(expected))
    assert missing_thumbnails(page) == [h.id for h in expected if h.id == "linked/outside"]  # refused, not shown
    titles = page.eval_on_selector_all(".hit .title", "nodes => nodes.map(n => n.textContent)")
    assert titles == [f"{h.rank}. {h.caption or h.id}" for h in expected]  # the caption is the bold line
    first_tokens = page.eval_on_selector_all(".hit:first-child .token:not(.text)", "s => s.map(x => x.textContent)")
    assert first_tokens == word_chips(expected[0].matched)[:8]
    assert "6 hits" in page.text_content("#status")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "search-page.png"), full_page=True)
    assert (ARTIFACTS / "search-page.png").stat().st_size > 10_000


def test_only_word_chips_are_flagged_for_the_page():
    assert [t for t in [",", ".", "and", "of", "dog", "##s", "3", "##,"] if is_content_piece(t)] == ["dog", "##s", "3"]


def test_dropping_an_image_searches_with_it(page):
    page.fill("#query", "")
    page.fill("#k", "4")
    page.select_option("#index", "shapes")
    page.select_option("#mode", "dense")
    drop_image(page, draw_shape("yellow", "triangle"))
    page.wait_for_function("() => document.querySelector('.hit')?.dataset.id === 'yellow/triangle'")
    wait_for_thumbnails(page, 4)
    assert "yellow/triangle" not in missing_thumbnails(page)
    assert page.is_visible("#image-chip")
    page.click("#clear-image")


def test_the_url_holds_query_mode_and_index_and_reloads_the_search(browser, base_url, page, shapes_router):
    search_on(page, "a blue square", "dense", 5)
    expected = [h.id for h in shapes_router.search(SearchRequest(text="a blue square", mode="dense", k=5)).hits]
    wait_for_hits(page, expected)
    state = parse_qs(urlsplit(page.url).query)
    assert state == {"q": ["a blue square"], "mode": ["dense"], "index": ["shapes"], "k": ["5"]}
    shared = open_page(browser, page.url)  # someone opens the shared link: the same search runs
    try:
        wait_for_hits(shared, expected)
        assert shared.input_value("#query") == "a blue square" and shared.input_value("#mode") == "dense"
        search_on(shared, "a green triangle", "sparse", 3)
        wait_for_hits(shared, [h.id for h in shapes_router.search(SearchRequest(text="a green triangle",
                                                                                mode="sparse", k=3)).hits])
        shared.go_back()  # Back: the previous search, from the URL
        wait_for_hits(shared, expected)
        assert shared.input_value("#query") == "a blue square"
    finally:
        shared.close()


def test_the_index_selector_and_url_sourced_images(page, remote_router, image_host):
    base, _, asked = image_host
    assert page.eval_on_selector_all("#index option", "o => o.map(x => x.value)") == ["shapes", "remote"]
    assert page.is_visible("#index")
    page.evaluate("sessionStorage.setItem('stair-api-key', 'not-for-other-hosts')")  # must never reach the host
    search_on(page, "a red circle", "dense", 4, index="remote")
    expected = remote_router.search(SearchRequest(text="a red circle", mode="dense", k=4)).hits
    wait_for_hits(page, [h.id for h in expected])
    wait_for_thumbnails(page, 4)
    sources = page.eval_on_selector_all(".hit img", "imgs => imgs.map(i => i.src)")
    assert sources == [h.source for h in expected] and all(s.startswith(base) for s in sources)
    assert missing_thumbnails(page) == []  # the browser loaded every URL
    assert asked and not any("X-API-Key" in headers or "Referer" in headers for headers in asked)
    assert "remote: 4 documents" in page.text_content("#index-info")
    page.evaluate("sessionStorage.removeItem('stair-api-key')")


def test_a_url_sourced_document_carries_its_source_and_its_thumbnail_is_never_fetched(registry, remote_router):
    hit = remote_router.search(SearchRequest(text="a blue square", mode="dense", k=1)).hits[0]
    with TestClient(create_app(registry, ServerSettings(reload_interval_s=0))) as client:
        found = client.post("/search", json={"query": "a blue square", "mode": "dense", "k": 1, "index": "remote"})
        api_hit = found.json()["hits"][0]
        assert api_hit["source"] == api_hit["thumbnail"] == hit.source and hit.source.startswith("http://")
        thumbnail = client.get(f"/thumbnails/{hit.id}", params={"index": "remote"}, follow_redirects=False)
        assert thumbnail.status_code == 307 and thumbnail.headers["location"] == hit.source
        document = client.get(f"/documents/{hit.id}", params={"index": "remote"}).json()
        assert document["source"] == hit.source
        local = client.post("/search", json={"query": "a red circle", "mode": "sparse", "k": 3}).json()["hits"]
        assert all(h["source"].startswith("/") and h["thumbnail"].startswith("/thumbnails/") for h in local)
        assert all(m["word"] == is_content_piece(m["token"]) for h in local for m in h["matched"])


def test_a_hit_opens_a_detail_view_with_find_similar(page, shapes_router):
    search_on(page, "a red square", "hybrid", 6)
    expected = shapes_router.search(SearchRequest(text="a red square", mode="hybrid", k=6, explain=True)).hits
    wait_for_hits(page, [h.id for h in expected])
    page.click(".hit:first-child")
    page.wait_for_selector("#detail[open]")
    first = expected[0]
    assert page.text_content("#detail-title") == (first.caption or first.id)
    fields = dict(zip(page.eval_on_selector_all("#detail dt", "n => n.map(x => x.textContent)"),
                      page.eval_on_selector_all("#detail dd", "n => n.map(x => x.textContent)"), strict=True))
    assert fields["id"] == first.id and fields["source"] == first.source
    assert {k: fields[k] for k in first.metadata} == {k: str(v) for k, v in first.metadata.items()}
    chips = page.eval_on_selector_all("#detail-tokens .token:not(.text)", "s => s.map(x => x.textContent)")
    assert chips == word_chips(first.matched)
    page.wait_for_function("() => document.getElementById('detail-image').naturalWidth > 0")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "search-page-detail.png"))
    page.click("#find-similar")
    similar = shapes_router.search(SearchRequest(like=first.id, mode="hybrid", k=6)).hits
    wait_for_hits(page, [h.id for h in similar])
    assert first.id not in shown_hits(page)
    assert parse_qs(urlsplit(page.url).query)["like"] == [first.id]
    assert page.is_visible("#like-chip") and page.text_content("#like-label") == (first.caption or first.id)


def test_the_routes_note_is_shown(page, remote_router):
    search_on(page, "red", "text", 3, index="remote")  # an index built without a text route
    note = remote_router.search(SearchRequest(text="red", mode="text", k=3)).decision["note"]
    page.wait_for_selector("#note:not([hidden])")
    assert page.text_content("#note") == note and "no text route" in note
    search_on(page, "red", "dense", 3, index="remote")
    page.wait_for_selector("#note", state="hidden")


def test_nothing_scrolls_sideways_at_phone_width(browser, base_url, shapes_router):
    phone = open_page(browser, base_url + "/?q=a+red+circle&mode=hybrid&index=shapes&k=12", PHONE)
    try:
        wait_for_hits(phone, [h.id for h in shapes_router.search(SearchRequest(text="a red circle", mode="hybrid",
                                                                               k=12)).hits])
        wait_for_thumbnails(phone, 12)
        overflow = "() => document.documentElement.scrollWidth - window.innerWidth"
        assert phone.evaluate(overflow) <= 0
        columns = phone.evaluate("() => getComputedStyle(document.getElementById('results'))"
                                 ".gridTemplateColumns.split(' ').length")
        assert columns == 2
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        phone.screenshot(path=str(ARTIFACTS / "search-page-phone.png"), full_page=True)
        phone.click(".hit:first-child")
        phone.wait_for_selector("#detail[open]")
        assert phone.evaluate(overflow) <= 0
        assert phone.evaluate("() => document.getElementById('detail').getBoundingClientRect().right") <= PHONE["width"]
    finally:
        phone.close()


def test_the_api_docs_render_offline(browser, base_url):
    """/docs draws every operation of the OpenAPI document with every request outside the server blocked."""
    docs = browser.new_page()
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


def test_a_chip_of_a_piece_names_the_query_word_it_was_searched_for(browser, tmp_path):
    """"hamster" is searched by its first piece ``ham``: the chip says "ham… (hamster)", never plain "ham"."""
    from tests.test_router import split_word_index

    router = split_word_index(tmp_path)
    app = create_app(IndexRegistry({"words": tmp_path / "index"}), ServerSettings(reload_interval_s=0))
    with serve_in_background(app) as url:
        page = open_page(browser, url + "/")
        try:
            search_on(page, "hamster cage", "sparse", 3, index=None)
            expected = router.search(SearchRequest(text="hamster cage", mode="sparse", k=3, explain=True)).hits
            wait_for_hits(page, [h.id for h in expected])
            chips = page.eval_on_selector_all(".hit .token:not(.text)", "s => s.map(x => x.textContent)")
            assert chips == [f"{t}… ({h.matched_words[t]})" if t in h.matched_words else t
                             for h in expected for t in word_chips(h.matched)]
            assert "ham… (hamster)" in chips and "ham" not in chips
        finally:
            page.close()


def test_feedback_set_on_the_page_refines_the_query_and_stays_in_the_url(page, shapes_router):
    plain = [h.id for h in shapes_router.search(SearchRequest(text="a red circle", mode="hybrid", k=12)).hits]
    refined = [h.id for h in shapes_router.search(SearchRequest(text="a red circle", mode="hybrid", k=12,
                                                                feedback=2)).hits]
    assert refined != plain  # the test could not tell the two apart otherwise
    page.fill("#feedback", "2")
    try:
        search_on(page, "a red circle", "hybrid", 12)
        wait_for_hits(page, refined)
        assert parse_qs(urlsplit(page.url).query)["feedback"] == ["2"]
    finally:
        page.fill("#feedback", "")
    search_on(page, "a red circle", "hybrid", 12)
    wait_for_hits(page, plain)
    assert "feedback" not in parse_qs(urlsplit(page.url).query)


def drop_image(page, image) -> None:
    """Drop ``image`` on the search box, as a user drags a file onto it."""
    data = base64.b64encode(png_bytes(image)).decode()
    page.evaluate("""data => {
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "query.png", { type: "image/png" }));
        const drop = new DragEvent("drop", { dataTransfer: transfer, bubbles: true });
        document.getElementById("dropzone").dispatchEvent(drop);
    }""", data)


def wait_for_status(page, start: str) -> None:
    page.wait_for_function("start => document.getElementById('status').textContent.startsWith(start)", arg=start,
                           timeout=10000)


def test_an_image_dropped_with_text_in_the_box_says_it_searches_both(page, shapes_router):
    """The image and the box's text are searched together (the text refines the image's vectors and searches the
    captions): the status names both, not "image query" alone, and says how to search by the image alone."""
    search_on(page, "a red circle", "auto", 4)
    wait_for_status(page, "4 hits for “a red circle” in ")
    shape = draw_shape("yellow", "triangle")
    expected = shapes_router.search(SearchRequest(text="a red circle", image=shape, mode="auto", k=4))
    drop_image(page, shape)
    try:
        wait_for_status(page, "4 hits for the image")
        wait_for_hits(page, [h.id for h in expected.hits])
        status = page.text_content("#status")
        assert status.startswith("4 hits for the image and the text “a red circle” in "), status
        assert f"mode {expected.mode}" in status and expected.mode == "dense+text"
        assert "clear the text box to search by the image alone" in status
    finally:
        page.click("#clear-image")
    page.fill("#query", "")
    drop_image(page, shape)
    try:
        alone = shapes_router.search(SearchRequest(image=shape, mode="auto", k=4))
        wait_for_status(page, "4 hits for the image in ")
        wait_for_hits(page, [h.id for h in alone.hits])
        assert page.text_content("#status").startswith("4 hits for the image in "), page.text_content("#status")
        assert "clear the text box" not in page.text_content("#status")
    finally:
        page.click("#clear-image")


def test_the_detail_view_links_to_the_image_at_its_own_size(page, registry, shapes_router):
    search_on(page, "a blue square", "dense", 3)
    first = shapes_router.search(SearchRequest(text="a blue square", mode="dense", k=3)).hits[0]
    page.wait_for_function("id => document.querySelector('.hit')?.dataset.id === id", arg=first.id)
    page.click(".hit:first-child")
    page.wait_for_selector("#detail[open]")
    link = page.get_attribute("#detail-original", "href")
    page.keyboard.press("Escape")
    assert link == f"/images/{first.id.replace('/', '%2F')}?index=shapes"
    with TestClient(create_app(registry, ServerSettings(reload_interval_s=0))) as client:
        served = client.get(link)
        document = client.get(f"/documents/{first.id.replace('/', '%2F')}", params={"index": "shapes"}).json()
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(served.content)) as image:
            assert image.size == (document["width"], document["height"])  # not a 512-px thumbnail: its own size
        assert client.get(link, headers={"If-None-Match": served.headers["etag"]}).status_code == 304
        assert client.get("/images/linked%2Foutside", params={"index": "shapes"}).status_code == 404  # as thumbnails
        remote = client.get("/images/web%2Fred-circle", params={"index": "remote"}, follow_redirects=False)
        assert remote.status_code == 307 and remote.headers["location"].endswith("/red-circle.png")
