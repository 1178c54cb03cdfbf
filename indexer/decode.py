"""Decoding one item into model pixels, or a reason why it was skipped. Runs in worker processes.

Bad input never raises out of here: empty, truncated or non-image files, images too large to decode (in
bytes or in pixels), special files (FIFOs, devices), unreadable or missing files, formats PIL cannot read here,
failed or stalled downloads, and any exception a codec raises on hostile bytes each become a :class:`Decoded`
with a ``skip_reason`` (the decoding itself is :func:`stair_search.images.decode_image`, which the service uses
for query images too). CMYK, 16-bit, palette + transparency and animated images are converted (first frame).
Only what is not the item's fault passes through: ``MemoryError``, Ctrl-C.

A photo is decoded at the size the model needs, not at the camera's: the model's preprocessing only ever sees
its input size (224 px for the default model), so a JPEG is decoded by DCT scaling to no less than twice that on
its shortest side (:func:`model_side`; a 4000x3000 photo at 1000x750, a quarter of the work of a full decode),
which the model's own resize then brings down as before. The same decode reads the photo's EXIF fields
(``taken_at``, ``camera``, and with ``exif="gps"`` its position) into :attr:`Decoded.metadata`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from indexer.sources import DEFAULT_MAX_BYTES, OTHER_IMAGE_SUFFIXES, Item, NotRead, read_file, too_large
from stair_search.images import (
    EXIF_BASIC,
    EXIF_CHOICES,
    FILE_URL,
    HEIF_READABLE,
    ImageTooLarge,
    ImageUnreadable,
    centre_cut,
    decode_image,
    download,
    one_line,
    parse_source,
    read_member,
    url_scheme,
)

DEFAULT_MAX_PIXELS = 64_000_000  # ~ 8000 x 8000: beyond this the decode alone needs gigabytes
FETCH_TIMEOUT_S = 20.0  # one read of a download (connecting, each chunk)
FETCH_DEADLINE_S = 120.0  # the whole download, however slowly the server sends
FETCH_DEADLINE_ENV = "STAIR_SEARCH_FETCH_DEADLINE_S"  # sets FETCH_DEADLINE_S (seconds) for a job's workers


HEIF_SUFFIXES = (".heic", ".heif")


@dataclass(frozen=True)
class DecodeLimits:
    """What one item may cost to decode: its bytes (files, downloads, tar members, parquet cells) and the pixels
    actually decoded; and which EXIF fields a decode keeps (``exif``: none, basic = date and camera, gps = those
    and the position; a job's ``--exif``)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    exif: str = EXIF_BASIC

    def __post_init__(self) -> None:
        if self.exif not in EXIF_CHOICES:
            raise ValueError(f"exif must be one of {', '.join(EXIF_CHOICES)} (--exif), got {str(self.exif)[:40]!r}")


DEFAULT_LIMITS = DecodeLimits()


@dataclass
class Decoded:
    position: int  # the item's position in the source
    pixels: Any | None  # (3, H, W) float tensor, or None when skipped
    width: int = 0
    height: int = 0
    skip_reason: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # the photo's EXIF fields (stair_search.images)


def fetch_deadline_s() -> float:
    """The total time one download may take: ``$STAIR_SEARCH_FETCH_DEADLINE_S`` or ``FETCH_DEADLINE_S``."""
    text = os.environ.get(FETCH_DEADLINE_ENV, "").strip()
    try:
        value = float(text) if text else FETCH_DEADLINE_S
    except ValueError:
        raise ValueError(f"${FETCH_DEADLINE_ENV} is '{text[:40]}', not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"${FETCH_DEADLINE_ENV} must be more than 0 seconds, got {text[:40]}")
    return value


def read_bytes(item: Item, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    if item.data is not None:
        if len(item.data) > max_bytes:
            raise too_large(len(item.data), max_bytes)
        return item.data
    location = item.path or item.source
    if location.startswith(("http://", "https://")):
        deadline = fetch_deadline_s()
        return download(location, max_bytes, min(FETCH_TIMEOUT_S, deadline), deadline)
    if location.startswith(FILE_URL):
        where = parse_source(location)  # percent-encoded; a #fragment names a tar member
        return read_member(where.path, where.member, max_bytes) if where.member else read_file(where.path, max_bytes)
    scheme = url_scheme(location)
    if scheme:
        raise NotRead(f"unsupported URL scheme '{scheme[:20]}': http, https and file URLs and local paths are read")
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
    except NotRead as exc:  # a FIFO, device or socket; more bytes than the limit; a failed or stalled download
        return Decoded(position, None, skip_reason=str(exc))
    except OSError as exc:  # I/O errors, a name longer than the system allows
        return Decoded(position, None, skip_reason=f"read failed: {exc.strerror or one_line(exc)}")
    except MemoryError:
        raise
    except Exception as exc:  # whatever else reading this one item raised: it is skipped, the job goes on
        return Decoded(position, None, skip_reason=f"read failed: {one_line(exc)}")
    if not data:
        return Decoded(position, None, skip_reason="empty file")
    decoded = _decode_bytes(data, position, preprocess, limits)
    suffix = "." + (item.path or item.source).rsplit(".", 1)[-1].lower()
    if decoded.skip_reason == "not an image" and suffix in OTHER_IMAGE_SUFFIXES:
        decoded.skip_reason = unsupported_format(suffix)
    return decoded


def unsupported_format(suffix: str) -> str:
    """The skip reason of a file named like an image that no installed codec reads, with the fix."""
    if suffix in HEIF_SUFFIXES and HEIF_READABLE:
        return (f"unsupported image format ({suffix}): convert it to JPEG or PNG (pillow-heif, installed here, "
                f"cannot read this file)")
    plugin = "pip install pillow-heif" if suffix in HEIF_SUFFIXES else "install a Pillow plugin that reads it"
    return f"unsupported image format ({suffix}): convert it to JPEG or PNG, or {plugin}"


def model_side(preprocess: Callable) -> int:
    """The largest side a model's preprocessing resizes or crops to (its input size: 224 for the default model),
    read from its transforms' ``size``; 0 when it has none (then nothing is reduced while decoding)."""
    sizes = [getattr(step, "size", None) for step in getattr(preprocess, "transforms", ())]
    sides = [side for size in sizes for side in (size if isinstance(size, list | tuple) else [size])
             if isinstance(side, int) and not isinstance(side, bool)]
    return max(sides, default=0)


def _decode_bytes(data: bytes, position: int, preprocess: Callable, limits: DecodeLimits) -> Decoded:
    max_pixels = limits.max_pixels
    try:  # at least twice the model's input on the shortest side: its own resize then sees a sharp image
        image = decode_image(data, max_pixels, shortest=2 * model_side(preprocess), exif=limits.exif)
    except ImageTooLarge as exc:
        if exc.by_pillow:  # over twice PIL's own limit: it would not even open the file
            return Decoded(position, None, skip_reason=f"too large: {exc.pixels or 'over'} > {exc.limit} pixels "
                                                       f"(PIL's limit for any image)")
        return Decoded(position, None, exc.width, exc.height,
                       f"too large: {exc.width}x{exc.height} > {exc.limit} pixels (raise --max-pixels)")
    except ImageUnreadable as exc:
        reason = "not an image" if exc.kind == "not an image" else f"corrupt or truncated image: {exc.detail}"
        return Decoded(position, None, skip_reason=reason)
    try:
        pixels = preprocess(centre_cut(image.rgb))
    except MemoryError:
        raise
    except Exception as exc:  # a decoded image the model's transforms cannot take (a degenerate size)
        return Decoded(position, None, image.width, image.height, f"unusable for the model: {one_line(exc)}")
    return Decoded(position, pixels, image.width, image.height, metadata=image.metadata)
