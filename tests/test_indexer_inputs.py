"""Indexer sources and decoding on real files written here: every bad input is skipped with its reason."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from indexer.decode import DecodeLimits, decode
from indexer.sources import Item, SourceOptions, check, describe, expand_braces, iter_items
from stair_search.images import MAX_ASPECT, model_view
from tests.conftest import draw_shape, png_header


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


def decoded(data: bytes, **limits):
    return decode(Item(id="x", source="x", data=data), 0, identity, DecodeLimits(**limits))


def read_from(path, **limits):
    return decode(Item(id="x", source=str(path), path=str(path)), 0, identity, DecodeLimits(**limits)).skip_reason


def test_bad_inputs_are_skipped_with_their_reason(tmp_path):
    good = jpeg_bytes(draw_shape("red", "circle"))
    assert decoded(b"").skip_reason == "empty file"
    assert "truncated" in decoded(good[: len(good) // 2]).skip_reason
    assert decoded(b"%PDF-1.4 not an image at all").skip_reason == "not an image"
    photo = png_bytes(Image.new("L", (12000, 9000)))  # 108 MP: over PIL's warning limit, a real camera's size
    assert decoded(photo).skip_reason == "too large: 12000x9000 > 64000000 pixels (raise --max-pixels)"
    assert decoded(png_header(30000, 30000)).skip_reason.startswith("too large: 900000000 > ")  # PIL refuses it
    assert "too large" in decoded(png_bytes(Image.new("L", (3000, 3000))), max_pixels=1_000_000).skip_reason
    assert decoded(good, max_bytes=100).skip_reason == f"too large: {len(good)} bytes > 100 (raise --max-bytes)"
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


def test_special_files_are_never_read_and_big_files_stop_at_the_byte_cap(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "pipe.png").symlink_to(fifo)  # would block a plain open() forever
    (tmp_path / "zero.png").symlink_to("/dev/zero")  # would grow a plain read() without end
    (tmp_path / "folder.png").mkdir()
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(draw_shape("red", "circle")))
    assert read_from(tmp_path / "pipe.png") == "not a regular file (a FIFO, device or socket)"
    assert read_from(tmp_path / "zero.png") == "not a regular file (a FIFO, device or socket)"
    assert read_from(tmp_path / "folder.png") == "not a regular file (a folder)"
    assert read_from(big, max_bytes=10).startswith(f"too large: {big.stat().st_size} bytes > 10")
    assert read_from(big) is None
    # the folder source lists them (so that each one is reported), sniffing nothing it cannot open safely
    names = [i.id for i in iter_items(str(tmp_path))]
    assert names == ["big.png", "folder.png", "pipe.png", "zero.png"] or names == ["big.png", "pipe.png", "zero.png"]


def test_formats_pil_cannot_read_here_are_reported_with_the_fix(tmp_path):
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    items = list(iter_items(str(tmp_path)))
    assert [i.id for i in items] == ["IMG_0001.HEIC"]
    reason = decode(items[0], 0, identity).skip_reason
    assert reason.startswith("unsupported image format (.heic): convert it to JPEG or PNG")


def test_bad_parquet_cells_become_items_with_their_problem(tmp_path):
    image = png_bytes(draw_shape("red", "circle"))
    pq.write_table(pa.table({"key": ["a", None, "c", ""], "image": [image, image, None, image]}),
                   tmp_path / "ids.parquet")
    items = list(iter_items(str(tmp_path / "ids.parquet"), SourceOptions(id_column="key", bytes_column="image")))
    assert [(i.id, i.problem) for i in items] == [
        ("a", None), (f"{tmp_path / 'ids.parquet'}#row=1", "missing id: the 'key' cell is empty"),
        ("c", "no image: the 'image' cell is empty"),
        (f"{tmp_path / 'ids.parquet'}#row=3", "missing id: the 'key' cell is empty")]
    pq.write_table(pa.table({"image": ["photos/cat.jpg", "x"]}), tmp_path / "text.parquet")
    pq.write_table(pa.table({"image": [17, 18]}), tmp_path / "ints.parquet")
    text = next(iter_items(str(tmp_path / "text.parquet")))
    ints = next(iter_items(str(tmp_path / "ints.parquet")))
    assert text.problem == ("not image bytes: the 'image' cell holds text (a column of paths is named with "
                            "--path-column)")
    assert ints.problem.startswith("not image bytes: the 'image' cell holds a int")
    hugging_face = pa.table({"image": [{"bytes": image, "path": "cat.png"}]})  # datasets' Image feature
    pq.write_table(hugging_face, tmp_path / "hf.parquet")
    assert next(iter_items(str(tmp_path / "hf.parquet"))).data == image


def test_sources_that_cannot_be_read_at_all_fail_before_a_job_starts(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check(str(tmp_path / "nothing-here"))
    pq.write_table(pa.table({"path": ["a.png"]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"columns \['caption_en'\] not found"):
        check(str(tmp_path / "a.parquet"), SourceOptions(caption_column="caption_en"))
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        check(str(tmp_path / "b.parquet"))
    (tmp_path / "list.csv").write_text("filepath,title\na.png,first\n")
    with pytest.raises(ValueError, match=r"columns \['id'\] not found"):
        check(str(tmp_path / "list.csv"), SourceOptions(id_column="id"))
    with pytest.raises(FileNotFoundError, match="shards not found"):
        check(str(tmp_path / "shard-{000..001}.tar"))


def tar_shard(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_damaged_tar_gives_what_it_holds_and_one_item_for_the_rest(tmp_path):
    image = png_bytes(draw_shape("red", "circle"), compress_level=0)
    tar_shard(tmp_path / "s.tar", [(f"k{i}.png", image) for i in range(4)])
    whole = (tmp_path / "s.tar").read_bytes()
    with tarfile.open(tmp_path / "s.tar") as tar:
        second = tar.getmembers()[1]
    (tmp_path / "data.tar").write_bytes(whole[: second.offset_data + 100])  # cut inside the 2nd image
    (tmp_path / "header.tar").write_bytes(whole[: second.offset + 100])  # cut inside the 2nd header
    damaged = bytearray(whole)
    damaged[second.offset : second.offset + 100] = os.urandom(100)
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    (tmp_path / "junk.tar").write_bytes(os.urandom(3000))
    for name in ("data", "header", "damaged"):
        cut = list(iter_items(str(tmp_path / f"{name}.tar")))
        assert [i.id for i in cut if i.problem is None] == [f"{name}.tar/k0"], name
        assert cut[-1].problem.startswith("corrupt or truncated tar: unreadable after 1 member(s)"), name
    junk = list(iter_items(str(tmp_path / "junk.tar")))
    assert len(junk) == 1 and junk[0].problem.startswith("corrupt or truncated tar: unreadable after 0 member(s)")


def test_tar_keys_without_an_image_and_oversized_members_are_named(tmp_path):
    image = png_bytes(draw_shape("red", "circle"))
    tar_shard(tmp_path / "s.tar", [("a.png", image), ("a.txt", b"a red circle"), ("b.txt", b"no picture"),
                                   ("b.json", b"{}"), ("c.png", image)])
    items = list(iter_items(str(tmp_path / "s.tar")))
    assert [(i.id, i.problem) for i in items] == [
        ("s.tar/a", None), ("s.tar/b", "no image member for this key (members: .txt, .json)"), ("s.tar/c", None)]
    assert items[0].caption == "a red circle" and items[0].source == f"{tmp_path / 's.tar'}#a.png"
    small = list(iter_items(str(tmp_path / "s.tar"), max_bytes=len(image) - 1))
    assert small[0].problem == f"too large: {len(image)} bytes > {len(image) - 1} (raise --max-bytes)"


def test_relative_paths_are_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    draw_shape("red", "circle").save(tmp_path / "a.png")
    Path("list.txt").write_text("a.png\n")
    Path("list.csv").write_text("filepath,title\na.png,first\n,empty row\n")
    pq.write_table(pa.table({"path": ["a.png"]}), "data.parquet")
    for spec in ("list.txt", "list.csv", "data.parquet"):
        item = next(iter_items(spec))
        assert item.id == "a.png" and item.source == str(tmp_path / "a.png"), spec
    assert list(iter_items("list.csv"))[1].problem == "no image: the 'filepath' cell is empty"


def test_extreme_strips_are_cut_to_their_centre_before_the_model_resizes_them(tiny_encoder):
    """A 100000 x 1 strip would become 22 M x 224 pixels (15 GB) in the shortest-side resize; the model sees the
    centre square only, so cutting the centre first gives it the same pixels at a small cost."""
    strip = png_bytes(Image.new("RGB", (100_000, 1), (200, 30, 30)))
    result = decode(Item(id="s", source="s", data=strip), 0, tiny_encoder.model.preprocess)
    size = tiny_encoder.preprocess(draw_shape("red", "circle")).shape
    assert result.skip_reason is None and result.pixels.shape == size
    assert model_view(Image.new("RGB", (100_000, 1))).size == (MAX_ASPECT, 1)
    assert model_view(Image.new("RGB", (3, 2000))).size == (3, 3 * MAX_ASPECT)
    rng = np.random.default_rng(0)
    banner = Image.fromarray(rng.integers(0, 255, (300, 3000, 3), dtype=np.uint8))  # 10:1, over the cut
    cut = tiny_encoder.preprocess(banner)
    whole = tiny_encoder.model.preprocess(banner)
    assert float((cut - whole).abs().max()) < 1e-5


def test_a_folder_is_numbered_in_the_order_it_always_was(tmp_path):
    """A resumed job relies on the order: the walk that lists unreadable subfolders sorts as sorted(rglob) did."""
    for name in ("a/x.png", "a/b/y.png", "a-b.png", "a.png", "B.png", "é.png", "a b/z.png", "_/w.png", "0.png",
                 ".hidden/h.png", "a/.h.png", "noext"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(png_bytes(draw_shape("red", "circle")))
    (tmp_path / "link.png").symlink_to(tmp_path / "a")  # a symlink to a folder is an entry, not walked into
    before = [p for p in sorted(tmp_path.rglob("*"))
              if not any(part.startswith(".") for part in p.relative_to(tmp_path).parts)
              and (p.is_file() or p.is_symlink())]
    assert [i.path for i in iter_items(str(tmp_path))] == [str(p) for p in before]


def test_fifos_and_sockets_named_like_images_are_listed_and_never_opened(tmp_path):
    import socket

    os.mkfifo(tmp_path / "fifo.png")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock.jpg"))
    os.mkfifo(tmp_path / "no-suffix")  # not claimed to be an image: not sniffed (that would open it)
    try:
        items = list(iter_items(str(tmp_path)))
        assert [i.id for i in items] == ["fifo.png", "sock.jpg"]
        assert {decode(i, 0, identity).skip_reason for i in items} == {"not a regular file (a FIFO, device or socket)"}
    finally:
        server.close()


def test_compressed_shards_and_link_members(tmp_path):
    image = png_bytes(draw_shape("red", "circle"))
    with tarfile.open(tmp_path / "s-0.tar.gz", "w:gz") as tar:
        for name, data in (("a.png", image), ("a.txt", b"red")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    items = list(iter_items(str(tmp_path / "s-{0..0}.tar.gz")))  # no false "truncated": its end is checked unpacked
    assert [(i.id, i.problem) for i in items] == [
        ("s-0.tar.gz/a", None), ("s-0.tar.gz/b", "not a regular file (a symlink in the tar; links are not followed)")]
    assert items[0].caption == "red" and items[0].source == f"{tmp_path / 's-0.tar.gz'}#a.png"
