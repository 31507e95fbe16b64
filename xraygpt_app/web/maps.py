"""Handlers of the explainability maps in the web app (zero-shot "Show map", chat "Where did it look?").

Plain functions over the session state and the service objects, like ``handlers``: the model logic
is in :mod:`xraygpt_app.explain`. The overlay goes to the page as a data URL (never a file), scaled
down for display; the map itself stays with the session so the opacity slider only re-blends it.
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Sequence
from typing import Any

from PIL import Image

from ..errors import XrayGPTError
from .display import png_data_url
from .handlers import NO_IMAGE, UserState, notice
from .labels import label_request
from .services import Services

logger = logging.getLogger(__name__)
DISPLAY_SIDE = 768  # the overlay shown in the page; the map is computed on the full image
# matplotlib's inferno at 0, 0.2, ..., 1: the overlay's colour scale as a CSS gradient
INFERNO = ("#000004", "#420a68", "#932667", "#dd513a", "#fca50a", "#fcffa4")
MapOutput = tuple[str, Any, str]  # overlay HTML, the Heatmap kept in gr.State (slim: no full-size map), notice


SENSITIVITY_ENDS = ("0: the score does not rise there", "1: most sensitive")
ATTENTION_ENDS = ("0: no attention", "1: the most attended cell")  # MedKLIP's grounding maps


def scale_html(ends: tuple[str, str] = SENSITIVITY_ENDS) -> str:
    """The colour scale, explained in words next to a gradient bar."""
    gradient = ", ".join(INFERNO)
    return (f'<div class="xr-scale"><span>{ends[0]}</span>'
            f'<span class="xr-scale-bar" style="background: linear-gradient(to right, {gradient})"></span>'
            f'<span>{ends[1]}</span></div>'
            '<div class="xr-scale-note">Hatched grey: not seen by the model (cropped away by its preprocessing).'
            '</div>')


def map_html(image: Image.Image, heatmap: Any, opacity: float) -> str:
    """The overlay of ``heatmap`` on ``image`` with its caption, colour scale and plain-words meaning."""
    from ..explain import overlay

    shown = overlay(image, heatmap, opacity)
    shown.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
    caption = (f"<b>{html.escape(heatmap.label[:200])}</b> — {html.escape(heatmap.model)}, "
               f"{html.escape(heatmap.method)}; explained score {heatmap.target:.3f}")
    if not heatmap.grid.any():
        caption += ". No region raises this score: the map is empty."
    return (f'<figure class="xr-map"><img alt="Heatmap overlay" src="{png_data_url(shown)}" '
            f'style="max-width:100%"><figcaption>{caption}</figcaption></figure>{scale_html(_ends(heatmap))}'
            f'<p class="xr-map-meaning"><b>{html.escape(_sentence(heatmap.meaning))}</b></p>')


def _ends(heatmap: Any) -> tuple[str, str]:
    return ATTENTION_ENDS if "attention" in heatmap.scale else SENSITIVITY_ENDS


def _sentence(text: str) -> str:
    return f"{text[:1].upper()}{text[1:]}."


def restyle(state: UserState | None, heatmap: Any, opacity: float) -> str:
    """The same map at another opacity (no model call)."""
    if heatmap is None or state is None or state.image is None:
        return ""
    try:
        return map_html(state.image, heatmap, opacity)
    except XrayGPTError:  # the image changed under the map
        return ""


def zeroshot_map(state: UserState | None, services: Services, model: str, preset: str, labels_text: str,
                 label: str | None, opacity: float, entities: Sequence[str] = (), method: str | None = None
                 ) -> MapOutput:
    """One label's map for the session's image: the model's own (Grad-CAM of the ensemble logit; MedKLIP: its
    cross-attention grounding), or ``method`` ("grad-cam") to compare."""
    from ..explain import zeroshot_heatmaps

    if state is None or state.image is None:
        return "", None, notice(NO_IMAGE)
    if not label:
        return "", None, notice("Classify first, then pick a label to map.")
    try:
        classifier = services.classifier(model)
    except KeyError as exc:
        return "", None, notice(str(exc.args[0]))
    began = time.perf_counter()
    try:
        (heatmap,) = zeroshot_heatmaps(classifier, state.image, only=[label], method=method,
                                       **label_request(preset, labels_text, entities))
    except XrayGPTError as exc:
        return "", None, notice(str(exc))
    logger.info("zero-shot map (%s) in %.2f s", model, time.perf_counter() - began)
    return map_html(state.image, heatmap, opacity), heatmap.slim(), ""


def report_map(state: UserState | None, services: Services, answer: float | None, span: str,
               opacity: float) -> MapOutput:
    """Where the model looked for ``span`` (or the whole answer) in answer number ``answer`` (0: the last)."""
    from ..explain import report_heatmap

    if state is None or state.image is None:
        return "", None, notice(NO_IMAGE)
    session = state.session
    if session is None or not session.turns:
        return "", None, notice("Generate a report or ask a question first.")
    number = int(answer or 0)
    if not 0 <= number <= len(session.turns):
        return "", None, notice(f"There are {len(session.turns)} answers; pick 1 to {len(session.turns)}, or 0 for"
                                " the last.")
    began = time.perf_counter()
    try:
        heatmap = report_heatmap(session, state.image, turn=number - 1 if number else -1, span=span or None)
    except XrayGPTError as exc:
        return "", None, notice(str(exc))
    logger.info("report map in %.2f s", time.perf_counter() - began)
    return map_html(state.image, heatmap, opacity), heatmap.slim(), ""


def vqa_map(state: UserState | None, services: Services, span: str, opacity: float) -> MapOutput:
    """Where the model looked for ``span`` (or the whole answer) in the last VQA answer."""
    from ..explain.report_maps import turn_heatmap

    if state is None or state.image is None:
        return "", None, notice(NO_IMAGE)
    if state.vqa_turn is None or services.assistant is None:
        return "", None, notice("Answer a question first.")
    try:
        heatmap = turn_heatmap(services.assistant.model, state.image, state.vqa_turn, span=span or None)
    except XrayGPTError as exc:
        return "", None, notice(str(exc))
    return map_html(state.image, heatmap, opacity), heatmap.slim(), ""


def api_heatmaps(classifier: Any, image: Image.Image, labels: list[str] | None, preset: str | None) -> list[dict]:
    """Every label's map for the ``classify`` endpoint: the grid, its meaning and a small overlay PNG."""
    from ..explain import overlay, zeroshot_heatmaps

    out = []
    for heatmap in zeroshot_heatmaps(classifier, image, labels=labels, preset=preset):
        shown = overlay(image, heatmap, 0.5)
        shown.thumbnail((512, 512))
        out.append({**heatmap.to_dict(), "overlay_png": png_data_url(shown)})
    return out
