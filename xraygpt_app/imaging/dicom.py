"""DICOM radiographs -> 8-bit display images, through pydicom and its pip-installable decoders.

Order of operations (PS3.3 C.11 / PS3.4 N.2): first frame -> modality LUT (rescale slope and
intercept) -> VOI LUT, else the first window centre/width, else the value range -> MONOCHROME1
inverted. Palette colour is expanded, YBR converted to RGB by pydicom.

Only non-identifying fields (modality, view position, body part) are read for the description;
nothing read from the file is logged. pydicom's own warnings and log records can quote element
values (names, dates), so both are silenced while we read and decode.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
from collections.abc import Iterator

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    get_decoder,
    pixel_array,
)
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..config import ImageConfig
from ..errors import ImageLoadError
from .radiograph import ImageInfo, Radiograph, check_dimensions, scale_to_uint8, to_display_mode

logger = logging.getLogger(__name__)

PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG", "RF", "OT"}  # OT: secondary captures of films
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "CHEST_ABDOMEN", "CHESTABDOMEN"}
LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "LLD", "RLD"}
_GREY = ("MONOCHROME1", "MONOCHROME2")
_QUIET = threading.local()
_QUIET_PACKAGES = {"pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle", "gdcm"}
# Loggers that may not exist yet on the first call (created when a decoder module is imported).
_QUIET_LOGGERS = ("pydicom", "pydicom.pixels.decoders.base", "pydicom.pixels.utils", "openjpeg.utils", "pylibjpeg")


class _QuietFilter(logging.Filter):
    """Drops pydicom's log records emitted by a thread that is inside :func:`_quiet_pydicom`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_QUIET, "active", False)


_FILTER = _QuietFilter()


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and (for this thread only) its and its decoders' log records."""
    # A logger's filter does not see records propagated from its children, so filter each one.
    names = [name for name in logging.root.manager.loggerDict if name.split(".")[0] in _QUIET_PACKAGES]
    for name in {*names, *_QUIET_LOGGERS}:
        logging.getLogger(name).addFilter(_FILTER)  # idempotent
    outer = getattr(_QUIET, "active", False)
    _QUIET.active = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _QUIET.active = outer


def load_dicom(data: bytes, limits: ImageConfig) -> Radiograph:
    """Decode a DICOM file held in memory into a :class:`Radiograph` (first frame only)."""
    with _quiet_pydicom():  # values are converted lazily, so validation warnings can come at any access
        return _load_dicom(data, limits)


def _load_dicom(data: bytes, limits: ImageConfig) -> Radiograph:
    ds = _read_dataset(data)
    width, height = _dimensions(ds)
    check_dimensions(width, height, limits)
    frames = max(1, _int(ds.get("NumberOfFrames"), 1))
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    notices: list[str] = []
    if frames > 1:
        notices.append(f"The file holds {frames} frames; only the first is used.")
    array = _decode_first_frame(ds)
    image = _to_image(array, ds, photometric, notices)
    info = ImageInfo(
        format="DICOM", width=width, height=height, bit_depth=_int(ds.get("BitsStored"), 8),
        photometric=photometric, frames=frames, modality=_text(ds, "Modality"),
        view_position=_text(ds, "ViewPosition"), body_part=_text(ds, "BodyPartExamined"),
        notices=tuple(notices + content_notices(ds)), transfer_syntax=_syntax_name(ds))
    return Radiograph(image=image, info=info)


def _read_dataset(data: bytes) -> Dataset:
    """Parse the file (with or without preamble/file meta) and check it carries usable pixel data."""
    if data[:4] == b"DICM":  # "DICM" + file meta but no preamble: pydicom expects the 128 bytes
        data = bytes(128) + data
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # InvalidDicomError, EOFError, struct.error, ValueError...
        logger.debug("dcmread failed: %s", type(exc).__name__)
        raise ImageLoadError("The DICOM file is damaged and cannot be read.") from None
    # A file cut inside encapsulated pixel data parses as an *empty* data set with only a warning.
    if len(ds) == 0:
        where = "inside its image data" if PIXEL_DATA_TAG in data else "before its image data"
        raise ImageLoadError(f"The DICOM file is truncated or damaged: none of its contents could be read"
                             f" (it seems to end {where}).")
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if data.rfind(PIXEL_DATA_TAG) >= len(data) - 12:  # cut inside the Pixel Data element header
            raise ImageLoadError("The DICOM file is truncated: it ends at the start of its image data.")
        raise ImageLoadError("This DICOM file contains no image (no Pixel Data): it may be a report,"
                             " a DICOMDIR or a presentation state.")
    _ensure_transfer_syntax(ds)
    return ds


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Data sets without file meta (no preamble) still decode: take the encoding pydicom detected."""
    if not hasattr(ds, "file_meta"):
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    if ds.file_meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _dimensions(ds: Dataset) -> tuple[int, int]:
    width, height = _int(ds.get("Columns"), 0), _int(ds.get("Rows"), 0)
    if not width or not height:
        raise ImageLoadError("The DICOM file has pixel data but no image size (Rows/Columns missing).")
    return width, height


def _decode_first_frame(ds: Dataset) -> np.ndarray:
    syntax = _syntax_name(ds)
    _require_decoder(ds)
    try:
        return pixel_array(ds, index=0)
    except MemoryError:
        raise ImageLoadError("Not enough memory to decode this DICOM image.") from None
    except Exception as exc:  # every plugin failed, or the data does not match its description
        logger.debug("decode failed: %s", type(exc).__name__)
        if "less than expected" in str(exc):
            raise ImageLoadError("The DICOM file is truncated: its image data is incomplete.") from None
        raise ImageLoadError(f"The DICOM image data ({syntax}) is damaged or does not match its description"
                             " and cannot be decoded.") from None


def _require_decoder(ds: Dataset) -> None:
    """Refuse clearly when the transfer syntax is unknown or its decoder packages are missing."""
    uid = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise ImageLoadError(f"The DICOM image uses a transfer syntax that cannot be decoded ({uid.name}).") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise ImageLoadError(f"The DICOM image is compressed with {uid.name}, for which no decoder is installed"
                             f" (missing: {missing or 'a pydicom decoding plugin'}).")


def _to_image(array: np.ndarray, ds: Dataset, photometric: str, notices: list[str]) -> Image.Image:
    if photometric in _GREY and array.ndim == 2:
        return Image.fromarray(_grey_to_uint8(array, ds, photometric, notices), mode="L")
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(array, ds)
        notices.append("Palette colour applied.")
        return to_display_mode(Image.fromarray(scale_to_uint8(rgb, 0, np.iinfo(rgb.dtype).max), mode="RGB"), notices)
    if array.ndim == 3 and array.shape[-1] == 3:  # RGB, or YBR already converted to RGB by pydicom
        top = 2 ** _int(ds.get("BitsStored"), 8) - 1
        rgb = array if array.dtype == np.uint8 else scale_to_uint8(array, 0, top)
        return to_display_mode(Image.fromarray(np.ascontiguousarray(rgb), mode="RGB"), notices)
    raise ImageLoadError(f"The DICOM photometric interpretation {photometric or '(missing)'} is not supported.")


def _grey_to_uint8(array: np.ndarray, ds: Dataset, photometric: str, notices: list[str]) -> np.ndarray:
    """Modality LUT, then VOI LUT / first window / value range, then MONOCHROME1 inversion."""
    values = apply_modality_lut(array, ds)
    try:
        shown, lo, hi, how = _apply_voi(values, ds)
    except Exception as exc:  # a malformed window or LUT: fall back to the value range
        logger.debug("VOI failed: %s", type(exc).__name__)
        shown, lo, hi, how = values, float(values.min()), float(values.max()), "the value range (its window is invalid)"
    notices.append(f"Grey levels mapped to 8 bits by {how}.")
    out = scale_to_uint8(shown, lo, hi)
    # DX "For Presentation" pairs MONOCHROME1 with Presentation LUT Shape INVERSE: one inversion, not two.
    inverse_shape = str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    if photometric == "MONOCHROME1" or inverse_shape:
        out = 255 - out
        notices.append("Inverted for display (MONOCHROME1: low values are white).")
    return out


def _apply_voi(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, float, float, str]:
    """Apply the VOI LUT or first window; return the result with the output range that maps to 0..255."""
    item = (ds.get("VOILUTSequence") or [None])[0]
    if item is not None and item.get("LUTDescriptor") and item.get("LUTData") is not None:
        count, first = _int(item.LUTDescriptor[0], 0) or 65536, _int(item.LUTDescriptor[1], 0)
        table = apply_voi(np.arange(first, first + count), ds)  # the whole LUT, for its output range
        shown = apply_voi(np.rint(values).astype(np.int64), ds)
        return shown, float(table.min()), float(table.max()), "its VOI LUT"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        shown = apply_windowing(values, ds)
        lo, hi = apply_windowing(np.array([-1e30, 1e30]), ds)  # the window's output range
        return shown, float(lo), float(hi), "its first window (centre/width)"
    return values, float(values.min()), float(values.max()), "the value range (no window in the file)"


def content_notices(ds: Dataset) -> list[str]:
    """Warn (never refuse) when the header says this is not a frontal chest radiograph."""
    notices = []
    modality = (_text(ds, "Modality") or "").upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        notices.append(f"Modality {modality}: not a radiograph. The models were trained on chest X-rays;"
                       " their output will not be meaningful.")
    body_part = (_text(ds, "BodyPartExamined") or "").upper()
    if body_part and body_part not in CHEST_BODY_PARTS:
        notices.append(f"Body part {body_part}: the models were trained on chest X-rays only.")
    if (_text(ds, "ViewPosition") or "").upper() in LATERAL_VIEWS:
        notices.append("Lateral view: the models were trained mostly on frontal (PA/AP) chest X-rays.")
    if (_text(ds, "PresentationIntentType") or "").upper() == "FOR PROCESSING":
        notices.append("Raw detector data ('For Processing'): contrast may differ from a displayed radiograph.")
    if str(ds.get("LossyImageCompression", "")) == "01":
        notices.append("The image has been lossy-compressed.")
    return notices


def _text(ds: Dataset, keyword: str) -> str | None:
    """A short non-identifying code string (Modality, ViewPosition, BodyPartExamined), or None."""
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element
        return None
    text = str(value).strip() if value is not None else ""
    return text[:16] or None  # CS values are at most 16 characters


def _int(value: object, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _syntax_name(ds: Dataset) -> str | None:
    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return uid.name if uid else None
