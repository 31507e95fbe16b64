"""Handlers of the stateless API endpoints (``report``, ``ask``, ``classify``; also MCP tools).

One call, one image: nothing is kept between calls. Like the UI handlers, these are plain
functions over bytes and the service objects, testable without Gradio.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from PIL import Image

from ..errors import XrayGPTError
from ..families import DEFAULT_REPORT_QUESTION
from .handlers import family_title, parse_labels
from .services import Services

logger = logging.getLogger(__name__)

def _api_image(data: bytes, services: Services) -> Image.Image:
    from ..imaging.loader import load_radiograph

    return load_radiograph(data, services.config.image).image


def api_answer(services: Services, data: bytes, question: str, settings: dict[str, Any]) -> str:
    """Answer one question about an image (report or VQA); raises XrayGPTError for bad input."""
    if services.assistant is None:
        raise XrayGPTError(services.assistant_missing or f"{family_title(services)} is not loaded.")
    began = time.perf_counter()
    turn = services.assistant.chat(_api_image(data, services)).ask(question or DEFAULT_REPORT_QUESTION, **settings)
    logger.info("api answer: %d bytes in, %d tokens in %.2f s", len(data), len(turn.token_ids),
                time.perf_counter() - began)
    return turn.answer


def api_classify(services: Services, data: bytes, model: str, preset: str, labels: str,
                 heatmaps: bool = False) -> dict[str, Any]:
    """Zero-shot scores of one image as a plain dict (the core's ZeroShotResult.to_dict()); with ``heatmaps``
    also one map per label (``explain``'s Heatmap.to_dict() plus a small overlay PNG as a data URL)."""
    try:
        classifier = services.classifier(model)
    except KeyError as exc:
        raise XrayGPTError(str(exc.args[0])) from None
    names = parse_labels(labels) or None
    image = _api_image(data, services)
    result = classifier.classify([image], labels=names, preset=None if names else preset)[0].to_dict()
    if heatmaps:  # after the scores, which maps never change
        from .maps import api_heatmaps

        result["heatmaps"] = api_heatmaps(classifier, image, names, None if names else preset)
    return result
