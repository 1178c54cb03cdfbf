"""Images from untrusted places, in one module that the indexing jobs, the service and the encoder share.

Four things every caller needs to do the same way, so that a hostile file gets the same answer everywhere:

- **Decoding** (:func:`decode_image`): bytes -> an RGB image, or :class:`ImageUnreadable` naming why. Pillow's
  codecs raise almost anything on bad data (``OSError``, ``SyntaxError``, ``ValueError``, ``EOFError``,
  ``NotImplementedError``, ``RuntimeError``, ``struct.error``, ``IndexError``, ...: a mutated DDS or BLP file
  raises ``NotImplementedError``, a mutated AVIF ``RuntimeError``), so every ``Exception`` raised while opening,
  loading or converting becomes one line naming the exception: a job skips that item, the service answers 4xx.
  Only ``MemoryError`` (and what is not an ``Exception``: Ctrl-C, exit) passes through, as a fault of the
  process rather than of the item.
  A caller that needs fewer pixels than the file holds says so (``shortest`` / ``longest``): a JPEG is then
  decoded at 1/2, 1/4 or 1/8 of its size by libjpeg's DCT scaling (PIL's ``Image.draft``), and a HEIC by one of
  its embedded thumbnails when one is large enough, so a 12-megapixel photo costs a quarter of a full decode and
  the model or the thumbnail still gets at least the pixels it asked for. ``max_pixels`` bounds the pixels
  actually decoded, so a camera-sized JPEG is reduced rather than refused, while a bomb that cannot be reduced
  (a PNG, any format without DCT scaling) is still refused from its header. HEIC/HEIF is read through
  ``pillow-heif`` (registered here, so every caller of this module reads it).
- **Normalising** (:func:`to_rgb`, :func:`model_view`): EXIF orientation, transparency on white, any mode to RGB.
- **Photo metadata** (:func:`photo_metadata`): a photo's date taken, camera and (asked for only: a place is
  personal data) its GPS position, from EXIF, as plain metadata fields. EXIF is written by every camera and
  editor and trusted by none: a field of the wrong type, out of range, absurdly long or behind a damaged IFD is
  left out, and nothing an EXIF block holds can stop a job.
- **Reading bytes** (:func:`read_file`, :func:`read_member`, :func:`download`): regular files only (a FIFO is
  never opened, so it cannot block), at most ``max_bytes``, and a download has a total deadline, not only a
  timeout per read (a server that sends one byte every few seconds cannot hold a worker).
- **Stored sources** (:func:`file_source`, :func:`member_source`, :func:`parse_source`): the one text an index
  stores for where a document's image is, unambiguous for a file versus a tar member and for names that are
  not UTF-8, so that the service finds the same bytes the job read.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import io
import math
import os
import re
import socket
import stat
import tarfile
import threading
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError


def _register_heif() -> bool:
    """Let Pillow read HEIC/HEIF (what iPhones save by default) through pillow-heif; False where it is missing."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:  # a platform without its wheel: .heic files are skipped with the one-line fix
        return False
    register_heif_opener()
    return True


HEIF_READABLE = _register_heif()

BACKGROUND = (255, 255, 255)
# A model's preprocessing resizes the shortest side to its input size and keeps the centre square, so a
# 100000 x 1 strip would first become a 22 M x 224 image (15 GB). Beyond this ratio the centre is cut first;
# the square the model sees lies inside that centre, so its pixels are the same.
MAX_ASPECT = 8
REASON_CHARS = 300  # an exception's text in a skip reason or an HTTP answer: one line, at most this long
EXIF_NONE, EXIF_BASIC, EXIF_GPS = "none", "basic", "gps"  # which photo metadata a decode reads (photo_metadata)
EXIF_CHOICES = (EXIF_NONE, EXIF_BASIC, EXIF_GPS)
# A query image is decoded before the index (and so its model) is known: to at least this on its shortest side,
# twice the largest input of the usual CLIP models (384 px), so every model's own resize still sees sharp pixels.
QUERY_SIDE = 768
LOCAL_MAX_PIXELS = 64_000_000  # a local file opened as a query (the indexer's default --max-pixels)
LOCAL_MAX_BYTES = 256 * 1024 * 1024  # ... and its bytes (the indexer's default --max-bytes)


# ---------------------------------------------------------------------------------------------- decoding


class ImageUnreadable(ValueError):
    """Bytes that cannot be used as an image: ``kind`` is ``"not an image"``, ``"too large"`` or ``"corrupt"``
    and ``detail`` says what the codec said (one line)."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


class ImageTooLarge(ImageUnreadable):
    """More pixels than allowed: ``width`` x ``height`` as the header declares them (0 when Pillow refused to
    open the file at all, and then only ``pixels`` is known, or None)."""

    def __init__(self, width: int, height: int, pixels: int | None, limit: int, by_pillow: bool = False):
        super().__init__("too large", f"{pixels or 'over'} > {limit} pixels")
        self.width, self.height, self.pixels, self.limit, self.by_pillow = width, height, pixels, limit, by_pillow


@dataclass(frozen=True)
class DecodedImage:
    rgb: Image.Image  # loaded, detached from the bytes, RGB, EXIF orientation applied (maybe reduced: see below)
    width: int  # as the file declares it (before the orientation is applied and before any reduction)
    height: int
    format: str | None = None  # Pillow's name of the file's format ("JPEG", "PNG", "HEIF", ...)
    transparent: bool = False  # the file had an alpha channel or a transparent colour (composited on white)
    metadata: dict[str, Any] = field(default_factory=dict)  # photo_metadata's fields, when they were asked for


def one_line(exc: BaseException) -> str:
    """``Type: message`` of an exception on one line of at most ``REASON_CHARS`` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def decode_image(data: bytes, max_pixels: int, *, shortest: int = 0, longest: int = 0,
                 exif: str = EXIF_NONE) -> DecodedImage:
    """Image bytes (any format Pillow reads; the first frame of an animation) -> :class:`DecodedImage`.

    ``shortest`` / ``longest``: the decoded image may be smaller than the file (see :func:`reduce_while_decoding`)
    as long as its shortest side keeps ``shortest`` pixels and its longest ``longest`` (0: no reduction).
    ``exif``: which :func:`photo_metadata` fields to read (``none``, ``basic`` or ``gps``).
    The size is checked before any pixel is decoded, so a decompression bomb costs nothing.
    Raises :class:`ImageTooLarge` or :class:`ImageUnreadable`; never any codec's own exception.
    """
    try:
        with warnings.catch_warnings():
            # PIL warns above ~89 M pixels and refuses above twice that (our own max_pixels decides below it),
            # and warns of damaged metadata ("Corrupt EXIF data"): what decides is whether the pixels decode.
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return _decode_open(image, max_pixels, shortest, longest, exif)
    except ImageUnreadable:
        raise
    except Image.DecompressionBombError as exc:  # over twice PIL's own limit: it will not even open the file
        raise ImageTooLarge(0, 0, refused_pixels(exc), Image.MAX_IMAGE_PIXELS * 2, by_pillow=True) from None
    except UnidentifiedImageError:
        raise ImageUnreadable("not an image") from None
    except MemoryError:
        raise
    except Exception as exc:  # any codec's error on bad data: truncated, corrupt, a variant it cannot read
        raise ImageUnreadable("corrupt", one_line(exc)) from None


def _decode_open(image: Image.Image, max_pixels: int, shortest: int, longest: int, exif: str) -> DecodedImage:
    """:func:`decode_image` of an opened file: reduce, check the pixels to be decoded, load, normalise."""
    width, height = image.size
    if image.tell() != 0:  # never true after open; seek(0) itself raises in some plugins (SPIDER)
        image.seek(0)
    if shortest or longest:
        reduce_while_decoding(image, shortest, longest)
    if image.size[0] * image.size[1] > max_pixels:  # what will be decoded: the header's size unless reduced
        raise ImageTooLarge(width, height, image.size[0] * image.size[1], max_pixels)
    image.load()
    if image.size[0] * image.size[1] > max_pixels:  # a container whose frames differ from its header
        raise ImageTooLarge(*image.size, image.size[0] * image.size[1], max_pixels)
    metadata = photo_metadata(image, gps=exif == EXIF_GPS) if exif != EXIF_NONE else {}
    transparent = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    rgb = to_rgb(image)
    return DecodedImage(rgb.copy() if rgb is image else rgb, width, height, image.format, transparent, metadata)


def open_local_image(path: str | os.PathLike[str], shortest: int = QUERY_SIDE) -> Image.Image:
    """A local image file as a query (RGB, reduced while decoding to ``shortest``): OSError (missing, a FIFO, too
    many bytes) or :class:`ImageUnreadable` (not an image, too many pixels) naming why."""
    return decode_image(read_file(path, LOCAL_MAX_BYTES), LOCAL_MAX_PIXELS, shortest=shortest).rgb


def reduce_while_decoding(image: Image.Image, shortest: int = 0, longest: int = 0) -> None:
    """Ask ``image`` (opened, not loaded) to decode at a reduced size that keeps at least ``shortest`` pixels on
    its shortest side and ``longest`` on its longest: a JPEG by DCT scaling (1/2, 1/4 or 1/8), a HEIC by an
    embedded thumbnail at least that large; other formats (and files already small enough) are left as they
    are. The EXIF orientation is applied afterwards as for a full decode (a rotation keeps both sides)."""
    width, height = image.size
    if not (shortest or longest) or min(width, height) < 2 * shortest or max(width, height) < 2 * longest:
        return  # nothing asked for, or not even a 1/2 reduction would keep it
    wide = width >= height
    box = (max(shortest, longest if wide else 1, 1), max(shortest, 1 if wide else longest, 1))
    image.draft(None, box)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL image: EXIF orientation applied, transparency composited on white.

    A plain ``convert("RGB")`` drops alpha and exposes whatever colour sits under transparent pixels
    (often black), which changes what the model sees for icons, logos and emoji.
    """
    with contextlib.suppress(Exception):  # a damaged EXIF block: the pixels are fine, the orientation unknown
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "La":  # premultiplied alpha: Pillow converts it to LA only
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode in ("I;16L", "I;16B", "I;16N"):  # 16-bit greyscale in an explicit byte order
        image = image.convert("I")
    if image.mode in ("I;16", "I"):  # 16/32-bit greyscale: scale to 8 bits first
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def centre_cut(rgb: Image.Image) -> Image.Image:
    """At most ``MAX_ASPECT``:1, the centre kept (what a model's centre crop would see anyway)."""
    width, height = rgb.size
    if max(width, height) <= MAX_ASPECT * min(width, height):
        return rgb
    keep_w, keep_h = min(width, MAX_ASPECT * height), min(height, MAX_ASPECT * width)
    left, top = (width - keep_w) // 2, (height - keep_h) // 2
    return rgb.crop((left, top, left + keep_w, top + keep_h))


def model_view(image: Image.Image) -> Image.Image:
    """What a model's preprocessing is given: :func:`to_rgb`, then at most ``MAX_ASPECT``:1 (centre kept)."""
    return centre_cut(to_rgb(image))


def refused_pixels(error: Image.DecompressionBombError) -> int | None:
    """How many pixels the image PIL refused to open had (PIL says it only in its message), or None."""
    words = [word.strip("(),") for word in str(error).split()]
    numbers = [int(word) for word in words if word.isdigit()]
    return numbers[0] if numbers else None


# ---------------------------------------------------------------------------------------------- photo metadata

_MAKE, _MODEL, _EXIF_IFD, _GPS_IFD = 0x010F, 0x0110, 0x8769, 0x8825
_DATE_TAGS = ((0x9003, 0x9011), (0x9004, 0x9012))  # DateTimeOriginal + OffsetTimeOriginal, then ...Digitized
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON = 1, 2, 3, 4
_EXIF_DATE = re.compile(r"(\d{4})[:-](\d{2})[:-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_EXIF_OFFSET = re.compile(r"([+-])(\d{2}):(\d{2})")
MAX_EXIF_TEXT = 64  # a camera make or model longer than this is not one


def photo_metadata(image: Image.Image, gps: bool = False) -> dict[str, Any]:
    """A photo's EXIF as plain metadata fields, each present only when its EXIF is sound:

    - ``taken_at``: ISO 8601 text from DateTimeOriginal (else DateTimeDigitized), with its UTC offset when the
      camera wrote one (``2019-06-01T10:00:00+02:00``): the local time of the photo, so text ranges such as
      ``taken_at>=2019-06-01`` mean the day the photographer saw;
    - ``camera``: make and model (``Canon EOS 5D``; the make once when the model repeats it);
    - ``latitude`` / ``longitude``: signed decimal degrees, only with ``gps`` (a place is personal data).

    Never raises for what the EXIF holds: a damaged block, a field of the wrong type or out of range, is left
    out (only ``MemoryError`` passes)."""
    try:
        exif = image.getexif()
    except MemoryError:
        raise
    except Exception:  # a damaged EXIF block: the photo is indexed without its fields
        return {}
    found = {"taken_at": _guarded(_taken_at, exif), "camera": _guarded(_camera, exif)}
    if gps:
        found.update(_guarded(_position, exif) or {})
    return {name: value for name, value in found.items() if value is not None}


def _guarded(read: Any, exif: Image.Exif) -> Any:
    """``read(exif)``, or None whatever it raises (hostile EXIF: loops, wrong types, huge counts)."""
    try:
        return read(exif)
    except MemoryError:
        raise
    except Exception:
        return None


def _taken_at(exif: Image.Exif) -> str | None:
    sub = exif.get_ifd(_EXIF_IFD)
    for date_tag, offset_tag in _DATE_TAGS:
        taken = _exif_datetime(sub.get(date_tag))
        if taken is not None:
            return taken + (_exif_offset(sub.get(offset_tag)) or "")
    return None


def _exif_datetime(value: Any) -> str | None:
    """``YYYY:MM:DD HH:MM:SS`` (a real date and time) -> ISO 8601 text without offset; None for anything else
    (the all-zero date cameras write when their clock is unset included)."""
    text = _exif_text(value)
    match = _EXIF_DATE.fullmatch(text) if text else None
    if not match:
        return None
    try:
        return datetime.datetime(*(int(part) for part in match.groups())).isoformat()
    except ValueError:  # month 13, 0000:00:00 00:00:00, ...
        return None


def _exif_offset(value: Any) -> str | None:
    text = _exif_text(value)
    match = _EXIF_OFFSET.fullmatch(text) if text else None
    if not match or int(match.group(2)) > 14 or int(match.group(3)) >= 60:
        return None
    return text


def _camera(exif: Image.Exif) -> str | None:
    make, model = _exif_text(exif.get(_MAKE)), _exif_text(exif.get(_MODEL))
    if make and model:
        brand = make.split()[0].lower()  # "NIKON CORPORATION" + "NIKON D750" -> "NIKON D750"
        return model if model.lower().startswith(brand) else f"{make} {model}"
    return make or model


def _exif_text(value: Any) -> str | None:
    """An EXIF ASCII value as printable text (cut at its first NUL, surrounding spaces dropped), or None when it
    is not text (bytes that are not ASCII included), holds control characters or is longer than
    ``MAX_EXIF_TEXT``."""
    if isinstance(value, bytes) and len(value) <= 4 * MAX_EXIF_TEXT and value.isascii():
        value = value.decode("ascii")
    if not isinstance(value, str) or len(value) > 4 * MAX_EXIF_TEXT:
        return None
    text = re.sub(" {2,}", " ", value.split("\x00", 1)[0].strip())  # ASCII in EXIF ends at its first NUL
    return text if text and len(text) <= MAX_EXIF_TEXT and text.isprintable() else None


def _position(exif: Image.Exif) -> dict[str, float] | None:
    gps = exif.get_ifd(_GPS_IFD)
    latitude = _degrees(gps.get(_GPS_LAT), gps.get(_GPS_LAT_REF), "N", "S", 90)
    longitude = _degrees(gps.get(_GPS_LON), gps.get(_GPS_LON_REF), "E", "W", 180)
    if latitude is None or longitude is None:
        return None
    return {"latitude": latitude, "longitude": longitude}


def _degrees(value: Any, ref: Any, positive: str, negative: str, limit: float) -> float | None:
    """EXIF (degrees, minutes, seconds) rationals and an N/S or E/W reference -> signed decimal degrees."""
    ref = _exif_text(ref)
    if ref not in (positive, negative) or not isinstance(value, tuple) or not 1 <= len(value) <= 3:
        return None
    parts = [float(part) for part in value]  # IFDRational, int or float; anything else raises (-> left out)
    if not all(math.isfinite(part) and part >= 0 for part in parts) or any(part >= 60 for part in parts[1:]):
        return None
    degrees = sum(part / 60**i for i, part in enumerate(parts))
    if degrees > limit:
        return None
    return round(-degrees if ref == negative else degrees, 6)


# ---------------------------------------------------------------------------------------------- reading bytes


class NotRead(OSError):
    """Not read: a FIFO, device, socket or folder where an image file was expected (it could block or never
    end), more bytes than the cap, a damaged archive, a download that failed or took too long. The message is
    the reason, one line."""


class DownloadTimedOut(NotRead):
    """A download that did not finish within its total deadline, or that sent nothing for a read's timeout."""


class TooManyBytes(NotRead):
    """More bytes than the cap."""


def too_large(size: int | None, max_bytes: int) -> TooManyBytes:
    """The skip reason for more bytes than the cap (``size`` None: the read stopped at the cap)."""
    if size is None:
        return TooManyBytes(f"too large: over {max_bytes} bytes (raise --max-bytes)")
    return TooManyBytes(f"too large: {size} bytes > {max_bytes} (raise --max-bytes)")


@contextlib.contextmanager
def open_regular(path: str | os.PathLike[str]) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """``path`` (symlinks followed) opened for reading if it is a regular file, with the ``fstat`` of that very
    descriptor. A FIFO, socket or device is refused from ``stat`` before any ``open`` (opening a device can have
    effects, and a FIFO opened for a blocking read waits for a writer); the open itself is non-blocking, so a
    file swapped for a FIFO in between cannot block either, and the ``fstat`` catches the swap."""
    info = os.stat(path)
    _require_regular(info)
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as f:
        opened = os.fstat(descriptor)
        _require_regular(opened)
        yield f, opened


def _require_regular(info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO, device or socket"
        raise NotRead(f"not a regular file ({kind})")


def read_file(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of a regular file (symlinks followed), refusing special files and files over ``max_bytes``."""
    with open_regular(path) as (f, info):
        if info.st_size > max_bytes:
            raise too_large(info.st_size, max_bytes)
        # read(n) allocates n bytes first: ask for the file's size (+1 to see growth), not for the cap (a 256 MiB
        # buffer per image cost 2 ms of a 12 MP photo's 40 ms thumbnail)
        data = f.read(info.st_size + 1)
        if len(data) > info.st_size:  # it grew while being read: the rest, up to the cap
            data += f.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:  # it grew past the cap while being read
        raise too_large(None, max_bytes)
    return data


def read_member(archive: str | os.PathLike[str], member: str, max_bytes: int) -> bytes:
    """The bytes of ``member`` of a tar archive (any compression tarfile reads), its first entry of that name.

    A cut or damaged archive, a member that is missing, not a regular file or over ``max_bytes``: NotRead with
    the reason (tarfile's own errors never escape)."""
    with open_regular(archive) as (f, _):
        try:
            with tarfile.open(fileobj=f, mode="r:*") as tar:
                for info in tar:
                    if info.name != member:
                        continue
                    if not info.isfile():
                        raise NotRead(f"tar member '{_shown(member)}' is not a regular file")
                    if info.size > max_bytes:
                        raise too_large(info.size, max_bytes)
                    data = tar.extractfile(info).read()  # type: ignore[union-attr]
                    if len(data) != info.size:
                        raise NotRead(f"tar member '{_shown(member)}' is cut short: the archive ends inside it")
                    return data
        except NotRead:
            raise
        except MemoryError:
            raise
        except Exception as exc:  # tarfile.ReadError, EOFError, zlib/bz2/lzma errors: a cut or damaged archive
            raise NotRead(f"the tar archive is cut or damaged ({one_line(exc)})") from None
    raise NotRead(f"no member '{_shown(member)}' in the tar archive (it was cut or replaced after indexing)")


def _shown(text: str) -> str:
    return printable(text)[:200]


class _Deadline:
    """The sockets of one download, shut down together when its total time is up: a blocked ``recv`` then
    returns at once, wherever the download was (connecting, TLS, headers, body)."""

    def __init__(self) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)
        return sock

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's shutdown, under a TLS wrapper too


def _tracked(base: type[http.client.HTTPConnection], deadline: _Deadline) -> type[http.client.HTTPConnection]:
    class Tracked(base):  # type: ignore[valid-type, misc]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = lambda *a, **k: deadline.track(socket.create_connection(*a, **k))

    return Tracked


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._connection = _tracked(http.client.HTTPConnection, deadline)

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._connection = _tracked(http.client.HTTPSConnection, deadline)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req, context=self._context)


def download(url: str, max_bytes: int, read_timeout_s: float, deadline_s: float,
             handlers: Sequence[urllib.request.BaseHandler] = ()) -> bytes:
    """The bytes at an http(s) ``url``: at most ``max_bytes`` (NotRead over it), each read within
    ``read_timeout_s`` and the whole download within ``deadline_s`` (:class:`DownloadTimedOut`, however slowly
    the server sends). Network and protocol errors are NotRead ("read failed: ..."); ``handlers`` are added to
    the opener (a redirect policy). Other exceptions (a handler's own) pass through."""
    deadline = _Deadline()
    opener = urllib.request.build_opener(*handlers, _HTTPHandler(deadline), _HTTPSHandler(deadline))
    timer = threading.Timer(deadline_s, deadline.expire)
    timer.daemon = True
    timer.start()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "stair-search"})
        with opener.open(request, timeout=min(read_timeout_s, deadline_s)) as response:
            data = response.read(max_bytes + 1)
            missing = response.length  # what the Content-Length promised and the connection did not bring
    except (OSError, http.client.HTTPException) as exc:
        if deadline.expired:
            raise _timed_out(deadline_s) from None
        if isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError):
            raise DownloadTimedOut(f"download stalled: nothing came for {min(read_timeout_s, deadline_s):g} s") \
                from None
        raise NotRead(f"read failed: {one_line(exc)}") from None
    finally:
        timer.cancel()
    if deadline.expired:  # the shut-down socket ended the body early
        raise _timed_out(deadline_s)
    if len(data) > max_bytes:
        raise too_large(None, max_bytes)
    if missing:
        raise NotRead(f"read failed: IncompleteRead: the connection closed after {len(data)} of the "
                      f"{len(data) + missing} bytes its Content-Length announced")
    return data


def _timed_out(deadline_s: float) -> DownloadTimedOut:
    return DownloadTimedOut(f"download took longer than {deadline_s:g} s (the total time one download may take; "
                            f"the server sent too slowly or stalled)")


# ---------------------------------------------------------------------------------------------- stored sources

FILE_URL = "file://"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")
# ``ARCHIVE#MEMBER`` in a plain stored source: a tar archive's name (any compression tarfile reads), then '#'
_MEMBER_MARK = re.compile(r"\.(?:tar|tar\.gz|tgz|tar\.bz2|tbz2?|tar\.xz|txz)#")
_URL_SAFE = "/!$&'()*+,;=:@~-._"  # a file URL's path keeps these as they are; '%', '#', '?' and the rest are escaped


@dataclass(frozen=True)
class SourceLocation:
    """Where a stored source's bytes are: a local file, or a member of a local tar archive."""

    path: str  # a file system path (bytes that are not UTF-8 as surrogates, as os.fsdecode gives them)
    member: str | None = None  # a tar member's name (tarfile's text: surrogates for bytes that are not UTF-8)


def printable(text: str) -> str:
    """``text`` as valid UTF-8: a file name's bytes that are not UTF-8 (Python holds them as surrogates, which
    no parquet or JSON writer takes) become ``\\xff`` escapes; every other name is returned unchanged. For text
    that is shown (ids, reasons), never for a source that must be read again (see :func:`file_source`)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _quoted(text: str) -> str:
    return urllib.parse.quote(text.encode("utf-8", "surrogateescape"), safe=_URL_SAFE)


def file_source(path: str) -> str:
    """The stored source of a local file (an absolute path): the path itself when that reads back as a file,
    else a ``file://`` URL with every byte percent-encoded (a name that is not UTF-8, or one that holds
    ``.tar#`` (or ``.tar.gz#``, ``.tgz#``, ...) and so would read back as a tar member)."""
    if not os.path.isabs(path) or (_utf8(path) and not _MEMBER_MARK.search(path)):
        return path
    return FILE_URL + _quoted(path)


def member_source(archive: str, member: str) -> str:
    """The stored source of tar member ``member`` of ``archive`` (an absolute path): ``archive.tar#member`` as
    always when that reads back unchanged (an archive named ``.tar``, ``.tar.gz``, ``.tgz``, ... without '#'),
    else ``file://ARCHIVE#MEMBER`` with both parts percent-encoded."""
    plain = f"{archive}#{member}"
    mark = _MEMBER_MARK.search(plain)
    if _utf8(plain) and "#" not in archive and not url_scheme(archive) and mark and mark.end() == len(archive) + 1:
        return plain
    return f"{FILE_URL}{_quoted(archive)}#{_quoted(member)}"


def url_scheme(text: str) -> str | None:
    """The scheme of a URL (``s3`` of ``s3://b/k``), or None for a path."""
    match = _SCHEME.match(text)
    return match.group(0)[:-3].lower() if match else None


def is_remote(source: str) -> bool:
    """A stored source that is an http(s) URL (a URL-sourced collection)."""
    return source.startswith(("http://", "https://"))


def parse_source(source: str) -> SourceLocation:
    """A stored source -> the local file or tar member it names; ValueError (the reason) for anything else.

    Read back: ``file://`` URLs (percent-encoded; a ``#fragment`` names a tar member); plain paths, where
    ``ARCHIVE.tar#MEMBER`` is a tar member (what every index has stored for tar shards; ``.tar.gz#``, ``.tgz#``
    and the other compressed names too) and anything else a file. A plain path that
    holds ``\\xNN`` escapes (how indexes before this stored names that are not UTF-8) is tried unescaped by
    :func:`readings` when the escaped name does not exist.
    """
    if source.startswith(FILE_URL):
        rest = source[len(FILE_URL):]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        if not rest.startswith("/"):
            raise ValueError("the stored source is a file URL of another host")
        path_part, hashed, fragment = rest.partition("#")
        path = os.fsdecode(urllib.parse.unquote_to_bytes(path_part))
        member = urllib.parse.unquote_to_bytes(fragment).decode("utf-8", "surrogateescape") if hashed else None
        return SourceLocation(path, member or None)
    if url_scheme(source):
        raise ValueError("the stored source is remote; it is not read from this machine")
    mark = _MEMBER_MARK.search(source)
    if mark:
        return SourceLocation(source[: mark.end() - 1], source[mark.end() :] or None)
    return SourceLocation(source)


def readings(location: SourceLocation) -> list[SourceLocation]:
    """Where to look for ``location``'s bytes, in order: as stored, then (when it holds ``\\xNN`` escapes) with
    them turned back into the bytes they stand for: how indexes before unambiguous sources stored names that are
    not UTF-8. The first that exists is the one."""
    unescaped = SourceLocation(_unescape(location.path), _unescape(location.member) if location.member else None)
    return [location] if unescaped == location else [location, unescaped]


def _unescape(text: str) -> str:
    return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text)
