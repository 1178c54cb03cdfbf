"""Decoding one item into model pixels, or a reason why it was skipped. Runs in worker processes.

Bad input never raises out of here: empty, truncated or non-image files, decompression bombs, huge
dimensions, unreadable or missing files and failed downloads each become a :class:`Decoded` with a
``skip_reason``. CMYK, 16-bit, palette + transparency and animated images are converted (first frame).
"""

from __future__ import annotations

import io
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from indexer.sources import Item
from stair_search.images import to_rgb

DEFAULT_MAX_PIXELS = 64_000_000  # ~ 8000 x 8000: beyond this the decode alone needs gigabytes
FETCH_TIMEOUT_S = 20.0


@dataclass
class Decoded:
    position: int  # the item's position in the source
    pixels: Any | None  # (3, H, W) float tensor, or None when skipped
    width: int = 0
    height: int = 0
    skip_reason: str | None = None


def read_bytes(item: Item) -> bytes:
    if item.data is not None:
        return item.data
    location = item.path or item.source
    if location.startswith(("http://", "https://")):
        with urllib.request.urlopen(location, timeout=FETCH_TIMEOUT_S) as response:
            return response.read()
    if location.startswith("file://"):
        location = location[len("file://") :]
    with open(location, "rb") as f:
        return f.read()


def decode(item: Item, position: int, preprocess: Callable, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Bytes -> RGB -> preprocess, or the reason it cannot be indexed."""
    try:
        data = read_bytes(item)
    except FileNotFoundError:
        return Decoded(position, None, skip_reason="missing file")
    except PermissionError:
        return Decoded(position, None, skip_reason="unreadable: permission denied")
    except IsADirectoryError:
        return Decoded(position, None, skip_reason="not a file")
    except OSError as exc:  # URLError, timeouts, I/O errors
        return Decoded(position, None, skip_reason=f"read failed: {exc}")
    if not data:
        return Decoded(position, None, skip_reason="empty file")
    return _decode_bytes(data, position, preprocess, max_pixels)


def _decode_bytes(data: bytes, position: int, preprocess: Callable, max_pixels: int) -> Decoded:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return Decoded(position, None, width, height, f"too large: {width}x{height} > {max_pixels} pixels")
                image.seek(0)  # animated GIF / WebP / APNG: the first frame
                image.load()
                rgb = to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Decoded(position, None, skip_reason="decompression bomb (over PIL's pixel limit)")
    except UnidentifiedImageError:
        return Decoded(position, None, skip_reason="not an image")
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt data
        return Decoded(position, None, skip_reason=f"corrupt or truncated image: {exc}")
    return Decoded(position, preprocess(rgb), width, height)
