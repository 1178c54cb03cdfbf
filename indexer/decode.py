"""Decoding one item into model pixels, or a reason why it was skipped. Runs in worker processes.

Bad input never raises out of here: empty, truncated or non-image files, images too large to decode (in
bytes or in pixels), special files (FIFOs, devices), unreadable or missing files, formats PIL cannot read here
and failed downloads each become a :class:`Decoded` with a ``skip_reason``. CMYK, 16-bit, palette +
transparency and animated images are converted (first frame).
"""

from __future__ import annotations

import io
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from indexer.sources import DEFAULT_MAX_BYTES, OTHER_IMAGE_SUFFIXES, Item, NotRead, read_file, too_large
from stair_search.images import model_view, refused_pixels

DEFAULT_MAX_PIXELS = 64_000_000  # ~ 8000 x 8000: beyond this the decode alone needs gigabytes
FETCH_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class DecodeLimits:
    """What one item may cost to decode: its bytes (files, downloads, tar members, parquet cells) and its pixels."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES


DEFAULT_LIMITS = DecodeLimits()


@dataclass
class Decoded:
    position: int  # the item's position in the source
    pixels: Any | None  # (3, H, W) float tensor, or None when skipped
    width: int = 0
    height: int = 0
    skip_reason: str | None = None


def read_bytes(item: Item, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    if item.data is not None:
        if len(item.data) > max_bytes:
            raise too_large(len(item.data), max_bytes)
        return item.data
    location = item.path or item.source
    if location.startswith(("http://", "https://")):
        with urllib.request.urlopen(location, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise too_large(None, max_bytes)
        return data
    if location.startswith("file://"):
        location = location[len("file://") :]
    elif "://" in location:
        scheme = location.split("://", 1)[0]
        raise NotRead(f"unsupported URL scheme '{scheme}': http, https and file URLs and local paths are read")
    return read_file(location, max_bytes)


def decode(item: Item, position: int, preprocess: Callable, limits: DecodeLimits = DEFAULT_LIMITS) -> Decoded:
    """Bytes -> RGB -> preprocess, or the reason it cannot be indexed."""
    if item.problem:
        return Decoded(position, None, skip_reason=item.problem)
    try:
        data = read_bytes(item, limits.max_bytes)
    except FileNotFoundError:
        return Decoded(position, None, skip_reason="missing file")
    except PermissionError:
        return Decoded(position, None, skip_reason="unreadable: permission denied")
    except IsADirectoryError:
        return Decoded(position, None, skip_reason="not a regular file (a folder)")
    except NotRead as exc:  # a FIFO, device or socket; more bytes than the limit
        return Decoded(position, None, skip_reason=str(exc))
    except OSError as exc:  # URLError, timeouts, I/O errors
        return Decoded(position, None, skip_reason=f"read failed: {exc}")
    if not data:
        return Decoded(position, None, skip_reason="empty file")
    decoded = _decode_bytes(data, position, preprocess, limits.max_pixels)
    suffix = "." + (item.path or item.source).rsplit(".", 1)[-1].lower()
    if decoded.skip_reason == "not an image" and suffix in OTHER_IMAGE_SUFFIXES:
        decoded.skip_reason = (f"unsupported image format ({suffix}): convert it to JPEG or PNG, or install a "
                               f"Pillow plugin that reads it")
    return decoded


def _decode_bytes(data: bytes, position: int, preprocess: Callable, max_pixels: int) -> Decoded:
    try:
        with warnings.catch_warnings():
            # PIL warns above ~89 M pixels and refuses above twice that; our own max_pixels decides below it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return Decoded(position, None, width, height,
                                   f"too large: {width}x{height} > {max_pixels} pixels (raise --max-pixels)")
                image.seek(0)  # animated GIF / WebP / APNG: the first frame
                image.load()
                rgb = model_view(image)
    except Image.DecompressionBombError as exc:  # over twice PIL's own limit: it will not even open the file
        pixels = refused_pixels(exc)
        return Decoded(position, None, skip_reason=f"too large: {pixels or 'over'} > {Image.MAX_IMAGE_PIXELS * 2} "
                                                   f"pixels (PIL's limit for any image)")
    except UnidentifiedImageError:
        return Decoded(position, None, skip_reason="not an image")
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt data
        return Decoded(position, None, skip_reason=f"corrupt or truncated image: {exc}")
    return Decoded(position, preprocess(rgb), width, height)

