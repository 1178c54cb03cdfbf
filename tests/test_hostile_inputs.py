"""Hostile input through the real entry points (issue 36: D1, D2, D4, D9, D10, D11, D12, D16).

Every format Pillow can write, mutated with a seeded RNG and named ``.png`` (and the exact SPIDER file of the
report), goes through the decoder, through every HTTP route that takes a query image, and through a real
``stair-search index`` process on a folder that also holds a FIFO, a socket, an unreadable subfolder and one
deeper than PATH_MAX: no exception escapes, no 5xx, no job stops, every file is indexed or listed with its
reason. Then a download that sends one byte every two seconds, a corrupt parquet row group, a CSV with huge
fields, a folder path longer than PATH_MAX, tars cut after indexing, and sources whose names are ambiguous
(``evil.tar#m.png`` beside ``evil.tar``) or not UTF-8.

The case counts are printed (``-s``) for the issue's closing note.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import indexer
from indexer import IndexJob
from indexer.decode import FETCH_DEADLINE_ENV, decode
from indexer.sources import Item, SourceOptions, iter_items
from server import IndexRegistry
from server.imaging import ImageRejected, open_query_image, stored_image
from stair_search.images import (
    NotRead,
    SourceLocation,
    file_source,
    member_source,
    parse_source,
    read_member,
    readings,
)
from stair_search.index import IndexReader
from stair_search.index.layout import SKIPPED_REPORT
from tests.conftest import COLOURS, draw_shape
from tests.test_server import client, make_client, registry, shapes_index  # noqa: F401 - the API tests' fixtures

SEED = 36
DECODER_MUTATIONS = 40  # per format, through the decoder (in process: fast)
HTTP_MUTATIONS = 2  # per format, through each of the four HTTP routes
JOB_MUTATIONS = 4  # per format, as files of the folder a real job indexes
REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from stair_search.cli import main; main()"]
JOB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------------ the cases


def spider_repro() -> bytes:
    """The report's exact file: ``Image.new('F', (48, 40)).save('zz.png', format='SPIDER')``."""
    out = io.BytesIO()
    Image.new("F", (48, 40)).save(out, format="SPIDER")
    return out.getvalue()


def written_formats() -> dict[str, bytes]:
    """One small image in every format Pillow can write here (the first mode each writer takes)."""
    Image.init()
    picture = draw_shape("red", "triangle", size=24).resize((24, 16))
    when = time.gmtime(1_767_225_600)  # a PDF holds its dates: fixed, so that the bytes are the same every run
    fixed = {"PDF": {"creationDate": when, "modDate": when}}
    samples = {}
    for name in sorted(Image.SAVE):
        for mode in ("RGB", "L", "1", "P", "RGBA", "F", "I"):
            out = io.BytesIO()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # "IM image format is deprecated"
                    (picture if mode == "RGB" else picture.convert(mode)).save(out, format=name, **fixed.get(name, {}))
            except Exception:  # this writer takes another mode, or is a stub without a plugin (BUFR, GRIB, ...)
                continue
            samples[name] = out.getvalue()
            break
    return samples


def mutated(data: bytes, rng: random.Random) -> bytes:
    """1-6 deterministic damages: a byte changed, four bytes set to 0xff (a huge size field), bytes inserted,
    a chunk repeated, or the end cut off."""
    damaged = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        kind, at = rng.random(), rng.randrange(max(len(damaged), 1))
        if kind < 0.45:
            damaged[at : at + 1] = bytes([rng.randrange(256)])
        elif kind < 0.6:
            damaged[at : at + 4] = b"\xff\xff\xff\xff"
        elif kind < 0.75:
            damaged[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind < 0.85:
            damaged[at:at] = damaged[at : at + rng.randint(1, 64)]
        else:
            del damaged[max(at, 1) :]
    return bytes(damaged)


def fuzz_cases(per_format: int) -> list[tuple[str, bytes]]:
    """(name, bytes): the SPIDER file of the report, every format's unmutated sample and ``per_format``
    mutations of each (the same bytes on every run and machine)."""
    cases = [("spider-repro", spider_repro())]
    for name, data in written_formats().items():
        cases.append((f"{name}-whole", data))
        cases += [(f"{name}-{i}", mutated(data, random.Random(f"{SEED}:{name}:{i}"))) for i in range(per_format)]
    return cases


def test_the_fuzzed_formats_are_every_format_pillow_writes():
    formats = written_formats()
    assert {"BLP", "DDS", "SPIDER", "PNG", "JPEG", "TIFF", "GIF", "WEBP", "ICNS", "PALM"} <= set(formats)
    assert fuzz_cases(2) == fuzz_cases(2)  # deterministic
    Image.init()
    print(f"\nPillow writers: {len(Image.SAVE)}; writable here: {len(formats)} ({', '.join(formats)})")


# ------------------------------------------------------------------------------------------------ D1 / D2


def test_every_mutated_format_is_decoded_or_skipped_with_one_line_never_raised(tiny_encoder):
    """The real decoder of the jobs and of the service: an item's skip reason, or a 413/422, for each case."""
    cases = fuzz_cases(DECODER_MUTATIONS)
    outcomes = {"indexed": 0, "skipped": 0, "422": 0, "413": 0}
    for name, data in cases:
        started = time.perf_counter()
        result = decode(Item(id=name, source=f"/fuzz/{name}.png", data=data), 0, tiny_encoder.preprocess)
        if result.skip_reason is None:
            outcomes["indexed"] += 1
            assert tuple(result.pixels.shape) == (3, 32, 32), name
        else:
            outcomes["skipped"] += 1
            assert "\n" not in result.skip_reason and len(result.skip_reason) < 400, (name, result.skip_reason)
        try:
            open_query_image(data, 5_000_000, 16_000_000)
        except ImageRejected as exc:
            assert exc.status in (413, 422) and "\n" not in str(exc), (name, exc)
            outcomes[str(exc.status)] += 1
        assert time.perf_counter() - started < 5, f"{name} took {time.perf_counter() - started:.1f} s to decode"
    print(f"\ndecoder fuzz: {len(cases)} cases, {outcomes}")
    assert outcomes["indexed"] > 0 and outcomes["skipped"] > 0


def test_the_spider_file_of_the_report_is_indexed_and_mutated_dds_and_blp_are_skipped(tiny_encoder):
    spider = decode(Item(id="zz.png", source="/x/zz.png", data=spider_repro()), 0, tiny_encoder.preprocess)
    assert spider.skip_reason is None and (spider.width, spider.height) == (48, 40)  # a valid SPIDER image
    written, reasons = written_formats(), set()
    for name in ("DDS", "BLP"):
        for i in range(60):
            data = mutated(written[name], random.Random(f"report:{name}:{i}"))
            result = decode(Item(id=name, source=f"/x/{name}.png", data=data), 0, tiny_encoder.preprocess)
            if result.skip_reason:
                assert "\n" not in result.skip_reason
                reasons.add(": ".join(result.skip_reason.split(": ")[:2]))
    print(f"\nmutated DDS and BLP skipped as: {sorted(reasons)}")
    assert {"corrupt or truncated image: NotImplementedError", "corrupt or truncated image: OSError"} <= reasons


def post_every_route(served, data: bytes) -> list[tuple[str, int, str]]:
    """The image as /search multipart, /search base64, /search/batch and /classify: (route, status, body)."""
    encoded = base64.b64encode(data).decode()
    answers = [
        ("search multipart", served.post("/search", files={"image": ("x.png", data, "image/png")},
                                         data={"mode": "dense", "k": "2"})),
        ("search base64", served.post("/search", json={"image": encoded, "mode": "dense", "k": 2})),
        ("search/batch", served.post("/search/batch", json={"requests": [{"image": encoded, "mode": "dense",
                                                                          "k": 2}]})),
        ("classify", served.post("/classify", json={"image": encoded, "labels": ["red circle", "blue square"]})),
    ]
    return [(route, response.status_code, response.text) for route, response in answers]


def test_every_mutated_format_as_a_query_image_answers_4xx_or_200_never_500(client):  # noqa: F811
    cases = fuzz_cases(HTTP_MUTATIONS)
    statuses: dict[int, int] = {}
    for name, data in cases:
        for route, status, text in post_every_route(client, data):
            statuses[status] = statuses.get(status, 0) + 1
            wordnet_missing = route == "classify" and status == 501 and "WordNet" in text
            assert status < 500 or wordnet_missing, (name, route, status, text[:300])
            if status in (413, 422):
                assert "\\n" not in text and len(text) < 600, (name, route, text)  # one line, nothing echoed
    print(f"\nHTTP fuzz: {len(cases)} images x 4 routes = {4 * len(cases)} requests, statuses {statuses}")


# ------------------------------------------------------------------------------------------------ a real job


def deeper_than_path_max(parent: Path) -> Path:
    """A folder below ``parent`` whose path is longer than PATH_MAX (made one level at a time, by descriptor);
    holds one real image. Returns its top level (inside ``parent``)."""
    top = parent / "deep"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(os.pathconf("/", "PC_PATH_MAX") // 200 + 1):
            os.mkdir("d" * 200, dir_fd=fd)
            inner = os.open("d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        with os.fdopen(os.open("lost.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            draw_shape("red", "circle").save(f, format="PNG")
    finally:
        os.close(fd)
    return top


def remove_deep(top: Path) -> None:
    """rmtree by descriptor (shutil.rmtree uses them on Linux, so a path over PATH_MAX is no obstacle)."""
    shutil.rmtree(top, ignore_errors=True)


def without_file_permission_override() -> list[str]:
    """A prefix that runs a command without root's power to read any file (so that a chmod 000 folder is
    unreadable to it), or [] when not root; None when root and setpriv is missing."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"] if setpriv else None


def test_a_real_job_on_a_folder_of_hostile_files_indexes_or_lists_every_one(tmp_path, tiny_config_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    cases = fuzz_cases(JOB_MUTATIONS)
    for name, data in cases:
        (folder / f"{name}.png").write_bytes(data)
    shutil.copyfile(folder / "spider-repro.png", folder / "zz.png")
    draw_shape("green", "square").save(folder / "good.png")
    os.mkfifo(folder / "fifo.png")  # at the top of the folder: a plain open() would block the job
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "sock.png"))
    locked = folder / "locked"
    locked.mkdir()
    draw_shape("blue", "circle").save(locked / "inside.png")
    prefix = without_file_permission_override()
    if prefix is not None:
        locked.chmod(0)
    deep = deeper_than_path_max(folder)
    out = tmp_path / "index"
    try:
        started = time.monotonic()
        done = subprocess.run([*(prefix or []), *CLI, "index", str(folder), "--out", str(out), "--model",
                               str(tiny_config_path), "--workers", "1", "--batch-size", "16"], env=JOB_ENV,
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
        took = time.monotonic() - started
    finally:
        locked.chmod(0o755)
        server.close()
        remove_deep(deep)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    indexed = set(IndexReader(out).ids())
    skipped = {row["id"]: row["reason"] for row in pq.read_table(out / SKIPPED_REPORT).to_pylist()}
    expected = {f"{name}.png" for name, _ in cases} | {"zz.png", "good.png", "fifo.png", "sock.png"}
    assert expected - indexed - set(skipped) == set(), "files neither indexed nor listed"
    assert {"good.png", "zz.png", "spider-repro.png"} <= indexed
    assert skipped["fifo.png"] == skipped["sock.png"] == "not a regular file (a FIFO, device or socket)"
    deep_entries = [reason for doc_id, reason in skipped.items() if doc_id.startswith("deep/")]
    assert len(deep_entries) == 1 and deep_entries[0].startswith("unreadable folder: File name too long")
    if prefix is not None:
        assert skipped["locked"].startswith("unreadable folder: Permission denied; the images in it are not indexed")
    assert all("\n" not in reason for reason in skipped.values())
    lost = expected - indexed - set(skipped)
    print(f"\njob fuzz: {len(cases)} fuzzed files + 4 others in {took:.0f} s: indexed {len(indexed)}, skipped "
          f"{len(skipped)}, lost {len(lost)}, rc {done.returncode}")


def test_a_folder_path_longer_than_path_max_is_one_line(tmp_path, tiny_config_path):
    deep = deeper_than_path_max(tmp_path)
    try:
        path = str(deep)
        while len(os.fsencode(path)) <= os.pathconf("/", "PC_PATH_MAX"):
            path = os.path.join(path, "d" * 200)
        done = subprocess.run([*CLI, "index", path, "--out", str(tmp_path / "index"), "--model",
                               str(tiny_config_path)], env=JOB_ENV, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=240)
    finally:
        remove_deep(deep)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "longer than this system allows (PATH_MAX" in lines[0], lines
    assert not (tmp_path / "index").exists()


# ------------------------------------------------------------------------------------------------ D9: downloads


@contextlib.contextmanager
def hostile_http_server() -> Iterator[str]:
    """127.0.0.1: /good.png, /drip.png (headers, then 1 byte every 2 s), /short.png (a Content-Length it never
    sends in full), /garbage.png (not HTTP at all), /missing.png (404)."""
    picture = io.BytesIO()
    draw_shape("yellow", "circle").save(picture, format="PNG")
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/garbage.png":
                self.wfile.write(b"SPDY/9 what\r\n\r\n")
                return
            if self.path == "/missing.png":
                self.send_error(404)
                return
            body = picture.getvalue()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body) if self.path == "/good.png" else 10 * len(body)))
            self.end_headers()
            if self.path == "/drip.png":
                for byte in body * 10:
                    if stop.wait(2):
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


def test_every_download_has_a_total_deadline(tmp_path, tiny_encoder, monkeypatch):
    monkeypatch.setenv(FETCH_DEADLINE_ENV, "3")
    with hostile_http_server() as base:
        names = ("good", "drip", "short", "garbage", "missing")
        (tmp_path / "urls.txt").write_text("".join(f"{base}/{name}.png\n" for name in names))
        started = time.monotonic()
        summary = indexer.run(IndexJob(tmp_path / "urls.txt", tmp_path / "index", workers=0), encoder=tiny_encoder,
                              progress=False)
        took = time.monotonic() - started
    reasons = {row["id"].rsplit("/", 1)[1]: row["reason"]
               for row in pq.read_table(tmp_path / "index" / SKIPPED_REPORT).to_pylist()}
    assert summary.indexed == 1 and set(IndexReader(tmp_path / "index").ids()) == {f"{base}/good.png"}
    assert reasons["drip.png"].startswith("download took longer than 3 s (the total time one download may take")
    assert reasons["short.png"].startswith("read failed: IncompleteRead"), reasons["short.png"]
    assert reasons["garbage.png"].startswith("read failed: BadStatusLine"), reasons["garbage.png"]
    assert reasons["missing.png"].startswith("read failed: HTTPError: HTTP Error 404"), reasons["missing.png"]
    assert took < 60, f"the job took {took:.0f} s"  # the drip alone would hold it 200 s without the deadline


def test_an_image_url_query_that_drips_answers_504_within_its_timeout(shapes_index):  # noqa: F811
    settings = {"image_url_hosts": ("127.0.0.1",), "image_url_timeout_s": 2.0}
    with hostile_http_server() as base, make_client(IndexRegistry({"shapes": shapes_index}), **settings) as served:
        started = time.monotonic()
        drip = served.post("/search", json={"image_url": f"{base}/drip.png", "mode": "dense"})
        took = time.monotonic() - started
        garbage = served.post("/search", json={"image_url": f"{base}/garbage.png", "mode": "dense"})
        short = served.post("/search", json={"image_url": f"{base}/short.png", "mode": "dense"})
    assert drip.status_code == 504 and took < 10, (drip.text, took)
    assert garbage.status_code == 422 and "BadStatusLine" in garbage.text
    assert short.status_code == 422 and "IncompleteRead" in short.text


# ------------------------------------------------------------------------------------------------ D10: tables


def test_a_corrupt_parquet_row_group_and_huge_csv_fields_skip_only_themselves(tmp_path, tiny_encoder):
    images = tmp_path / "images"
    images.mkdir()
    paths = []
    for i, colour in enumerate(COLOURS):
        for shape in ("circle", "square", "triangle"):
            path = images / f"{i}-{colour}-{shape}.png"
            draw_shape(colour, shape).save(path)
            paths.append(str(path))
    table = pa.table({"path": paths, "caption": [f"caption {i}" for i in range(len(paths))]})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=4, compression="none")
    column = pq.ParquetFile(tmp_path / "rows.parquet").metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    damaged = bytearray((tmp_path / "rows.parquet").read_bytes())
    damaged[start : start + 24] = b"\xff" * 24  # the page header: "Couldn't deserialize thrift"
    (tmp_path / "rows.parquet").write_bytes(bytes(damaged))
    summary = indexer.run(IndexJob(tmp_path / "rows.parquet", tmp_path / "parquet-index", workers=0),
                          encoder=tiny_encoder, progress=False)
    assert summary.indexed == len(paths) - 4
    assert set(IndexReader(tmp_path / "parquet-index").ids()) == set(paths[:4] + paths[8:])
    [row] = pq.read_table(tmp_path / "parquet-index" / SKIPPED_REPORT).to_pylist()
    assert row["reason"].startswith(f"corrupt parquet row group 1 of {tmp_path / 'rows.parquet'} (rows 4 to 7): ")
    assert "the file's other row groups are read" in row["reason"] and "\n" not in row["reason"]

    long_caption = "a caption of 200,000 characters " * 6250
    lines = ["path,caption", f"{paths[0]},{long_caption}", f"{paths[1]},{'x' * (17 * 1024 * 1024)}",
             f"{paths[2]},short"]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    summary = indexer.run(IndexJob(tmp_path / "list.csv", tmp_path / "csv-index", workers=0), encoder=tiny_encoder,
                          progress=False)
    assert summary.indexed == 2 and set(IndexReader(tmp_path / "csv-index").ids()) == {paths[0], paths[2]}
    [row] = pq.read_table(tmp_path / "csv-index" / SKIPPED_REPORT).to_pylist()
    assert row["id"] == "list.csv:3" and row["reason"].startswith(
        f"unreadable CSV line 3 of {tmp_path / 'list.csv'}: field larger than field limit")
    import csv

    assert csv.field_size_limit() == 128 * 1024  # put back after the source was read


def test_an_unreadable_parquet_file_among_readable_ones_is_one_skipped_item(tmp_path, tiny_encoder):
    (tmp_path / "tables").mkdir()
    image = io.BytesIO()
    draw_shape("red", "circle").save(image, format="PNG")
    pq.write_table(pa.table({"id": ["a"], "image": [image.getvalue()]}), tmp_path / "tables" / "a.parquet")
    (tmp_path / "tables" / "b.parquet").write_bytes(b"PAR1" + os.urandom(500) + b"PAR1")
    summary = indexer.run(IndexJob(tmp_path / "tables", tmp_path / "index", workers=0,
                                   options=SourceOptions(id_column="id")), encoder=tiny_encoder, progress=False)
    [row] = pq.read_table(tmp_path / "index" / SKIPPED_REPORT).to_pylist()
    assert summary.indexed == 1 and row["id"] == "b.parquet#file"
    assert row["reason"].startswith(f"{tmp_path / 'tables' / 'b.parquet'} is not a readable parquet file (")
    assert row["reason"].endswith(". Its rows are skipped.") and "\n" not in row["reason"]


# ------------------------------------------------------------------------------------------------ D4, D16: sources


def tar_of(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png(colour: str, shape: str = "circle", compress_level: int = 6) -> bytes:
    out = io.BytesIO()
    draw_shape(colour, shape).save(out, format="PNG", compress_level=compress_level)
    return out.getvalue()


def centre_colour(response) -> tuple[int, int, int]:
    image = Image.open(io.BytesIO(response.content)).convert("RGB")
    return image.getpixel((image.width // 2, image.height // 2))


def test_thumbnails_of_a_tar_cut_after_indexing_answer_404_with_one_line(tmp_path, tiny_encoder):
    tar_of(tmp_path / "shard.tar", [("a.png", png("red", compress_level=0)), ("b.png", png("blue", compress_level=0)),
                                    ("c.png", png("green", compress_level=0))])
    indexer.run(IndexJob(tmp_path / "shard.tar", tmp_path / "index", workers=0), encoder=tiny_encoder, progress=False)
    with tarfile.open(tmp_path / "shard.tar") as tar:
        b, c = tar.getmember("b.png"), tar.getmember("c.png")
    whole = (tmp_path / "shard.tar").read_bytes()
    with make_client(IndexRegistry({"tar": tmp_path / "index"})) as served:
        assert served.get("/thumbnails/shard.tar%2Fb").status_code == 200
        (tmp_path / "shard.tar").write_bytes(whole[: b.offset_data + 100])  # cut inside b's data
        cut_inside = served.get("/thumbnails/shard.tar%2Fb")
        past_the_cut = served.get("/thumbnails/shard.tar%2Fc")
        before_the_cut = served.get("/thumbnails/shard.tar%2Fa")
        (tmp_path / "shard.tar").write_bytes(b"\x00" * 10 + os.urandom(2000))  # replaced by junk
        junk = served.get("/thumbnails/shard.tar%2Fa?size=64")
        (tmp_path / "shard.tar").unlink()
        os.mkfifo(tmp_path / "shard.tar")  # never opened: it would block the server's thread
        fifo = served.get("/thumbnails/shard.tar%2Fa?size=32")
    assert before_the_cut.status_code == 200
    for response in (cut_inside, past_the_cut, junk, fifo):
        assert response.status_code == 404, response.text
        assert "\n" not in response.json()["detail"] and "no thumbnail for" in response.json()["detail"]
    assert "cut short" in cut_inside.text or "cut or damaged" in cut_inside.text, cut_inside.text
    assert "no member 'c.png'" in past_the_cut.text or "cut or damaged" in past_the_cut.text, past_the_cut.text
    assert "not a regular file" in fifo.text and c.offset > b.offset


def test_a_file_named_like_a_tar_member_and_names_that_are_not_utf8_get_their_own_thumbnails(tmp_path, tiny_encoder):
    folder = tmp_path / "photos"
    folder.mkdir()
    tar_of(folder / "evil.tar", [("m.png", png("red"))])  # a real tar; its member is red
    (folder / "evil.tar#m.png").write_bytes(png("blue"))  # a file named like that member; it is blue
    latin1 = Path(os.fsdecode(os.fsencode(folder) + b"/caf\xe9 #1.png"))  # not UTF-8, and with a '#'
    latin1.write_bytes(png("green"))
    indexer.run(IndexJob(folder, tmp_path / "folder-index", workers=0), encoder=tiny_encoder, progress=False)
    indexer.run(IndexJob(folder / "evil.tar", tmp_path / "tar-index", workers=0), encoder=tiny_encoder,
                progress=False)
    reader = IndexReader(tmp_path / "folder-index")
    assert sorted(reader.ids()) == ["caf\\xe9 #1.png", "evil.tar#m.png"]
    with make_client(IndexRegistry({"folder": tmp_path / "folder-index", "tar": tmp_path / "tar-index"})) as served:
        file_doc = served.get("/documents/evil.tar%23m.png", params={"index": "folder"}).json()
        member_doc = served.get("/documents/evil.tar%2Fm", params={"index": "tar"}).json()
        as_file = served.get("/thumbnails/evil.tar%23m.png", params={"index": "folder"})
        as_member = served.get("/thumbnails/evil.tar%2Fm", params={"index": "tar"})
        latin = served.get("/thumbnails/caf%5Cxe9%20%231.png", params={"index": "folder"})
    assert file_doc["source"] != member_doc["source"]
    assert parse_source(file_doc["source"]) == SourceLocation(str(folder / "evil.tar#m.png"))
    assert parse_source(member_doc["source"]) == SourceLocation(str(folder / "evil.tar"), "m.png")
    assert member_doc["source"] == f"{folder / 'evil.tar'}#m.png"  # tar members are stored as they always were
    for response, colour in ((as_file, "blue"), (as_member, "red"), (latin, "green")):
        assert response.status_code == 200, response.text
        assert centre_colour(response) == pytest.approx(COLOURS[colour], abs=12), colour


def test_stored_sources_round_trip_and_old_indexes_still_resolve(tmp_path):
    odd = [str(tmp_path / "plain.png"), str(tmp_path / "a b#1.png"), str(tmp_path / "x.tar#y.png"),
           str(tmp_path / "100%.png"), os.fsdecode(os.fsencode(tmp_path) + b"/\xff\xfe.png"),
           str(tmp_path / "new\nline?.png"), str(tmp_path / "é.png")]
    for path in odd:
        stored = file_source(path)
        assert stored.encode("utf-8") and parse_source(stored) == SourceLocation(path), (path, stored)
    assert file_source(odd[0]) == odd[0] and file_source(odd[1]) == odd[1]  # ordinary names stay paths
    members = [("/d/s.tar", "k.png"), ("/d/a#b.tar", "k.png"), ("/d/s.tar.gz", "k.png"), ("/d/s.tar", "k#1.png"),
               ("/d/s.tar", os.fsdecode(b"\xe9.png")), ("/d/s.tar", "dir/http://x.png"), ("/d/s.zip", "a.tar#b.png"),
               ("/d/s.tgz", "k.png")]
    for archive, member in members:
        assert parse_source(member_source(archive, member)) == SourceLocation(archive, member), (archive, member)
    assert member_source("/d/s.tar", "k.png") == "/d/s.tar#k.png"  # as every index has stored tar members
    assert member_source("/d/s.tar.gz", "k") == "/d/s.tar.gz#k"
    assert file_source("/d/s.tgz#k.png").startswith("file:///d/s.tgz%23k.png")
    with pytest.raises(ValueError, match="remote"):
        parse_source("s3://bucket/key.png")
    # indexes built before: 'x.tar#m' is a member; a name that is not UTF-8 was stored with \xNN escapes
    assert parse_source("/d/x.tar#m.png") == SourceLocation("/d/x.tar", "m.png")
    real = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.png"))
    real.write_bytes(png("green"))
    legacy = str(tmp_path / "caf\\xe9.png")
    assert readings(parse_source(legacy))[-1] == SourceLocation(str(real))
    assert stored_image(legacy, 1_000_000).getpixel((32, 32)) == pytest.approx(COLOURS["green"], abs=12)
    assert stored_image(file_source(str(real)), 1_000_000).size == (64, 64)


def test_tar_members_are_read_without_any_tarfile_error_escaping(tmp_path):
    tar_of(tmp_path / "s.tar", [("a.png", png("red")), ("b.png", png("blue"))])
    assert read_member(tmp_path / "s.tar", "b.png", 10**6) == png("blue")
    whole = (tmp_path / "s.tar").read_bytes()
    with tarfile.open(tmp_path / "s.tar") as tar:
        inside_b = tar.getmember("b.png").offset_data + 10
    for size in (0, 10, 511, 512, 700, inside_b):
        (tmp_path / "cut.tar").write_bytes(whole[:size])
        with pytest.raises(NotRead):
            read_member(tmp_path / "cut.tar", "b.png", 10**6)
    with pytest.raises(NotRead, match="too large"):
        read_member(tmp_path / "s.tar", "a.png", 10)
    rng = np.random.default_rng(SEED)
    for _ in range(30):
        damaged = bytearray(whole)
        for at in rng.integers(0, len(whole), 8):
            damaged[at] = int(rng.integers(0, 256))
        (tmp_path / "bad.tar").write_bytes(bytes(damaged))
        with contextlib.suppress(NotRead):
            read_member(tmp_path / "bad.tar", "b.png", 10**6)


def test_a_webdataset_member_keeps_its_own_name_in_the_stored_source(tmp_path):
    tar_of(tmp_path / "s.tar", [("UPPER.PNG", png("red")), ("UPPER.txt", b"caps")])
    [item] = list(iter_items(str(tmp_path / "s.tar")))
    assert item.source == f"{tmp_path / 's.tar'}#UPPER.PNG" and item.caption == "caps"
    assert read_member(tmp_path / "s.tar", parse_source(item.source).member, 10**6) == png("red")
