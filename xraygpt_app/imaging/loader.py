"""Radiograph input: bytes or a path -> an 8-bit PIL image plus a non-identifying description.

Every way into the app (web UI, CLI, Python API, zero-shot) goes through :func:`load_radiograph`.
The format is detected from the content, never the file name. Ordinary 8-bit grey or RGB
PNG/JPEG files come out with exactly the pixels ``PIL.Image.open`` gives (the model references
were computed that way); only >8-bit data, DICOM, palette, alpha, CMYK and the like are
transformed, and each transformation is reported in ``ImageInfo.notices``.

Privacy: decoding happens in memory, nothing is written to disk, and logs carry only sizes,
formats and timings (never names, tags or pixel content).
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import struct
import time
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import ImageConfig
from ..errors import ImageLoadError
from .radiograph import (  # noqa: F401  (re-exported: the loader's public types)
    ImageInfo,
    Radiograph,
    check_dimensions,
    megapixels,
    model_ready,
    scale_to_uint8,
    to_display_mode,
)

logger = logging.getLogger(__name__)

# Pillow plugins we let near untrusted bytes (the JPEG plugin also opens MPO files from phone cameras).
PILLOW_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF", "PPM", "JPEG2000")
_MB = 1024 * 1024
_BIT_DEPTH = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32}
_EXIF_ORIENTATION = 0x0112


def load_radiograph(source: bytes | str | os.PathLike, limits: ImageConfig | None = None) -> Radiograph:
    """Read a radiograph from bytes or a file path, fully decoded and checked.

    Raises :class:`~xraygpt_app.errors.ImageLoadError` with a plain-language message for
    anything that is not a usable image (missing, too large, truncated, not an image...).
    """
    limits = limits or ImageConfig()
    start = time.perf_counter()
    data = read_source(source, limits.max_bytes)
    if not data:
        raise ImageLoadError("The file is empty (0 bytes).")
    if looks_like_dicom(data):
        from .dicom import load_dicom  # pydicom is imported only when needed

        radiograph = load_dicom(data, limits)
    else:
        radiograph = _load_pillow(data, limits)
    info = radiograph.info
    logger.info("loaded %s %dx%d (%d bytes) in %.0f ms", info.format, info.width, info.height, len(data),
                (time.perf_counter() - start) * 1000)
    return radiograph


def read_source(source: bytes | str | os.PathLike, max_bytes: int) -> bytes:
    """Return the bytes of ``source`` (bytes or a path), refusing more than ``max_bytes``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_byte_size(len(data), max_bytes)
        return data
    path = Path(os.fspath(source))
    try:
        status = path.stat()
        if stat.S_ISDIR(status.st_mode):
            raise ImageLoadError("This is a folder, not a file.")
        if not stat.S_ISREG(status.st_mode):
            raise ImageLoadError("This is not a regular file (a device, pipe or socket).")
        _check_byte_size(status.st_size, max_bytes)
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)  # the file may have grown since stat
    except FileNotFoundError:
        raise ImageLoadError("No such file.") from None
    except PermissionError:
        raise ImageLoadError("The file cannot be read: permission denied.") from None
    except (OSError, ValueError) as exc:  # ValueError: e.g. a NUL byte in the path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "invalid path"
        raise ImageLoadError(f"The file cannot be read ({reason}).") from None
    _check_byte_size(len(data), max_bytes)
    return data


def _check_byte_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageLoadError(f"The file is {size / _MB:.1f} MB, more than the limit of {max_bytes / _MB:.1f} MB"
                             " (image.max_bytes).")


def looks_like_dicom(data: bytes) -> bool:
    """True for DICOM files, with the 128-byte preamble + "DICM" or without (raw data sets)."""
    if data[128:132] == b"DICM" or data[:4] == b"DICM":
        return True
    if len(data) < 12:
        return False
    group, element = struct.unpack_from("<HH", data)
    if group not in (0x0002, 0x0008) or element > 0x00FF:
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():  # explicit VR
        return True
    (length,) = struct.unpack_from("<I", data, 4)  # implicit VR: a plausible value length
    return length < len(data)


def describe_content(data: bytes) -> str:
    """Say in a few words what a file that is not an image looks like."""
    head = data[:512]
    magic = [
        (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive (or a Word/Excel/PowerPoint file)"),
        (b"\x1f\x8b", "a gzip-compressed file"), (b"7z\xbc\xaf", "a 7-Zip archive"), (b"Rar!", "a RAR archive"),
        (b"\x89HDF", "an HDF5 data file"), (b"\x93NUMPY", "a NumPy array file"),
        (b"\x7fELF", "a program (ELF executable)"), (b"MZ", "a Windows program"),
        (b"\xd0\xcf\x11\xe0", "an old Microsoft Office document"),
    ]
    for prefix, name in magic:
        if head.startswith(prefix):
            return name
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "a HEIC/HEIF photo (save it as JPEG or PNG)" if brand in (b"heic", b"heix", b"mif1", b"msf1") \
            else "a video or MP4-family file"
    if data[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "a NIfTI volume (CT/MRI research format), not a radiograph"
    return _describe_text(head) or "unrecognised binary data"


def _describe_text(head: bytes) -> str | None:
    if not head.strip(b"\x00"):
        return "only zero bytes"
    text = head.decode("utf-8", errors="replace")  # the 512-byte cut may split a character
    readable = sum(c.isprintable() or c in "\r\n\t" for c in text) - 2 * text.count("\ufffd")
    if readable < 0.95 * len(text):
        return None
    lowered = text.lstrip().lower()
    if lowered.startswith(("<!doctype html", "<html")):
        return "a web page (HTML)"
    if "<svg" in lowered:
        return "an SVG drawing"
    if lowered.startswith("<?xml"):
        return "an XML document"
    if lowered.startswith(("{", "[")):
        return "JSON or other structured text"
    return "plain text"


# ---------------------------------------------------------------- Pillow formats


def _load_pillow(data: bytes, limits: ImageConfig) -> Radiograph:
    image = _open_pillow(data)
    width, height = image.size
    check_dimensions(width, height, limits)
    fmt, mode = image.format or "unknown", image.mode
    frames = getattr(image, "n_frames", 1)
    bit_depth = _pillow_bit_depth(image, data)
    _decode_fully(image, fmt)
    notices: list[str] = []
    if frames > 1:
        notices.append(f"The file holds {frames} images (frames); only the first is used.")
    if image.getexif().get(_EXIF_ORIENTATION, 1) in range(2, 9):  # 1 is upright; other values are invalid
        image = ImageOps.exif_transpose(image)
        notices.append("Rotated/flipped as its EXIF orientation tag says.")
    output = to_display_mode(image, notices)
    if fmt == "PNG" and bit_depth == 16 and mode == "RGB":
        notices.append("16-bit colour PNG: only the top 8 bits of each channel are read.")
    # PNG text chunks and EXIF can hold names and dates, and Gradio/Pillow copy ``info`` into the files they save.
    output.info = {}
    info = ImageInfo(format=fmt, width=output.width, height=output.height, bit_depth=bit_depth,
                     photometric=mode, frames=frames, notices=tuple(notices))
    return Radiograph(image=output, info=info)


def _open_pillow(data: bytes) -> Image.Image:
    """Open the header only (no pixel decoding yet), restricted to the formats we accept."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            return Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{megapixels(int(found.group(1)))} megapixels" if found else "too many pixels"
        raise ImageLoadError(f"The image declares {size}, far beyond any radiograph (image.max_pixels);"
                             " it was not decoded.") from None
    except UnidentifiedImageError:
        raise ImageLoadError(_not_an_image_message(data)) from None
    except Exception as exc:  # a recognised format whose header is broken
        logger.debug("header parse failed: %s", type(exc).__name__)
        raise ImageLoadError(_damaged_header_message(data) or "The file starts like an image but its header is"
                             " damaged (it may be truncated or corrupt).") from None


_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"))


def _damaged_header_message(data: bytes) -> str | None:
    """For a file that starts with an image signature but cannot be opened."""
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return f"The {name} file is truncated or damaged: its header is incomplete."
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "The WebP file is truncated or damaged: its header is incomplete."
    return None


def _not_an_image_message(data: bytes) -> str:
    damaged = _damaged_header_message(data)
    if damaged:
        return damaged
    other = _other_pillow_format(data)
    if other:
        return f"This is a {other} image, which is not accepted: save it as PNG, JPEG or DICOM."
    return (f"This is not an image: it looks like {describe_content(data)}."
            " Accepted: PNG, JPEG, TIFF, BMP, WebP or DICOM.")


def _other_pillow_format(data: bytes) -> str | None:
    """The name of an image format Pillow knows but we do not accept (header only, never decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.format
    except Exception:  # not an image for any plugin either
        return None


def _decode_fully(image: Image.Image, fmt: str) -> None:
    """Decode all pixels now, so a truncated file fails here and not inside a model."""
    try:
        image.load()
    except MemoryError:
        raise ImageLoadError("Not enough memory to decode this image.") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, zlib.error...
        logger.debug("decode failed: %s", type(exc).__name__)
        if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
            raise ImageLoadError(f"The {fmt} file is truncated: it ends before the image data is complete"
                                 " (cut off during download or copy?).") from None
        raise ImageLoadError(f"The {fmt} file is damaged and its image data cannot be decoded.") from None


def _pillow_bit_depth(image: Image.Image, data: bytes) -> int:
    if image.format == "PNG" and data[12:16] == b"IHDR":
        return data[24]  # IHDR bit depth per sample (1, 2, 4, 8 or 16)
    return _BIT_DEPTH.get(image.mode, 8)
