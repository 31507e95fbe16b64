"""What the zero-shot tab scores: each model's presets, MedKLIP's 75 entities, custom labels and findings.

Pure functions of the tab's inputs (no Gradio, no torch): the classify and map handlers build the same
request from them, so a map is always of the labels the table shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..zeroshot.entities import ALL
from ..zeroshot.entities import PRESET_TITLES as MEDKLIP_PRESET_TITLES
from ..zeroshot.prompts import PRESETS, split_labels

CUSTOM = "Custom labels"
PRESET_TITLES = {name: preset.title for name, preset in PRESETS.items()}
ALL_TITLE = "All 75 MedKLIP entities"


def is_medklip(services: Any, model: str | None) -> bool:
    """Whether ``model`` is a configured ``kind: medklip`` entry."""
    entry = services.config.zeroshot.models.get(model or "")
    return entry is not None and entry.kind == "medklip"


def preset_choices(services: Any, model: str | None) -> list[tuple[str, str] | str]:
    """(title, key) of the label sets ``model`` offers, then "Custom labels"."""
    if is_medklip(services, model):
        return [(title, key) for key, title in MEDKLIP_PRESET_TITLES.items()] + [(ALL_TITLE, ALL), CUSTOM]
    return [(title, key) for key, title in PRESET_TITLES.items()] + [CUSTOM]


def entity_choices(services: Any, model: str | None) -> list[str]:
    """MedKLIP's entity names (searchable labels in the tab), or none for the other models."""
    if not is_medklip(services, model) or model not in services.classifiers:
        return []
    return services.classifiers[model].entities


def controls(services: Any, model: str | None) -> dict[str, Any]:
    """The tab's model-dependent controls: label sets, the chosen one, MedKLIP's entities, the chart's title."""
    presets = preset_choices(services, model)
    keys = [choice[1] if isinstance(choice, tuple) else choice for choice in presets]
    configured = services.config.zeroshot.preset
    medklip = is_medklip(services, model)
    return {"presets": presets, "preset": configured if configured in keys else keys[0],
            "entities": entity_choices(services, model),
            "chart": "Probability of each label (MedKLIP: present vs absent, per label)" if medklip
            else "Probability (softmax over the labels)"}


def custom_findings(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """Labels typed in the custom box: names (comma- or line-separated) and ``name: description`` lines.

    A description makes a new finding for MedKLIP (its text becomes the query); for the CLIP models it is
    used as that label's prompt.
    """
    names: list[str] = []
    described: dict[str, list[str]] = {}
    for line in (text or "").splitlines():
        name, colon, description = line.partition(":")
        if colon and name.strip() and description.strip():
            described[name.strip()] = [description.strip()]
        else:
            names += split_labels(line)
    return list(dict.fromkeys(n for n in names if n not in described)), described


def label_request(preset: str, labels_text: str, entities: Sequence[str] = ()) -> dict[str, Any]:
    """The ``classify`` keywords for the tab's choice: a preset, all entities, or the custom labels."""
    if preset == ALL:
        return {"labels": [ALL]}
    if preset != CUSTOM:
        return {"preset": preset}
    names, described = custom_findings(labels_text)
    labels = list(dict.fromkeys([*(entities or []), *names]))
    request: dict[str, Any] = {"labels": labels} if labels else {}
    if described:
        request["prompts"] = described
    return request


def label_count(request: dict[str, Any]) -> int:
    """How many custom labels a request names (presets: not counted)."""
    return len(request.get("labels", [])) + len(request.get("prompts", {}))
