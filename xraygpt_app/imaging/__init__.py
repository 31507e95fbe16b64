"""Radiograph input: PNG/JPEG/TIFF/BMP/WebP and DICOM decoded in memory into an 8-bit image."""

from .loader import load_radiograph
from .radiograph import ImageInfo, Radiograph

__all__ = ["ImageInfo", "Radiograph", "load_radiograph"]
