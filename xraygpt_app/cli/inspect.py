"""``xraygpt inspect FILE...``: does each file load, and what is it (or why not)?

Exit code 0 when every file loads, 2 otherwise. Never a traceback for a bad file.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..config import ImageConfig, load_config
from ..errors import ImageLoadError
from ..imaging.loader import ImageInfo, Radiograph, load_radiograph
from .options import add_config_options

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` command."""
    parser = subparsers.add_parser(
        "inspect", help="check that radiograph files load and describe them (PNG, JPEG, DICOM...)",
        description="For each file: whether it loads as a radiograph, what was read (format, size, bit depth,"
                    " photometric interpretation; for DICOM modality, view and body part), or why not."
                    " Exit code 0 when all files load, 2 otherwise.")
    parser.add_argument("files", nargs="+", metavar="FILE", help="image or DICOM files")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    parser.add_argument("--save-preview", metavar="DIR", default=None,
                        help="write the normalised 8-bit image the models see as DIR/<file name>.png")
    add_config_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Inspect every file; print a report; return the exit code."""
    limits = load_config(args.config, args.overrides).image
    preview_dir = Path(args.save_preview) if args.save_preview else None
    results = [inspect_file(name, limits, preview_dir) for name in args.files]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(format_result(result))
        loaded = sum(result["ok"] for result in results)
        print(f"{loaded} of {len(results)} file(s) loaded.")
    return 0 if all(result["ok"] for result in results) else 2


def inspect_file(name: str, limits: ImageConfig, preview_dir: Path | None) -> dict:
    """Load one file; return {"file", "ok", "info" | "error", optionally "preview"}."""
    try:
        radiograph = load_radiograph(name, limits)
    except ImageLoadError as exc:
        return {"file": name, "ok": False, "error": str(exc)}
    except Exception as exc:  # a bug in a decoder or in our code: report it, keep going
        logger.debug("unexpected failure: %s", type(exc).__name__)  # no message: it may quote file content
        return {"file": name, "ok": False, "error": f"Unexpected error while reading ({type(exc).__name__});"
                                                    " please report this as a bug."}
    result = {"file": name, "ok": True, "info": radiograph.info.to_dict()}
    if preview_dir is not None:
        try:
            result["preview"] = str(save_preview(radiograph, name, preview_dir))
        except OSError as exc:
            result.update(ok=False, error=f"Loaded, but the preview could not be written ({exc.strerror or exc}).")
    return result


def save_preview(radiograph: Radiograph, name: str, preview_dir: Path) -> Path:
    """Write the model-ready 8-bit image as a PNG named after the input, never overwriting."""
    preview_dir.mkdir(parents=True, exist_ok=True)
    target = preview_dir / f"{Path(name).name}.png"
    counter = 2
    while target.exists():
        target = preview_dir / f"{Path(name).name}.{counter}.png"
        counter += 1
    radiograph.image.save(target, format="PNG")
    return target


def format_result(result: dict) -> str:
    """One readable block per file."""
    if not result["ok"]:
        return f"FAIL  {result['file']}\n      {result['error']}"
    lines = [f"OK    {result['file']}", f"      {describe(ImageInfo(**_info_args(result['info'])))}"]
    lines += [f"      note: {notice}" for notice in result["info"]["notices"]]
    if "preview" in result:
        lines.append(f"      preview: {result['preview']}")
    return "\n".join(lines)


def describe(info: ImageInfo) -> str:
    """A one-line summary such as ``DICOM 1841x1955, 15-bit MONOCHROME1, CR PA CHEST``."""
    text = f"{info.format} {info.width}x{info.height}, {info.bit_depth}-bit {info.photometric}"
    if info.frames > 1:
        text += f", {info.frames} frames"
    dicom = " ".join(value for value in (info.modality, info.view_position, info.body_part) if value)
    if dicom:
        text += f", {dicom}"
    if info.transfer_syntax:
        text += f" ({info.transfer_syntax})"
    return text


def _info_args(data: dict) -> dict:
    return {**data, "notices": tuple(data["notices"])}

