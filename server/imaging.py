"""Query images from clients and thumbnails of stored documents, both with hard caps.

Query images are untrusted bytes: sizes are checked before decoding (the header gives width and height),
so a decompression bomb is refused without allocating its pixels, and whatever a codec raises on hostile
bytes is a 422 naming the field (the decoding is :func:`stair_search.images.decode_image`, the indexer's own).
Thumbnails are made only from the ``source`` the index itself stored for a document id; a client never names
a path. The stored source is read back as the job wrote it (:func:`stair_search.images.parse_source`: a file
or a tar member, never one for the other; names that are not UTF-8 included). A stored source that is a
symlink leading out of its own folder, a remote URL, anything but a regular file, or a tar that was cut or
damaged after indexing is not served (404 with the reason, never a 500).

Both are decoded at the size they are used at, not the camera's: a query image to at least
:data:`~stair_search.images.QUERY_SIDE` on its shortest side (a JPEG by DCT scaling), so a 6000x4000 photo is
reduced rather than refused (``max_image_pixels`` bounds the pixels actually decoded; a bomb that cannot be
reduced, such as a huge PNG, is still refused from its header), and a thumbnail to twice its size, then
resized. A photo's thumbnail is a JPEG (a tenth of a PNG's bytes, and the encode is cheaper); a drawing's (a
PNG, GIF, ... source) or any image with transparency stays a PNG, whose edges JPEG would smear.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from stair_search.images import (
    QUERY_SIDE,
    DecodedImage,
    DownloadTimedOut,
    ImageTooLarge,
    ImageUnreadable,
    NotRead,
    SourceLocation,
    TooManyBytes,
    decode_image,
    download,
    is_remote,
    one_line,
    parse_source,
    read_file,
    read_member,
    readings,
)

__all__ = ["ImageRejected", "Thumbnail", "decode_base64", "fetch_image_url", "full_image", "is_remote",
           "make_thumbnail", "open_query_image", "source_state", "stored_decode", "stored_image"]
MAX_SOURCE_BYTES = 256 * 1024 * 1024  # a stored file or tar member a thumbnail is made from (the indexer's cap)
PHOTO_FORMATS = frozenset({"JPEG", "MPO", "HEIF", "AVIF"})  # Pillow's names of camera formats: JPEG thumbnails
JPEG_QUALITY = 85


class ImageRejected(ValueError):
    """A client image the server will not use; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_base64(text: str, max_bytes: int, field: str = "image") -> bytes:
    """Plain base64 or a ``data:image/...;base64,`` URL -> bytes (422 if malformed, 413 if too big)."""
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageRejected(413, f"'{field}' is larger than {max_bytes} bytes; send a smaller image")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageRejected(422, f"'{field}' is not valid base64 ({exc}); send the image bytes base64-encoded "
                                 f"or upload it as multipart/form-data") from exc
    return data


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect could lead anywhere (an internal host): refuse it instead of following it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise ImageRejected(422, f"'image_url' redirects ({code}) to {newurl[:200]}; give the final URL")


def fetch_image_url(url: str, hosts: tuple[str, ...], max_bytes: int, timeout_s: float) -> bytes:
    """The bytes at ``url`` if image URLs are on and its host is allowed (the SSRF guard), under the caps: at
    most ``max_bytes``, and the whole download (not only each read) within ``timeout_s``."""
    if not hosts:
        raise ImageRejected(422, "'image_url' queries are off on this server; send the image itself, or start the "
                                 "server with --allow-image-url-host HOST")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ImageRejected(422, "'image_url' must be an http or https URL")
    if parsed.hostname.lower() not in {h.lower() for h in hosts}:
        raise ImageRejected(403, f"'image_url' host '{parsed.hostname}' is not allowed here (allowed: "
                                 f"{', '.join(hosts)})")
    try:
        return download(url, max_bytes, timeout_s, timeout_s, handlers=[_NoRedirects()])
    except ImageRejected:
        raise
    except DownloadTimedOut as exc:
        raise ImageRejected(504, f"'image_url' did not answer within {timeout_s} s") from exc
    except TooManyBytes:
        raise ImageRejected(413, f"'image_url' is more than the limit of {max_bytes} bytes") from None
    except NotRead as exc:
        raise ImageRejected(422, f"'image_url' could not be fetched: {exc}") from None
    except (OSError, ValueError) as exc:  # a URL urllib cannot take
        raise ImageRejected(422, f"'image_url' could not be fetched: {one_line(exc)}") from None


def open_query_image(data: bytes, max_bytes: int, max_pixels: int, field: str = "image") -> Image.Image:
    """Client image bytes -> an RGB PIL image, refusing oversized, malformed or non-image data (any codec's
    exception included: 422)."""
    if not data:
        raise ImageRejected(422, f"'{field}' is empty")
    if len(data) > max_bytes:
        raise ImageRejected(413, f"'{field}' is {len(data)} bytes, more than the limit of {max_bytes}")
    return _decode(data, max_pixels, field, shortest=QUERY_SIDE).rgb


def _decode(data: bytes, max_pixels: int, what: str, shortest: int = 0, longest: int = 0) -> DecodedImage:
    try:
        return decode_image(data, max_pixels, shortest=shortest, longest=longest)
    except ImageTooLarge as exc:
        size = f"{exc.width}x{exc.height} pixels" if exc.width else f"{exc.pixels or 'more'} pixels"
        raise ImageRejected(413, f"'{what}' is {size}, more than the limit of {max_pixels}; send a smaller "
                                 f"image") from None
    except ImageUnreadable as exc:
        raise ImageRejected(422, f"'{what}' is not a readable image ({exc.detail or exc.kind})") from None


def stored_image(source: str, max_pixels: int, max_bytes: int = MAX_SOURCE_BYTES) -> Image.Image:
    """The image a document was indexed from, read from its stored ``source`` (a file or a tar member), in full.

    Raises FileNotFoundError with the reason (one line) when the source cannot or may not be served.
    """
    return stored_decode(source, max_pixels, max_bytes).rgb


def stored_decode(source: str, max_pixels: int, max_bytes: int = MAX_SOURCE_BYTES, longest: int = 0) -> DecodedImage:
    """:func:`stored_image` with what the decode knows (format, transparency), decoded at a reduced size that
    keeps at least ``longest`` pixels on its longest side (0: full size)."""
    try:
        location = _local(source)
        _check_local_file(Path(location.path))
        if location.member:
            data = read_member(location.path, location.member, max_bytes)
        else:
            data = read_file(location.path, max_bytes)
    except FileNotFoundError:
        raise
    except NotRead as exc:  # a special file, over the cap, a cut or damaged tar, a member not in it
        raise FileNotFoundError(f"the stored source cannot be read: {exc}") from None
    except OSError as exc:  # permissions, a name longer than the system allows, an I/O error
        raise FileNotFoundError(f"the stored source cannot be read: {exc.strerror or one_line(exc)}") from None
    except MemoryError:
        raise
    except Exception as exc:  # a stored path holding a NUL byte, or anything else this one source raises
        raise FileNotFoundError(f"the stored source cannot be read: {one_line(exc)}") from None
    try:
        return _decode(data, max_pixels, "stored image", longest=longest)
    except ImageRejected as exc:
        raise FileNotFoundError(str(exc)) from exc


def source_state(source: str) -> tuple[int, int, int, int] | None:
    """What changes when a stored source file is replaced (also by a symlink): its lstat identity and time.

    Part of the thumbnail cache key, so a file swapped after it was first served is checked again instead of
    its old thumbnail being served from the cache. None when there is no such local file.
    """
    try:
        stat = os.lstat(_local(source).path)
    except (OSError, ValueError):
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _local(source: str) -> SourceLocation:
    """The local file or tar member a stored source names (as stored, or as an older index escaped a name that
    is not UTF-8); FileNotFoundError for a remote or unreadable one."""
    try:
        location = parse_source(source)
    except ValueError as exc:
        raise FileNotFoundError(str(exc)) from None
    found = readings(location)
    return next((candidate for candidate in found if os.path.lexists(candidate.path)), found[0])


def _check_local_file(path: Path) -> None:
    """A regular file, and if it is a symlink, one that stays inside its own folder."""
    if not path.is_absolute():
        raise FileNotFoundError("the stored source is not an absolute path")
    if path.is_symlink():
        try:
            target, folder = path.resolve(), path.parent.resolve()
        except RuntimeError:  # a loop of symlinks (Python 3.11 raises this, not OSError)
            raise FileNotFoundError("the stored source is a loop of symlinks") from None
        if target.parent != folder and folder not in target.parents:
            raise FileNotFoundError("the stored source is a symlink that leads out of its folder")
    if not path.is_file():
        raise FileNotFoundError("the stored source is not a regular file (a FIFO, device, socket or folder)"
                                if path.exists() else "the stored source file is missing")
    if not os.access(path, os.R_OK):
        raise FileNotFoundError("the stored source file is not readable")


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    media_type: str  # image/jpeg for photos, image/png for drawings and images with transparency


def make_thumbnail(source: str, size: int, max_pixels: int) -> Thumbnail:
    """The thumbnail of a stored source: longest side at most ``size`` pixels, decoded at no less than twice that
    (a 12-megapixel JPEG at 1/8 for the default 128 px) and resized with LANCZOS; always re-encoded, never the
    file's own bytes. FileNotFoundError (one line) when the source cannot or may not be served."""
    decoded = stored_decode(source, max_pixels, longest=2 * size)
    image = decoded.rgb  # this decode's own copy: resized in place
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return _encoded(decoded, image)


def full_image(source: str, max_pixels: int) -> Thumbnail:
    """The stored image at its own size (the "original" a detail view links to), re-encoded as a thumbnail is:
    the pixels, never the file's own bytes (a stored file is served only as an image). FileNotFoundError (one
    line) when the source cannot or may not be served."""
    decoded = stored_decode(source, max_pixels)
    return _encoded(decoded, decoded.rgb)


def _encoded(decoded: DecodedImage, image: Image.Image) -> Thumbnail:
    """JPEG for a photo without transparency, PNG for the rest."""
    out = io.BytesIO()
    if decoded.format in PHOTO_FORMATS and not decoded.transparent:
        image.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=False)
        return Thumbnail(out.getvalue(), "image/jpeg")
    image.save(out, format="PNG", optimize=False)
    return Thumbnail(out.getvalue(), "image/png")
