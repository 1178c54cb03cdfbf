"""Indexer sources and decoding on real files written here: every bad input is skipped with its reason."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from indexer.decode import decode
from indexer.sources import Item, SourceOptions, describe, expand_braces, iter_items
from tests.conftest import draw_shape


def identity(image):
    return image


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def decoded(data: bytes, **kwargs):
    return decode(Item(id="x", source="x", data=data), 0, identity, **kwargs)


def test_bad_inputs_are_skipped_with_their_reason(tmp_path):
    good = jpeg_bytes(draw_shape("red", "circle"))
    assert decoded(b"").skip_reason == "empty file"
    assert "truncated" in decoded(good[: len(good) // 2]).skip_reason
    assert decoded(b"%PDF-1.4 not an image at all").skip_reason == "not an image"
    bomb = png_bytes(Image.new("L", (12000, 12000)))  # 144 MP: over PIL's limit, tiny file
    assert "decompression bomb" in decoded(bomb).skip_reason
    assert "too large" in decoded(png_bytes(Image.new("L", (3000, 3000))), max_pixels=1_000_000).skip_reason
    missing = decode(Item(id="m", source="m", path=str(tmp_path / "missing.png")), 0, identity)
    assert missing.skip_reason == "missing file"


def test_odd_but_valid_images_are_converted_to_rgb():
    cmyk = decoded(jpeg_bytes(Image.new("CMYK", (20, 10), (0, 255, 255, 0))))
    assert cmyk.pixels.mode == "RGB" and (cmyk.width, cmyk.height) == (20, 10)
    assert cmyk.pixels.getpixel((5, 5))[0] > 200  # magenta + yellow ink = red
    sixteen = decoded(png_bytes(Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))))
    assert sixteen.pixels.mode == "RGB" and sixteen.pixels.getpixel((0, 0))[0] == 40000 // 256
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    result = decoded(png_bytes(palette, transparency=0)).pixels
    assert result.getpixel((0, 0)) == (255, 255, 255) and result.getpixel((4, 4)) == (255, 0, 0)
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 0, 255), (0, 255, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    assert decoded(gif.getvalue()).pixels.getpixel((2, 2))[2] > 200  # the first (blue) frame


def test_folder_source_sniffs_content_and_skips_hidden_files(tmp_path):
    (tmp_path / "a").mkdir()
    draw_shape("red", "circle").save(tmp_path / "a" / "one.png")
    (tmp_path / "b_no_suffix").write_bytes(png_bytes(draw_shape("blue", "square")))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".hidden.png").write_bytes(png_bytes(draw_shape("green", "square")))
    assert describe(str(tmp_path)) == "folder"
    assert [i.id for i in iter_items(str(tmp_path))] == ["a/one.png", "b_no_suffix"]


def test_parquet_source_with_bytes_paths_captions_and_ids(tmp_path):
    image_path = tmp_path / "x.png"
    draw_shape("red", "circle").save(image_path)
    table = pa.table({"key": ["k1", "k2"], "path": [str(image_path), None],
                      "image": [None, png_bytes(draw_shape("blue", "square"))],
                      "caption": ["a red circle", "a blue square"], "colour": ["red", "blue"]})
    pq.write_table(table, tmp_path / "data.parquet")
    items = list(iter_items(str(tmp_path / "data.parquet"), SourceOptions(
        id_column="key", bytes_column="image", metadata_columns=("colour",))))
    assert [(i.id, i.caption, i.metadata) for i in items] == [
        ("k1", "a red circle", {"colour": "red"}), ("k2", "a blue square", {"colour": "blue"})]
    assert items[0].path == str(image_path) and items[1].data.startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="not found"):
        list(iter_items(str(tmp_path / "data.parquet"), SourceOptions(caption_column="nope")))


def test_webdataset_shards_group_members_by_key(tmp_path):
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard:03d}.tar", "w") as tar:
            for key in range(2):
                for name, data in ((f"s{shard}k{key}.png", png_bytes(draw_shape("red", "circle"))),
                                   (f"s{shard}k{key}.txt", f"caption {shard}-{key}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    spec = str(tmp_path / "shard-{000..001}.tar")
    assert expand_braces(spec)[-1].endswith("shard-001.tar")
    items = list(iter_items(spec))
    assert [i.id for i in items] == ["shard-000.tar/s0k0", "shard-000.tar/s0k1", "shard-001.tar/s1k0",
                                     "shard-001.tar/s1k1"]
    assert items[3].caption == "caption 1-1" and items[3].data.startswith(b"\x89PNG")


def test_list_sources_and_hash_ids(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    draw_shape("red", "circle").save(a)
    draw_shape("red", "circle").save(b)  # the same picture twice
    (tmp_path / "list.txt").write_text(f"{a}\n# a comment\n\n{b}\n{tmp_path / 'gone.png'}\n")
    assert [i.id for i in iter_items(str(tmp_path / "list.txt"))] == [str(a), str(b), str(tmp_path / "gone.png")]
    (tmp_path / "list.csv").write_text(f"filepath,title\n{a},first\n{b},second\n")
    items = list(iter_items(str(tmp_path / "list.csv"), SourceOptions(hash_ids=True)))
    assert items[0].id == items[1].id and len(items[0].id) == 40 and items[1].caption == "second"
