"""Query images from clients and thumbnails of stored documents, both with hard caps.

Query images are untrusted bytes: sizes are checked before decoding (the header gives width and height),
so a decompression bomb is refused without allocating its pixels. Thumbnails are made only from the
``source`` the index itself stored for a document id; a client never names a path. A stored source that is
a symlink leading out of its own folder, a remote URL or anything but a regular file is not served.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tarfile
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from stair_search.images import refused_pixels, to_rgb

_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


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
    """The bytes at ``url`` if image URLs are on and its host is allowed (the SSRF guard), under the caps."""
    if not hosts:
        raise ImageRejected(422, "'image_url' queries are off on this server; send the image itself, or start the "
                                 "server with --allow-image-url-host HOST")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ImageRejected(422, "'image_url' must be an http or https URL")
    if parsed.hostname.lower() not in {h.lower() for h in hosts}:
        raise ImageRejected(403, f"'image_url' host '{parsed.hostname}' is not allowed here (allowed: "
                                 f"{', '.join(hosts)})")
    opener = urllib.request.build_opener(_NoRedirects())
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "stair-search"}), timeout=timeout_s) as r:
            data = r.read(max_bytes + 1)
    except ImageRejected:
        raise
    except TimeoutError as exc:
        raise ImageRejected(504, f"'image_url' did not answer within {timeout_s} s") from exc
    except (OSError, ValueError) as exc:  # URLError, HTTPError, connection errors
        raise ImageRejected(422, f"'image_url' could not be fetched: {exc}") from None
    if len(data) > max_bytes:
        raise ImageRejected(413, f"'image_url' is more than the limit of {max_bytes} bytes")
    return data


def open_query_image(data: bytes, max_bytes: int, max_pixels: int, field: str = "image") -> Image.Image:
    """Client image bytes -> an RGB PIL image, refusing oversized, malformed or non-image data."""
    if not data:
        raise ImageRejected(422, f"'{field}' is empty")
    if len(data) > max_bytes:
        raise ImageRejected(413, f"'{field}' is {len(data)} bytes, more than the limit of {max_bytes}")
    return _decode(io.BytesIO(data), max_pixels, field)


def _decode(stream: io.BytesIO, max_pixels: int, what: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels below decides
            with Image.open(stream) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageRejected(413, f"'{what}' is {width}x{height} pixels, more than the limit of "
                                             f"{max_pixels}; send a smaller image")
                image.load()
                return to_rgb(image).copy()
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:  # more than twice PIL's own limit: PIL will not even open it
        pixels = refused_pixels(exc) or "more"
        raise ImageRejected(413, f"'{what}' is {pixels} pixels, more than the limit of {max_pixels}; send a smaller "
                                 f"image") from None
    except _DECODE_ERRORS as exc:
        raise ImageRejected(422, f"'{what}' is not a readable image ({type(exc).__name__}: {exc})") from exc


def is_remote(source: str) -> bool:
    """A stored source that is an http(s) URL (a URL-sourced collection): shown by the client, never fetched."""
    return source.startswith(("http://", "https://"))


def stored_image(source: str, max_pixels: int) -> Image.Image:
    """The image a document was indexed from, read from its stored ``source`` (a file or ``file.tar#member``).

    Raises FileNotFoundError with the reason when the source cannot or may not be served.
    """
    if "://" in source:
        raise FileNotFoundError("the stored source is remote; the server does not fetch remote images")
    path, member = _split_source(source)
    _check_local_file(path)
    if member:
        with tarfile.open(path) as tar:
            info = tar.getmember(member)
            if not info.isfile():
                raise FileNotFoundError("the stored tar member is not a regular file")
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
    else:
        data = path.read_bytes()
    try:
        return _decode(io.BytesIO(data), max_pixels, "stored image")
    except ImageRejected as exc:
        raise FileNotFoundError(str(exc)) from exc


def source_state(source: str) -> tuple[int, int, int, int] | None:
    """What changes when a stored source file is replaced (also by a symlink): its lstat identity and time.

    Part of the thumbnail cache key, so a file swapped after it was first served is checked again instead of
    its old thumbnail being served from the cache. None when there is no such local file.
    """
    try:
        stat = os.lstat(_split_source(source)[0])
    except (OSError, ValueError):
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _split_source(source: str) -> tuple[Path, str]:
    """``/data/a.tar#img/1.png`` -> (tar path, member); a plain file -> (path, "")."""
    path_text, _, member = source.partition("#") if ".tar#" in source else (source, "", "")
    return Path(path_text), member


def _check_local_file(path: Path) -> None:
    """A regular file, and if it is a symlink, one that stays inside its own folder."""
    if not path.is_absolute():
        raise FileNotFoundError("the stored source is not an absolute path")
    if path.is_symlink():
        target, folder = path.resolve(), path.parent.resolve()
        if target.parent != folder and folder not in target.parents:
            raise FileNotFoundError("the stored source is a symlink that leads out of its folder")
    if not path.is_file():
        raise FileNotFoundError("the stored source file is missing")
    if not os.access(path, os.R_OK):
        raise FileNotFoundError("the stored source file is not readable")


def thumbnail_png(image: Image.Image, size: int) -> bytes:
    """Longest side at most ``size`` pixels, as PNG bytes (the image is re-encoded, never passed through)."""
    image = image.copy()
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()
