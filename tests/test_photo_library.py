"""A photo library as a phone or camera writes it (issue 38, and issue 40's camera-sized query images).

Real photos (scikit-image's samples, scaled up to 12 megapixels with sensor grain by
``stair_search.data.photos.camera_photo``) saved as large JPEGs, HEIC files written here through pillow-heif, EXIF
written here with known values, and EXIF made hostile by hand (wrong types, huge values, IFD loops):

- a photo decoded at reduced size (DCT scaling to twice the model's input) gives the default model the same
  embedding as a full decode (cosine >= 0.99) and the same top sparse words;
- HEIC files are indexed and found;
- ``taken_at``, ``camera`` and (``--exif gps`` only) ``latitude`` / ``longitude`` are stored, filtered on by
  date and place (CLI, Python, HTTP), exported and served to the page's detail view; hostile EXIF leaves its
  field out and never stops a job;
- thumbnails of photos are JPEGs with an ETag (304 on ``If-None-Match``) decoded at reduced size, PNG for
  drawings and transparency; a 6000x4000 query image is reduced, not refused.
"""

from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from indexer.decode import DecodeLimits, decode
from indexer.sources import FILE_FIELDS, Item
from server import IndexRegistry, ServerSettings, create_app
from server.imaging import make_thumbnail, open_query_image, stored_decode
from stair_search.cli import app
from stair_search.data.photos import camera_exif, camera_photo, sample_dir
from stair_search.images import centre_cut, decode_image, file_source
from stair_search.index import IndexReader
from stair_search.query.filters import parse_cli_filters
from stair_search.retrieve import QueryRouter, SearchRequest
from tests.conftest import draw_shape

pillow_heif = pytest.importorskip("pillow_heif", reason="HEIC support comes from pillow-heif (default install)")

PARIS = dict(taken="2019:06:15 18:05:00", offset="+02:00", make="Canon", model="Canon EOS 5D Mark IV",
             latitude=48.858370, longitude=2.294481, orientation=6)
ROME = dict(taken="2019:07:02 09:30:00", make="NIKON CORPORATION", model="NIKON D750", latitude=41.890210,
            longitude=12.492231)
OLD = dict(taken="2018:12:24 20:00:00", offset="-05:00", make="Apple", model="iPhone 12")
HEIC = dict(taken="2020:01:05 12:00:00", offset="+01:00", make="Apple", model="iPhone 12 Pro")


def jpeg(image: Image.Image, exif: Image.Exif | bytes | None = None, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, **({"exif": exif} if exif is not None else {}))
    return out.getvalue()


# ------------------------------------------------------------------------------------- hostile EXIF, by hand

ASCII, SHORT, LONG, RATIONAL = 2, 3, 4, 5
MAKE, MODEL, ORIENTATION, SOFTWARE, EXIF_IFD, GPS_IFD = 0x010F, 0x0110, 0x0112, 0x0131, 0x8769, 0x8825
TAKEN, OFFSET = 0x9003, 0x9011


def text(tag: int, value: str) -> tuple:
    return tag, ASCII, len(value) + 1, value.encode("latin-1") + b"\0"


def number(tag: int, value: int, kind: int = LONG) -> tuple:
    return tag, kind, 1, struct.pack("<I" if kind == LONG else "<H", value)


def rationals(tag: int, pairs: list[tuple[int, int]]) -> tuple:
    return tag, RATIONAL, len(pairs), b"".join(struct.pack("<II", n, d) for n, d in pairs)


def pointer(tag: int, ifd: int) -> tuple:
    return tag, LONG, 1, ("ifd", ifd)


def raw_exif(ifds: list[list[tuple]], next_of: dict[int, int] | None = None) -> bytes:
    """An EXIF block laid out by hand (little-endian TIFF): IFD ``k`` at its own offset, an entry's value inline
    when it fits 4 bytes, else in the data area; ``("ifd", j)`` points at IFD ``j`` (loops allowed)."""
    next_of = next_of or {}
    offsets, at = [], 8
    for entries in ifds:
        offsets.append(at)
        at += 2 + 12 * len(entries) + 4
    body, data = b"", b""
    for k, entries in enumerate(ifds):
        body += struct.pack("<H", len(entries))
        for tag, kind, count, payload in entries:
            payload = struct.pack("<I", offsets[payload[1]]) if isinstance(payload, tuple) else payload
            if len(payload) <= 4:
                value = payload.ljust(4, b"\0")
            else:
                value, data = struct.pack("<I", at + len(data)), data + payload
            body += struct.pack("<HHI", tag, kind, count) + value
        body += struct.pack("<I", offsets[next_of[k]] if k in next_of else 0)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + body + data


HOSTILE = {
    # every field of the wrong type: numbers for text, text for rationals, a zero denominator
    "wrong-types.jpg": (raw_exif([
        [number(MAKE, 7, SHORT), number(MODEL, 5), text(ORIENTATION, "x"), pointer(EXIF_IFD, 1), pointer(GPS_IFD, 2)],
        [number(TAKEN, 20190601), rationals(OFFSET, [(1, 2)])],
        [number(1, 78, SHORT), text(2, "48.85"), text(3, "E"), rationals(4, [(1, 0), (0, 1), (0, 1)])]]), {}),
    # absurd sizes and values: a 60 kB make, year 99999, 10^9 degrees, an entry claiming 4 G values
    "huge-values.jpg": (raw_exif([
        [text(MAKE, "A" * 60_000), text(MODEL, "B" * 300), (SOFTWARE, ASCII, 0xFFFFFFF0, struct.pack("<I", 100)),
         pointer(EXIF_IFD, 1), pointer(GPS_IFD, 2)],
        [text(TAKEN, "99999:12:31 25:61:61"), text(OFFSET, "+99:99")],
        [text(1, "N"), rationals(2, [(10**9, 1), (0, 1), (0, 1)]), text(3, "E"),
         rationals(4, [(2, 1), (17, 1), (40, 1)])]]), {}),
    # IFDs that point at themselves and at each other: what is sound in them is kept, nothing loops
    "loops.jpg": (raw_exif([
        [text(MAKE, "Canon"), text(MODEL, "Canon EOS R"), pointer(EXIF_IFD, 1), pointer(GPS_IFD, 2)],
        [pointer(EXIF_IFD, 1), pointer(0xA005, 0), text(TAKEN, "2017:03:04 05:06:07")],
        [pointer(GPS_IFD, 2), text(1, "S")]], next_of={0: 0, 1: 0, 2: 2}),
        {"camera": "Canon EOS R", "taken_at": "2017-03-04T05:06:07"}),
    # a sound date beside a position out of range: the date stays, the place is left out
    "bad-place.jpg": (raw_exif([
        [pointer(EXIF_IFD, 1), pointer(GPS_IFD, 2)],
        [text(TAKEN, "2016:02:29 23:59:59"), text(OFFSET, "+05:30")],
        [text(1, "N"), rationals(2, [(91, 1), (0, 1), (0, 1)]), text(3, "W"),
         rationals(4, [(3, 1), (75, 1), (0, 1)])]]),
        {"taken_at": "2016-02-29T23:59:59+05:30"}),
}


# ------------------------------------------------------------------------------------------ the library

@pytest.fixture(scope="module")
def library(tmp_path_factory) -> dict:
    """A folder as a phone's export looks: camera JPEGs with EXIF, a HEIC, a PNG with transparency, a drawing,
    and JPEGs with hostile EXIF; indexed through the CLI with ``--exif gps``."""
    root = tmp_path_factory.mktemp("library")
    folder = root / "photos"
    folder.mkdir()
    (folder / "paris.jpg").write_bytes(jpeg(camera_photo("coffee.png"), camera_exif(**PARIS)))
    (folder / "rome.jpg").write_bytes(jpeg(camera_photo("astronaut.png", (1600, 1200)), camera_exif(**ROME)))
    (folder / "old.jpg").write_bytes(jpeg(camera_photo("chelsea.png", (800, 600)), camera_exif(**OLD)))
    heic = camera_photo("rocket.jpg", (1200, 800), grain=0)
    heic.save(folder / "rocket.heic", format="HEIF", quality=80, exif=camera_exif(**HEIC).tobytes())
    with Image.open(sample_dir() / "logo.png") as logo:
        logo.convert("RGBA").save(folder / "logo.png")
    draw_shape("red", "circle", size=96).save(folder / "circle.png")
    for name, (exif, _) in HOSTILE.items():
        (folder / name).write_bytes(jpeg(draw_shape("blue", "square", size=96), exif))
    return {"root": root, "folder": folder}


@pytest.fixture(scope="module")
def library_index(library, tiny_config_path):
    index_dir = library["root"] / "index"
    result = CliRunner().invoke(app, ["index", str(library["folder"]), "--out", str(index_dir), "--model",
                                      str(tiny_config_path), "--workers", "0", "--exif", "gps"])
    assert result.exit_code == 0, result.output
    return index_dir


@pytest.fixture(scope="module")
def documents(library_index) -> dict[str, dict]:
    with IndexReader(library_index) as index:
        rows = index.documents(next(iter(index.live(10_000))), ["id", "metadata", "width", "height"])
    return {row["id"]: row for row in rows}


@pytest.fixture(scope="module")
def client(library_index):
    settings = ServerSettings(reload_interval_s=0)
    with TestClient(create_app(IndexRegistry({"photos": library_index}), settings)) as served:
        yield served


# ------------------------------------------------------------------------------ decoding at the needed size

def test_a_reduced_decode_gives_the_default_model_the_embedding_of_a_full_decode():
    """Three real photos as 12-megapixel JPEGs: decoded at 1/4 (DCT scaling, 1000x750) for the default model
    (224 px input) and in full, the dense embeddings agree (cosine >= 0.99) and so do the top sparse words."""
    from stair_search.encode import Encoder

    encoder = Encoder()  # the default model
    preprocess = encoder.model.preprocess
    reduced, full = [], []
    for name in ("coffee.png", "astronaut.png", "chelsea.png"):
        data = jpeg(camera_photo(name))
        item = Item(id=name, source=name, data=data)
        assert decode_image(data, 64_000_000, shortest=448).rgb.size == (1000, 750)  # 1/4: DCT-scaled
        reduced.append(decode(item, 0, preprocess).pixels)
        full.append(preprocess(centre_cut(decode_image(data, 64_000_000).rgb)))
    small, large = (encoder.encode_pixels(torch.stack(pixels)) for pixels in (reduced, full))
    cosines = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
               for a, b in zip(small.dense, large.dense, strict=True)]
    print(f"\nreduced vs full decode, default model: cosine {', '.join(f'{c:.4f}' for c in cosines)}")
    assert min(cosines) >= 0.99, cosines
    for a, b in zip(small.sparse, large.sparse, strict=True):
        top_a, top_b = (sorted(vector, key=vector.get, reverse=True)[:10] for vector in (a, b))
        assert top_a[0] == top_b[0] and len(set(top_a) & set(top_b)) >= 8, (top_a, top_b)  # near-ties may swap


def test_exif_orientation_is_applied_to_a_reduced_decode():
    data = jpeg(camera_photo("coffee.png", grain=0), camera_exif(orientation=6))  # stored landscape, shown portrait
    decoded = decode_image(data, 64_000_000, shortest=448)
    assert (decoded.width, decoded.height) == (4000, 3000) and decoded.rgb.size == (750, 1000)
    upright = decode_image(data, 64_000_000).rgb.resize((750, 1000), Image.Resampling.BOX)
    difference = np.abs(np.asarray(decoded.rgb, dtype=np.int16) - np.asarray(upright, dtype=np.int16))
    assert difference.mean() < 4


def test_small_images_and_formats_without_dct_scaling_decode_in_full():
    png = io.BytesIO()
    Image.new("RGB", (3000, 2000), "white").save(png, format="PNG")
    assert decode_image(png.getvalue(), 64_000_000, shortest=448).rgb.size == (3000, 2000)
    small = jpeg(Image.new("RGB", (800, 600), "white"))
    assert decode_image(small, 64_000_000, shortest=448).rgb.size == (800, 600)  # a 1/2 would go under 448


# --------------------------------------------------------------------------------------------------- HEIC

def test_heic_photos_are_indexed_and_found(library, library_index, tiny_encoder, documents):
    assert documents["rocket.heic"]["width"] == 1200 and documents["rocket.heic"]["height"] == 800
    assert documents["rocket.heic"]["metadata"]["taken_at"] == "2020-01-05T12:00:00+01:00"
    assert documents["rocket.heic"]["metadata"]["camera"] == "Apple iPhone 12 Pro"
    with Image.open(library["folder"] / "rocket.heic") as query:
        assert query.format == "HEIF"
        query.load()
        hits = QueryRouter(IndexReader(library_index), tiny_encoder).search(
            SearchRequest(image=query, k=3, mode="dense")).hits
    assert hits[0].id == "rocket.heic"


# --------------------------------------------------------------------------------------------------- EXIF

def exif(document: dict) -> dict:
    """A document's metadata read from its EXIF: without the folder source's own fields (folder, size, modified)."""
    return {k: v for k, v in document["metadata"].items() if k not in FILE_FIELDS}


def test_exif_fields_are_stored_as_metadata(documents):
    assert exif(documents["paris.jpg"]) == {"taken_at": "2019-06-15T18:05:00+02:00",
                                                  "camera": "Canon EOS 5D Mark IV",
                                                  "latitude": 48.85837, "longitude": 2.294481}
    assert documents["paris.jpg"]["width"] == 4000  # as the file declares it, not as it was decoded
    assert exif(documents["rome.jpg"]) == {"taken_at": "2019-07-02T09:30:00", "camera": "NIKON D750",
                                                 "latitude": 41.89021, "longitude": 12.492231}
    assert exif(documents["old.jpg"]) == {"taken_at": "2018-12-24T20:00:00-05:00", "camera": "Apple iPhone 12"}
    assert exif(documents["circle.png"]) == {}
    assert documents["circle.png"]["metadata"]["folder"] == ["."]


def test_gps_is_kept_only_when_asked_for(library):
    data = (library["folder"] / "paris.jpg").read_bytes()
    item = Item(id="p", source="p", data=data)
    basic = decode(item, 0, lambda image: image, DecodeLimits()).metadata
    assert basic == {"taken_at": "2019-06-15T18:05:00+02:00", "camera": "Canon EOS 5D Mark IV"}
    assert decode(item, 0, lambda image: image, DecodeLimits(exif="none")).metadata == {}
    with pytest.raises(ValueError, match="exif must be one of none, basic, gps"):
        DecodeLimits(exif="everything")


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_exif_leaves_its_field_out_and_never_stops_a_job(documents, library, name):
    expected = HOSTILE[name][1]
    assert exif(documents[name]) == expected  # indexed, with only the sound fields
    decoded = decode(Item(id=name, source=name, data=(library["folder"] / name).read_bytes()), 0,
                     lambda image: image, DecodeLimits(exif="gps"))
    assert decoded.skip_reason is None and decoded.metadata == expected


def router_ids(router: QueryRouter, filters: dict) -> set[str]:
    return {hit.id for hit in router.search(SearchRequest(text="photo", mode="dense", k=20, filters=filters)).hits}


def test_photos_are_filtered_by_date_and_by_place(library_index, tiny_encoder):
    router = QueryRouter(IndexReader(library_index), tiny_encoder)
    june = parse_cli_filters(["taken_at>=2019-06-01", "taken_at<=2019-06-30"])
    assert router_ids(router, june) == {"paris.jpg"}  # the 30th's evening is in June: a whole day per bound
    assert router_ids(router, parse_cli_filters(["taken_at>=2019"])) == {"paris.jpg", "rome.jpg", "rocket.heic"}
    assert router_ids(router, parse_cli_filters(["taken_at<2019-01-01"])) == {"old.jpg", "loops.jpg",
                                                                                "bad-place.jpg"}
    assert router_ids(router, parse_cli_filters(["taken_at<=2018-12-24"])) == {"old.jpg", "loops.jpg",
                                                                                "bad-place.jpg"}
    europe_north = {"latitude": {"gte": 45, "lte": 50}, "longitude": {"gte": -5, "lte": 10}}
    assert router_ids(router, europe_north) == {"paris.jpg"}
    assert router_ids(router, parse_cli_filters(["latitude<45"])) == {"rome.jpg"}
    assert router_ids(router, {"camera": "NIKON D750"}) == {"rome.jpg"}


def test_a_date_filter_through_the_cli_and_the_http_api(library_index, tiny_config_path, client):
    result = CliRunner().invoke(app, ["search", str(library_index), "photo", "--mode", "dense", "--json",
                                      "--filter", "taken_at>=2019-06-01", "--filter", "taken_at<2019-07-01",
                                      "--model", str(tiny_config_path)])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["id"] for line in result.output.strip().splitlines()] == ["paris.jpg"]
    body = client.post("/search", json={"query": "photo", "mode": "dense", "k": 20,
                                        "filters": {"taken_at": {"gte": "2019-07", "lt": "2020"}}}).json()
    assert [hit["id"] for hit in body["hits"]] == ["rome.jpg"], body


def test_exif_fields_are_exported_and_served_to_the_detail_view(library_index, client, tmp_path):
    out = tmp_path / "export.parquet"
    result = CliRunner().invoke(app, ["export", str(library_index), "--out", str(out)])
    assert result.exit_code == 0, result.output
    exported = {row["id"]: json.loads(row["metadata"]) for row in pq.read_table(out).to_pylist()}
    assert exported["paris.jpg"]["taken_at"] == "2019-06-15T18:05:00+02:00"
    assert exported["rome.jpg"]["longitude"] == 12.492231
    document = client.get("/documents/paris.jpg").json()
    assert document["metadata"]["camera"] == "Canon EOS 5D Mark IV" and document["metadata"]["latitude"] == 48.85837


# --------------------------------------------------------------------------------------------- thumbnails

def test_photo_thumbnails_are_jpegs_with_an_etag_and_answer_304_when_unchanged(client):
    response = client.get("/thumbnails/paris.jpg")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert "max-age=" in response.headers["cache-control"] and response.headers["etag"].startswith('"')
    with Image.open(io.BytesIO(response.content)) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (96, 128)  # EXIF orientation 6: portrait
    etag = response.headers["etag"]
    again = client.get("/thumbnails/paris.jpg", headers={"If-None-Match": etag})
    assert again.status_code == 304 and not again.content and again.headers["etag"] == etag
    assert client.get("/thumbnails/paris.jpg", headers={"If-None-Match": '"other"'}).status_code == 200
    larger = client.get("/thumbnails/paris.jpg", params={"size": 256})
    assert larger.headers["etag"] != etag  # another size, another ETag
    heic = client.get("/thumbnails/rocket.heic")
    assert heic.status_code == 200 and heic.headers["content-type"] == "image/jpeg"


def test_drawings_and_transparent_images_keep_png_thumbnails(client):
    for name in ("logo.png", "circle.png"):
        response = client.get(f"/thumbnails/{name}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png", name
        assert response.headers["etag"]


def test_thumbnails_are_decoded_at_reduced_size(library):
    source = file_source(str(library["folder"] / "paris.jpg"))
    decoded = stored_decode(source, 64_000_000, longest=256)
    assert decoded.rgb.size == (375, 500)  # 1/8 of 4000x3000 (turned upright), not the 12 megapixels
    thumbnail = make_thumbnail(source, 128, 64_000_000)
    assert thumbnail.media_type == "image/jpeg" and len(thumbnail.data) < 20_000


# ------------------------------------------------------------------------------------ camera-sized queries

def test_a_6000x4000_query_photo_is_reduced_not_refused(client):
    data = jpeg(camera_photo("astronaut.png", (6000, 4000)), quality=95)  # with sensor grain, as a camera saves it
    limits = ServerSettings().limits  # the defaults
    assert 16_000_000 < 6000 * 4000 and 10 * 1024 * 1024 < len(data) < limits.max_image_bytes  # a real camera size
    assert limits.max_image_pixels == 16_000_000  # the pixel cap stays, for bombs: a JPEG is reduced under it
    assert open_query_image(data, limits.max_image_bytes, limits.max_image_pixels).size == (1500, 1000)  # 1/4
    upload = client.post("/search", files={"image": ("big.jpg", data, "image/jpeg")}, data={"mode": "dense"})
    assert upload.status_code == 200, upload.text
    as_json = client.post("/search", json={"image": base64.b64encode(data).decode(), "mode": "dense"})
    assert as_json.status_code == 200, as_json.text
    assert upload.json()["hits"][0]["id"] == as_json.json()["hits"][0]["id"] == "rome.jpg"
