"""Image headers: sizes from JPEG/PNG headers alone, and a cheap plausibility check of bytes.

`image_size` reads (height, width) as decoded, with the JPEG EXIF orientation applied (as
DALI's decoder and `PIL.ImageOps.exif_transpose` do), from the SOF marker or the PNG IHDR;
other formats DALI decodes go through Pillow's lazy open. `check_encoded` flags bytes that
are obviously not a decodable image (empty, unknown signature, truncated JPEG or PNG).
"""

from __future__ import annotations

import io
import os
import struct
from typing import BinaryIO

from augsvc.engine.files import FileRefused, open_regular

__all__ = ["HeaderError", "check_encoded", "header_entry", "image_size"]

JPEG_SOI = b"\xff\xd8"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# start-of-frame markers: every 0xC0-0xCF except DHT (C4), JPG (C8) and DAC (CC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0-7: no length
_EXIF_ORIENTATION = 0x0112
# formats Pillow may identify that DALI's decoder also reads
_OTHER_FORMATS = frozenset(["TIFF", "BMP", "WEBP", "JPEG2000", "PPM"])

class HeaderError(ValueError):
    """An image header that cannot be parsed."""



def image_size(path: str | os.PathLike[str], root: str | None = None) -> tuple[int, int]:
    """(height, width) of an image as decoded (EXIF orientation applied), from its header.

    The file is opened with `augsvc.engine.files.open_regular` (regular files only; inside
    the resolved `root` unless None): FileRefused otherwise.
    """
    fd, _ = open_regular(os.fspath(path), root)
    with os.fdopen(fd, "rb") as f:
        head = f.read(8)
        f.seek(0)
        if head.startswith(JPEG_SOI):
            h, w, orientation, _ = _jpeg_header(f, to_scan=False)
            return (w, h) if orientation >= 5 else (h, w)
        if head == PNG_SIGNATURE:
            return _png_header(f)
        return _pillow_size(f)


def header_entry(path: str, root: str | None = None) -> list:
    """[height, width, None] or [0, 0, reason] for the cache."""
    try:
        h, w = image_size(path, root)
    except (HeaderError, FileRefused) as exc:
        return [0, 0, str(exc)]
    except OSError as exc:
        return [0, 0, f"unreadable: {exc.strerror or exc}"]
    return [h, w, None]


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise HeaderError("truncated JPEG header")
    return data


def _jpeg_header(f: BinaryIO, *, to_scan: bool) -> tuple[int, int, int, int]:
    """(height, width, EXIF orientation, offset of the first scan's data) of a JPEG.

    Walks the marker segments from SOI; stops at the frame header (SOF) unless
    `to_scan`, in which case it goes on to the first SOS (offset -1 when it stopped
    at SOF).
    """
    if f.read(2) != JPEG_SOI:
        raise HeaderError("not a JPEG (no SOI marker)")
    orientation, size = 1, None
    while True:
        if _read_exact(f, 1) != b"\xff":
            raise HeaderError(f"bad JPEG marker at byte {f.tell() - 1}")
        marker = 0xFF
        while marker == 0xFF:  # fill bytes
            marker = _read_exact(f, 1)[0]
        if marker in _JPEG_STANDALONE:
            continue
        if marker == 0xD9:
            raise HeaderError("JPEG ends before any image data (EOI)")
        (length,) = struct.unpack(">H", _read_exact(f, 2))
        if length < 2:
            raise HeaderError(f"bad JPEG segment length {length}")
        if marker == 0xDA:
            if size is None:
                raise HeaderError("JPEG scan before any frame header (no SOF)")
            _read_exact(f, length - 2)
            return (*size, orientation, f.tell())
        if marker in _JPEG_SOF:
            if length < 8:
                raise HeaderError(f"bad JPEG frame header length {length}")
            _, h, w = struct.unpack(">BHH", _read_exact(f, 5))
            if h == 0 or w == 0:
                raise HeaderError(f"JPEG frame header with size {w}x{h} (DNL not supported)")
            if not to_scan:
                return h, w, orientation, -1
            size = (h, w)
            f.seek(length - 7, os.SEEK_CUR)
        elif marker == 0xE1 and orientation == 1:
            orientation = _exif_orientation(_read_exact(f, length - 2))
        else:
            f.seek(length - 2, os.SEEK_CUR)


def _exif_orientation(app1: bytes) -> int:
    """The orientation tag (1-8) of an APP1 payload, or 1 if absent or malformed."""
    if not app1.startswith(b"Exif\0\0"):
        return 1
    tiff = app1[6:]
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        return 1
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(count):
            tag, typ, _, value = struct.unpack_from(order + "HHIH", tiff, ifd + 2 + 12 * k)
            if tag == _EXIF_ORIENTATION:
                return value if typ == 3 and 1 <= value <= 8 else 1
    except struct.error:
        pass
    return 1


def _png_header(f: BinaryIO) -> tuple[int, int]:
    """(height, width) from a PNG's IHDR chunk."""
    data = f.read(24)
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise HeaderError("bad PNG header (no IHDR chunk)")
    w, h = struct.unpack(">II", data[16:24])
    if h == 0 or w == 0:
        raise HeaderError(f"PNG with size {w}x{h}")
    return h, w


def _pillow_size(f: BinaryIO) -> tuple[int, int]:
    """(height, width) of another format via Pillow's lazy open (no pixel decode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(f) as im:
            fmt, (w, h) = im.format, im.size
    except UnidentifiedImageError as exc:
        raise HeaderError("not an image") from exc
    except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise HeaderError(f"bad image header: {exc}") from exc
    if fmt not in _OTHER_FORMATS:
        raise HeaderError(f"unsupported image format {fmt}")
    return h, w


def check_encoded(data: bytes) -> str | None:
    """Why `data` is obviously not a decodable image, or None if it looks plausible.

    Flags: empty data; an unknown signature (JPEG, PNG and the other formats DALI
    decodes are known); a JPEG whose headers are broken or truncated, or with no EOI
    marker after its scan data (truncated; trailers after EOI are allowed); a PNG with
    a bad IHDR or no IEND chunk near the end. Cheap: headers plus one backward search.
    """
    if not data:
        return "empty file"
    if data.startswith(JPEG_SOI):
        try:
            _, _, _, scan = _jpeg_header(io.BytesIO(data), to_scan=True)
        except HeaderError as exc:
            return str(exc)
        if data.rfind(b"\xff\xd9", scan) < 0:
            return "truncated JPEG (no EOI marker after the scan data)"
        return None
    if data.startswith(PNG_SIGNATURE):
        try:
            _png_header(io.BytesIO(data))
        except HeaderError as exc:
            return str(exc)
        if data.rfind(b"IEND", max(0, len(data) - 4096)) < 0:
            return "truncated PNG (no IEND chunk)"
        return None
    if _other_signature(data):
        return None
    return "not an image (unknown signature)"  # never the bytes: they may be anyone's file


def _other_signature(data: bytes) -> bool:
    """Whether `data` starts like a TIFF, BMP, WebP, JPEG 2000 or PNM file."""
    return (
        data[:4] in (b"II*\0", b"MM\0*")
        or data[:2] == b"BM"
        or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
        or data[:12] == b"\0\0\0\x0cjP  \r\n\x87\n"
        or data[:4] == b"\xff\x4f\xff\x51"
        or (data[:1] == b"P" and data[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6")
            and data[2:3].isspace())
    )
