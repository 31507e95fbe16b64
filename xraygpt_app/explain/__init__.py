"""Explainability heatmaps: where on the radiograph a zero-shot score or some words of an answer come from.

Maps are computed only when asked for, by separate forward/backward passes: scores and generated
tokens are never changed. Every map is carried back through its model's exact preprocessing onto
the 8-bit image the user saw. A map shows where the model's score is most sensitive; it is not a
segmentation and not a diagnosis.

>>> from xraygpt_app.explain import zeroshot_heatmaps, report_heatmap, overlay
>>> maps = zeroshot_heatmaps(classifier, image, preset="chexpert5")  # one Heatmap per label
>>> maps[0].grid, maps[0].image_map                                  # numpy arrays
>>> heatmap = report_heatmap(session, image, turn=-1, span="effusion")
"""

from __future__ import annotations

from .geometry import InputGeometry
from .maps import MEANING, Heatmap
from .medklip_maps import medklip_heatmaps
from .render import SCALE_TEXT, figure_png, overlay
from .report_maps import report_heatmap
from .zeroshot_maps import encoder_heatmaps

__all__ = ["Heatmap", "InputGeometry", "MEANING", "SCALE_TEXT", "figure_png", "overlay", "report_heatmap",
           "zeroshot_heatmaps"]


def zeroshot_heatmaps(classifier, image, **request) -> list[Heatmap]:
    """One map per label (or per label in ``only``) of ``image``, for the label source ``classify`` takes.

    Each model's own method by default: MedKLIP's cross-attention grounding, Grad-CAM for MedCLIP and
    BiomedCLIP; ``method="grad-cam"`` or ``"occlusion"`` asks for another (MedKLIP: to compare).
    """
    if getattr(classifier, "kind", None) == "medklip":  # MedCLIP/BiomedCLIP classifiers have no kind
        return medklip_heatmaps(classifier, image, **request)
    return encoder_heatmaps(classifier, image, **request)
