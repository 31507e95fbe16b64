"""What the image panel shows: the preview, the loader's description and the loaded file's name.

Everything is built in memory as HTML or Markdown text (data URLs, never files), and anything
that comes from the user's file (DICOM header fields, the file name) is escaped first.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Callable
from typing import Any

from PIL import Image

PREVIEW_SIDE = 512  # display copy only; the model gets the loader's full image


InputView = Callable[[Image.Image], tuple[Image.Image, str]]  # the model's input image, how it was made


def png_data_url(image: Image.Image) -> str:
    """The image as an inline PNG data URL: shown in the page, never written to disk."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def preview_html(image: Image.Image, model_size: int = 224, input_view: InputView | None = None) -> str:
    """The normalised 8-bit image the model gets, and its model-input shape, as in-memory HTML.

    ``input_view``: the loaded model's own view of the image and how it was made (its family's
    preprocessing); without a model, XrayGPT's square resize to ``model_size``. Data URLs keep the
    preview off the disk (a gr.Image output would be written to the cache).
    """
    display = image.copy()
    display.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    if input_view is None:
        model_view = image.convert("RGB").resize((model_size, model_size), Image.Resampling.BICUBIC)
        how = f"resized to {model_size}×{model_size} (aspect ratio not kept)"
    else:
        model_view, how = input_view(image)
    return (
        '<div class="xr-preview">'
        f'<figure><img alt="Normalised radiograph" src="{png_data_url(display)}"'
        ' style="max-width:100%;max-height:420px">'
        f"<figcaption>What the model gets: the decoded 8-bit image ({image.width}×{image.height})."
        "</figcaption></figure>"
        f'<figure><img alt="Model input" src="{png_data_url(model_view)}" width="{model_view.width // 2}">'
        f"<figcaption>Model input: {how}."
        "</figcaption></figure></div>"
    )


def describe_image(info: dict[str, Any]) -> str:
    """The loader's non-identifying description as a Markdown list."""
    rows = [("Format", info.get("format")), ("Size", f"{info.get('width')} × {info.get('height')} px"),
            ("Bit depth", info.get("bit_depth")), ("Photometric", info.get("photometric")),
            ("Frames", info.get("frames")), ("Modality", info.get("modality")),
            ("View", info.get("view_position")), ("Body part", info.get("body_part"))]
    lines = [f"- **{name}:** {md_text(value)}" for name, value in rows if value not in (None, "", [])]
    lines += [f"- ℹ️ {md_text(text)}" for text in info.get("notices") or []]
    return "\n".join(lines)


def md_text(value: Any) -> str:
    """``value`` as literal Markdown text: DICOM header fields come from the file, so they must not
    become links, images (a request to any host) or HTML in the page."""
    return re.sub(r"([\\`*_\[\]<>!|~$#])", r"\\\1", str(value))


def loaded_file_html(name: str) -> str:
    """The name of the file whose image is loaded (user data: escaped, kept in the session only)."""
    if not name:
        return ""
    return f'<div class="xr-loaded">Loaded: <strong>{html.escape(name)}</strong></div>'
