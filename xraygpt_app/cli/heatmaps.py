"""``--heatmap DIR`` of ``classify``, ``report`` and ``ask``: one PNG per image and label (or answer).

Each PNG holds the overlay on the displayed image and the raw map on the model's grid, with the
colour scale and what a map means. Maps are computed after the scores and answers, only when asked.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

from ..errors import BadInputError

MEANING_LINE = "Heatmaps: where the model's score is most sensitive; not a segmentation, not a diagnosis."


def add_heatmap_option(parser, report: bool = False) -> None:
    """--heatmap DIR (and for report/ask, --span TEXT)."""
    parser.add_argument("--heatmap", metavar="DIR", help="write explainability heatmaps (PNG: overlay + raw map)"
                        " into DIR; computed only when asked, scores and answers are unchanged")
    if report:
        parser.add_argument("--span", metavar="TEXT", help="with --heatmap: explain these words of the answer"
                            " (default: the whole answer)")
    else:
        parser.add_argument("--heatmap-method", choices=("attention", "grad-cam", "occlusion"), default=None,
                            help="with --heatmap: the model's own map (default: Grad-CAM; MedKLIP: its"
                                 " cross-attention grounding, 'attention'), Grad-CAM or the gradient-free occlusion"
                                 " map")


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe form of a label or span."""
    cleaned = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return cleaned[:limit] or "map"


def output_folder(path: str) -> Path:
    """The --heatmap folder, created; a BadInputError if it cannot be."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create the heatmap folder {folder}: {exc.strerror or exc}") from None
    return folder


def unique_stems(paths: list[str]) -> list[str]:
    """File stems, numbered when two inputs share one."""
    stems = [Path(p).stem for p in paths]
    counts, seen = Counter(stems), Counter()
    out = []
    for stem in stems:
        seen[stem] += 1
        out.append(f"{stem}-{seen[stem]}" if counts[stem] > 1 else stem)
    return out


def write_png(folder: Path, name: str, image: Image.Image, heatmap, title: str) -> Path:
    """Render one map's figure into ``folder/name``."""
    from ..explain import figure_png

    target = folder / name
    try:
        figure_png(image, heatmap, title=title, path=target)
    except OSError as exc:
        raise BadInputError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


def write_zeroshot_maps(folder_path: str, classifier, paths: list[str], images: list, request: dict,
                        method: str) -> list[Path]:
    """One PNG per image and label: ``<image stem>_<label>.png``."""
    from ..explain import zeroshot_heatmaps

    folder = output_folder(folder_path)
    written = []
    for stem, path, image in zip(unique_stems(paths), paths, images, strict=True):
        for heatmap in zeroshot_heatmaps(classifier, image, method=method, **request):
            written.append(write_png(folder, f"{stem}_{slug(heatmap.label)}.png", image, heatmap,
                                     f"{Path(path).name}: {heatmap.label}"))
    return written


def write_report_maps(folder_path: str, session, path: str, image: Image.Image, span: str | None) -> list[Path]:
    """One PNG per answer: ``<image stem>_turn<i>[_<span>].png``; turns whose answer lacks the span are skipped."""
    from ..explain import report_heatmap

    folder = output_folder(folder_path)
    stem, written = Path(path).stem, []
    for index, turn in enumerate(session.turns, start=1):
        try:
            heatmap = report_heatmap(session, image, turn=turn, span=span)
        except BadInputError as exc:
            if len(session.turns) == 1:
                raise
            print(f"turn {index}: no heatmap ({exc})", file=sys.stderr)
            continue
        name = f"{stem}_turn{index}{'_' + slug(span) if span else ''}.png"
        title = f"{Path(path).name}, answer {index}: \"{_short(heatmap.label)}\""
        written.append(write_png(folder, name, image, heatmap, title))
    if not written:
        raise BadInputError(f"{span!r} occurs in none of the answers: no heatmap written")
    return written


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())  # one line: answers can hold line breaks
    return text if len(text) <= limit else text[:limit - 3] + "..."
