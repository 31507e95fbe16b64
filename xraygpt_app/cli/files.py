"""Files the evaluation commands read and write: the images a CSV names, the output folder."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..errors import BadInputError, ImageLoadError
from ..imaging.loader import load_radiograph


def load_images(paths: list[str], config: Config) -> list:
    """Decode each radiograph; an unusable one is named in the error."""
    images = []
    for path in paths:
        try:
            images.append(load_radiograph(path, config.image).image)
        except ImageLoadError as exc:  # name the file: with many images (or CSV rows) the user must know which
            raise ImageLoadError(f"{path}: {exc}") from None
    return images


def _resolve(csv_path: Path, image: str) -> Path:
    path = Path(image).expanduser()
    return path if path.is_absolute() else csv_path.parent / path


def load_csv_images(csv_path: Path, images: list[str], config: Config) -> list:
    """The CSV's images, relative paths taken from the CSV's folder."""
    return load_images([str(_resolve(csv_path, p)) for p in images], config)


def make_folder(out: Path) -> None:
    """Create the output folder (and its parents), or say why it cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
