"""What the loaders return (an 8-bit image and its description) and the pixel conversions they share.

Both :mod:`image_io` (Pillow formats) and :mod:`dicom_io` build on this module, so neither imports the other's
internals: ``image_io`` dispatches to ``dicom_io``, and ``dicom_io`` needs only what is here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..config import ImageConfig
from ..errors import ImageLoadError


@dataclass(frozen=True)
class ImageInfo:
    """What was read, without anything that identifies a patient; JSON-serialisable."""

    format: str  # "PNG", "JPEG", "DICOM", ...
    width: int
    height: int
    bit_depth: int  # of the stored data (per sample)
    photometric: str  # DICOM photometric interpretation, or the Pillow mode ("L", "RGB", "I;16"...)
    frames: int = 1
    modality: str | None = None  # DICOM only
    view_position: str | None = None  # DICOM only
    body_part: str | None = None  # DICOM only
    notices: tuple[str, ...] = ()  # plain-language notes on what was done or looks odd
    transfer_syntax: str | None = None  # DICOM only, e.g. "JPEG 2000 Image Compression"

    def to_dict(self) -> dict:
        """A plain dict (tuples as lists) for JSON output."""
        data = dataclasses.asdict(self)
        data["notices"] = list(self.notices)
        return data


@dataclass(frozen=True)
class Radiograph:
    """The image the models see (8-bit, mode "L" or "RGB", EXIF orientation applied) and its description."""

    image: Image.Image
    info: ImageInfo


def check_dimensions(width: int, height: int, limits: ImageConfig) -> None:
    """Refuse images too large to decode safely or too small to be a radiograph (before decoding)."""
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"The file declares an empty image ({width}x{height} pixels).")
    if width * height > limits.max_pixels:
        raise ImageLoadError(
            f"The image is {width}x{height} pixels ({megapixels(width * height)} megapixels), more than the limit"
            f" of {megapixels(limits.max_pixels)} megapixels (image.max_pixels); it was not decoded.")
    if min(width, height) < limits.min_side:
        raise ImageLoadError(
            f"The image is only {width}x{height} pixels: too small for a radiograph (at least"
            f" {limits.min_side} pixels on each side are needed, image.min_side).")


def megapixels(pixels: int) -> str:
    """``"81"`` for 81 million pixels, ``"0.1"`` for 100,000."""
    value = pixels / 1e6
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


# ---------------------------------------------------------------- conversion to 8 bits


def to_display_mode(image: Image.Image, notices: list[str]) -> Image.Image:
    """Return an 8-bit "L" or "RGB" image; ordinary L/RGB pixels are kept exactly as they are."""
    mode = image.mode
    if mode in ("L", "RGB"):
        output = image.copy()
    elif mode == "1":
        output = image.convert("L")
    elif mode == "P" and "transparency" not in image.info:
        output = image.convert("RGB")
        notices.append("Palette (indexed-colour) image converted to RGB.")
    elif mode in ("P", "PA", "LA", "La", "RGBA", "RGBa"):
        output = _drop_alpha(image, notices)
    elif mode == "CMYK":
        output = image.convert("RGB")
        notices.append("CMYK image converted to RGB.")
    elif mode.startswith("I") or mode == "F":
        output = _scale_grey(image, notices)
    else:  # YCbCr, LAB, HSV...
        output = image.convert("RGB")
        notices.append(f"{mode} image converted to RGB.")
    if output.mode == "RGB":
        notices.append(_colour_notice(output))
    return output


def model_ready(image: Image.Image) -> Image.Image:
    """The loader's 8-bit L/RGB image as is; any other PIL image (16-bit, palette, alpha...) converted the loader's way.

    For the Python APIs, which take PIL images: a raw 16-bit PNG would otherwise be clipped to white by
    ``convert("RGB")`` or a paste into mode L.
    """
    return image if image.mode in ("L", "RGB") else to_display_mode(image, [])


def _drop_alpha(image: Image.Image, notices: list[str]) -> Image.Image:
    """Drop a fully opaque alpha channel; composite a real one onto black (X-ray background)."""
    grey = image.mode in ("LA", "La")
    rgba = image.convert("RGBA")
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] == 255:
        notices.append("Transparency channel dropped (the image was fully opaque).")
        return image.convert("L" if grey else "RGB")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    flat = Image.alpha_composite(background, rgba).convert("RGB")
    notices.append("Transparent areas shown as black.")
    return flat.convert("L") if grey else flat


def _scale_grey(image: Image.Image, notices: list[str]) -> Image.Image:
    """16/32-bit grey -> 8 bits by the actual value range (a 15-bit image must not come out dim)."""
    values = np.asarray(image)
    lo, hi = float(values.min()), float(values.max())
    notices.append(f"{image.mode} grey values {lo:g}..{hi:g} scaled to 0..255.")
    return Image.fromarray(scale_to_uint8(values, lo, hi), mode="L")


def scale_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``lo..hi`` linearly onto 0..255 (clipping outside); a flat image becomes black."""
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = values.astype(np.float32)  # float32 is plenty for 8-bit output and halves the peak memory
    scaled -= np.float32(lo)
    scaled *= np.float32(255.0 / (hi - lo))
    np.rint(scaled, out=scaled)
    return np.clip(scaled, 0, 255, out=scaled).astype(np.uint8)


def _colour_notice(image: Image.Image) -> str:
    red, green, blue = (np.asarray(channel, dtype=np.int16) for channel in image.split())
    spread = max(np.abs(red - green).max(), np.abs(green - blue).max())
    if spread == 0:
        return "Grey image stored as RGB (all three channels are identical)."
    return ("Colour image: radiographs are grey, so this may be a photo of a film, an annotated figure"
            " or not a radiograph.")
