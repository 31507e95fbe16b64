"""Prompt sets for zero-shot classification: MedCLIP's generators as data, custom labels and YAML files.

A prompt set is an ordered mapping ``label -> list of prompts``; a class score is the ensemble
(mean, or max) of the image-prompt logits over that label's prompts.

The word lists below are MedCLIP's (``medclip/constants.py``: CheXpert from GLoRIA, COVID, RSNA).
Each class lists its parts in the order MedCLIP's generator nests them (it walks the dict keys in
insertion order: Pleural Effusion is severity x *location* x subtype). Typos ("apperance",
"presistent", "uppper") and the duplicated effusion subtype are kept because they change numbers.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import BadInputError

PromptSet = dict[str, list[str]]

_ATELECTASIS_LOCATIONS = [
    "at the mid lung zone", "at the upper lung zone", "at the right lung zone", "at the left lung zone",
    "at the lung bases", "at the right lung base", "at the left lung base", "at the bilateral lung bases",
    "at the left lower lobe", "at the right lower lobe",
]

# label -> parts (in generator order); each part is a list of alternatives.
CHEXPERT_CLASS_PARTS: dict[str, list[list[str]]] = {
    "Atelectasis": [
        ["", "mild", "minimal"],
        ["subsegmental atelectasis", "linear atelectasis", "trace atelectasis", "bibasilar atelectasis",
         "retrocardiac atelectasis", "bandlike atelectasis", "residual atelectasis"],
        _ATELECTASIS_LOCATIONS,
    ],
    "Cardiomegaly": [
        [""],
        ["cardiac silhouette size is upper limits of normal", "cardiomegaly which is unchanged",
         "mildly prominent cardiac silhouette", "portable view of the chest demonstrates stable cardiomegaly",
         "portable view of the chest demonstrates mild cardiomegaly", "persistent severe cardiomegaly",
         "heart size is borderline enlarged", "cardiomegaly unchanged", "heart size is at the upper limits of normal",
         "redemonstration of cardiomegaly",
         "ap erect chest radiograph demonstrates the heart size is the upper limits of normal",
         "cardiac silhouette size is mildly enlarged",
         "mildly enlarged cardiac silhouette, likely left ventricular enlargement. other chambers are less prominent",
         "heart size remains at mildly enlarged", "persistent cardiomegaly with prominent upper lobe vessels"],
        [""],
    ],
    "Consolidation": [
        ["", "increased", "improved", "apperance of"],
        ["bilateral consolidation", "reticular consolidation", "retrocardiac consolidation", "patchy consolidation",
         "airspace consolidation", "partial consolidation"],
        ["at the lower lung zone", "at the upper lung zone", "at the left lower lobe", "at the right lower lobe",
         "at the left upper lobe", "at the right uppper lobe", "at the right lung base", "at the left lung base"],
    ],
    "Edema": [
        ["", "mild", "improvement in", "presistent", "moderate", "decreased"],
        ["pulmonary edema", "trace interstitial edema", "pulmonary interstitial edema"],
        [""],
    ],
    "Pleural Effusion": [
        ["", "small", "stable", "large", "decreased", "increased"],
        ["left", "right", "tiny"],
        ["bilateral pleural effusion", "subpulmonic pleural effusion", "bilateral pleural effusion"],
    ],
}

COVID_CLASS_PARTS: dict[str, list[list[str]]] = {
    "COVID": [["patchy", "confluent"], ["ground glass"], ["opacity", "consolidation"],
              ["in peripheral", "in mid", "in lower"]],
}

RSNA_CLASS_PARTS: dict[str, list[list[str]]] = {
    "Pneumonia": [
        ["round", "early", "focal", "multifocal", "small", ""],
        ["bacterial", "viral", "mycoplasma", ""],
        _ATELECTASIS_LOCATIONS + ["at the left middle lobe", "at the right middle lobe", ""],
    ],
}

# MedCLIP publishes prompts only for the positive class of its binary tasks (it scores them with a
# sigmoid). To rank "which of these" we add a short list of normal-study phrases of our own.
NORMAL_PROMPTS = [
    "no acute cardiopulmonary abnormality",
    "normal chest radiograph",
    "the lungs are clear",
    "no focal consolidation, pleural effusion or pneumothorax",
]

DEFAULT_TEMPLATE = "chest x-ray showing {}"


def combine_parts(parts: Sequence[Sequence[str]]) -> list[str]:
    """Every combination of the parts joined by single spaces, in MedCLIP's nested order.

    Empty parts leave stray spaces, exactly as MedCLIP's f-strings do.
    """
    return [" ".join(combo) for combo in itertools.product(*parts)]


def generate_prompts(class_parts: Mapping[str, Sequence[Sequence[str]]], n: int | None = None,
                     rng: random.Random | None = None) -> PromptSet:
    """All prompts per class, or ``n`` sampled per class when ``n`` is below that class's total.

    Sampling uses ``rng.sample`` (MedCLIP uses the global ``random`` module, i.e. the same algorithm:
    ``random.Random(seed)`` gives a reproducible draw).
    """
    rng = rng or random.Random(0)
    prompts: PromptSet = {}
    for label, parts in class_parts.items():
        every = combine_parts(parts)
        prompts[label] = rng.sample(every, n) if n is not None and n < len(every) else every
    return prompts


def chexpert_prompts(n: int | None = None, seed: int = 42) -> PromptSet:
    """MedCLIP's CheXpert-5 prompts (210, 15, 192, 18, 54 per class when ``n`` is None)."""
    return generate_prompts(CHEXPERT_CLASS_PARTS, n, random.Random(seed))


def covid_prompts(n: int | None = None, seed: int = 42) -> PromptSet:
    """Normal vs COVID: our normal phrases plus MedCLIP's COVID prompts."""
    return {"Normal": list(NORMAL_PROMPTS), **generate_prompts(COVID_CLASS_PARTS, n, random.Random(seed))}


def rsna_prompts(n: int | None = None, seed: int = 42) -> PromptSet:
    """Normal vs Pneumonia: our normal phrases plus MedCLIP's RSNA pneumonia prompts."""
    return {"Normal": list(NORMAL_PROMPTS), **generate_prompts(RSNA_CLASS_PARTS, n, random.Random(seed))}


@dataclass(frozen=True)
class Preset:
    """A named prompt set: its display title, labels and a builder ``(n, seed) -> PromptSet``."""

    title: str  # as the web app lists it
    description: str
    labels: tuple[str, ...]
    build: Callable[[int | None, int], PromptSet]


# The one registry of presets (classifier, CLI choices, web app titles); pure Python, so the CLI and the
# UI handlers list them without torch.
PRESETS: dict[str, Preset] = {
    "chexpert5": Preset("CheXpert-5", "CheXpert competition tasks with MedCLIP's prompt generator",
                        ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"),
                        chexpert_prompts),
    "covid": Preset("COVID", "Normal vs COVID (MedCLIP's COVID prompts)", ("Normal", "COVID"), covid_prompts),
    "rsna": Preset("RSNA pneumonia", "Normal vs pneumonia (MedCLIP's RSNA prompts)", ("Normal", "Pneumonia"),
                   rsna_prompts),
}


def split_labels(text: str) -> list[str]:
    """Split a comma-separated label list, dropping blanks and duplicates (order kept); may be empty."""
    return list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def parse_labels(text: str) -> list[str]:
    """Split a comma-separated label list, dropping blanks and duplicates (order kept); BadInputError if none."""
    labels = split_labels(text)
    if not labels:
        raise BadInputError("no labels given: pass a comma-separated list such as 'edema,cardiomegaly'")
    return labels


def template_prompts(labels: Sequence[str], templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> PromptSet:
    """One prompt per (label, template); each template holds one ``{}`` for the label."""
    for template in templates:
        if template.count("{}") != 1:
            raise BadInputError(f"prompt template {template!r} must contain exactly one '{{}}'")
        try:
            template.format("")
        except (KeyError, IndexError, ValueError):  # other fields or stray braces, e.g. "{} at {site}"
            raise BadInputError(f"prompt template {template!r} may hold no braces other than one '{{}}'"
                                " (write '{{' and '}}' for literal braces)") from None
    return {label: [template.format(label) for template in templates] for label in labels}


def load_prompt_file(path: str | Path) -> PromptSet:
    """Per-label prompt lists from a YAML mapping ``label: [prompt, ...]`` (a single string is allowed)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise BadInputError(f"cannot read prompt file {path}: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise BadInputError(f"{path}: expected a mapping of label -> list of prompts")
    prompts: PromptSet = {}
    for label, value in data.items():
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(p, str) and p for p in items):
            raise BadInputError(f"{path}: label {label!r} needs a non-empty list of prompt strings")
        prompts[str(label)] = list(items)
    return prompts
