"""MedKLIP as a zero-shot classifier: per-entity probabilities, presets, custom findings and grounding maps.

A MedKLIP "prompt set" maps each label to one description: an entity's own description from
``observation explanation.json``, or the user's text for a custom finding, which becomes a new query
through the same BERT (MedKLIP's zero-shot to unseen entities). Unlike the CLIP models there is no
softmax across labels: each label gets its own present/absent softmax, reported as ``probabilities``.
"""

from __future__ import annotations

import difflib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image

from ..config import Config
from ..errors import BadInputError
from ..imaging.loader import model_ready
from ..placement import runtime_device
from ..weights import default_cache_dir, resolve_weights
from .entities import ALL, ENTITIES, PRESETS, entity_for
from .medklip import GROUNDING_LAYERS, MedKLIP, MedKLIPOutput, build_medklip, medklip_preprocess
from .medklip_text import DescriptionEncoder, cache_key, entity_queries, read_descriptions, text_folder

log = logging.getLogger(__name__)
PromptSet = dict[str, list[str]]
PROBABILITY_MEANING = "positive-class probability per label (softmax over MedKLIP's present/absent logits)"
GROUNDING_METHOD = f"MedKLIP cross-attention (mean of the last {GROUNDING_LAYERS} decoder layers)"


@dataclass
class EntityResult:
    """Scores of one image, in label order; ``logits`` are log-odds (present minus absent logit)."""

    labels: list[str]
    logits: list[float]
    probabilities: list[float]  # positive-class probability of each label on its own (not a softmax across)
    predicted: str
    grounding: dict[str, list[list[float]]] = field(default_factory=dict)  # label -> raw h x w attention map
    across_labels: ClassVar[bool] = False  # each label has its own present/absent softmax

    @property
    def scores(self) -> list[float]:
        """sigmoid(log-odds): the positive-class probability again, the per-label score the CLIP models give."""
        return self.probabilities

    def to_dict(self) -> dict:
        """JSON-ready: ``probabilities`` and ``logits`` as label -> value, ``grounding`` when asked for."""
        data = {"labels": list(self.labels), "probabilities": dict(zip(self.labels, self.probabilities, strict=True)),
                "logits": dict(zip(self.labels, self.logits, strict=True)), "predicted": self.predicted,
                "probability": PROBABILITY_MEANING}
        if self.grounding:
            data["grounding"] = self.grounding
        return data


class MedKLIPClassifier:
    """MedKLIP's scores for any labels: entities, presets, or custom findings with a description."""

    kind = "medklip"
    ensemble = "none"  # recorded by evaluate; MedKLIP has one query per label, nothing to ensemble

    def __init__(self, model: MedKLIP, descriptions: dict[str, str], encoder: DescriptionEncoder,
                 queries: torch.Tensor, name: str = "medklip", *, device: str = "cpu", batch_size: int = 16,
                 preset: str = "chexpert5") -> None:
        self.model, self.encoder, self.name = model.to(device), encoder, name
        self.device, self.batch_size = device, batch_size
        self.default_preset = preset if preset in PRESETS else ALL
        self.descriptions = descriptions  # entity -> description, MedKLIP's order
        # description text -> query; the entities' are precomputed, custom ones added on first use
        self._queries = dict(zip(descriptions.values(), queries, strict=True))
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config, name: str) -> MedKLIPClassifier:
        """Load the named ``kind: medklip`` model; MissingWeightsError names any absent file."""
        weights, descriptions_path, folder = medklip_files(config, name)
        started = time.perf_counter()
        model = build_medklip(weights)
        descriptions = entity_descriptions(descriptions_path)
        encoder = DescriptionEncoder(folder)
        cache = Path(config.weights.cache_dir).expanduser() if config.weights.cache_dir else default_cache_dir()
        queries = entity_queries(descriptions, encoder, cache_key(descriptions_path, folder), cache)
        if queries.shape[1] != model.sizes.text_dim:
            raise BadInputError(f"the BERT in {folder} gives {queries.shape[1]}-wide states; this MedKLIP "
                                f"checkpoint takes {model.sizes.text_dim}")
        log.info("MedKLIP ready in %.1f s", time.perf_counter() - started)
        zs = config.zeroshot
        device = str(runtime_device(config.runtime))
        return cls(model, descriptions, encoder, queries, name, device=device, batch_size=zs.batch_size,
                   preset=zs.preset)

    @property
    def entities(self) -> list[str]:
        """The entity names, in MedKLIP's order."""
        return list(self.descriptions)

    def prompt_set(self, labels: Sequence[str] | None = None, preset: str | None = None,
                   prompts: PromptSet | None = None) -> PromptSet:
        """label -> [description]: entity names (or ``all``), a preset, or custom findings with descriptions.

        ``labels`` and ``prompts`` may come together (the web app's entities plus typed findings).
        """
        if preset is not None and (labels is not None or prompts is not None):
            raise BadInputError("give labels and findings, or a preset, not both")
        if labels is not None or prompts is not None:
            if not labels and not prompts:
                raise BadInputError("the label list is empty")
            found = self._entities(labels or [])
            found.update({label: [self._one_description(label, texts)] for label, texts in (prompts or {}).items()})
            return found
        name = preset or self.default_preset
        if name == ALL:
            return {entity: [text] for entity, text in self.descriptions.items()}
        if name not in PRESETS:
            raise BadInputError(f"MedKLIP has no preset {name!r} (its presets: {', '.join(PRESETS)}; or labels)")
        return {label: [self.descriptions[entity]] for label, entity in PRESETS[name].items()}

    def _entities(self, labels: Sequence[str]) -> PromptSet:
        if [label.lower() for label in labels] == [ALL]:
            return {entity: [text] for entity, text in self.descriptions.items()}
        return {label: [self.descriptions[self._entity(label)]] for label in labels}

    def _entity(self, label: str) -> str:
        entity = entity_for(label)
        if entity is None or entity not in self.descriptions:
            close = difflib.get_close_matches(label.lower(), self.entities, n=3)
            hint = f" Close entities: {', '.join(close)}." if close else ""
            raise BadInputError(f"{label!r} is not one of MedKLIP's {len(self.descriptions)} entities and has no "
                                f"description. Give it one (CLI: --prompts FILE.yaml with the line "
                                f"'{label}: <what it looks like on a radiograph>'), or pick an entity.{hint}")
        return entity

    @staticmethod
    def _one_description(label: str, texts: Sequence[str]) -> str:
        if len(texts) != 1 or not texts[0].strip():
            raise BadInputError(f"MedKLIP takes one description per finding; {label!r} has {len(texts)}")
        return texts[0]

    def query_matrix(self, prompt_set: PromptSet) -> torch.Tensor:
        """(C, hidden) queries of the prompt set; new descriptions go through BERT once, then stay cached."""
        texts = [texts[0] for texts in prompt_set.values()]
        with self._lock:
            new = [t for t in dict.fromkeys(texts) if t not in self._queries]
            if new:
                self._queries.update(zip(new, self.encoder(new), strict=True))
                log.info("MedKLIP: %d new finding queries", len(new))
            return torch.stack([self._queries[t] for t in texts])

    def query_plan(self, prompt_set: PromptSet) -> tuple[list[int | None], torch.Tensor, torch.Tensor]:
        """Per label, its entity's index (None: a custom finding); the entity queries; the custom queries."""
        index = {text: i for i, text in enumerate(self.descriptions.values())}
        slots = [index.get(texts[0]) for texts in prompt_set.values()]
        entities = self.query_matrix({e: [t] for e, t in self.descriptions.items()})
        custom = {label: texts for (label, texts), slot in zip(prompt_set.items(), slots, strict=True) if slot is None}
        extra = self.query_matrix(custom) if custom else entities[:0]
        return slots, entities, extra

    def decode_labels(self, memory: torch.Tensor, slots: list[int | None], entities: torch.Tensor,
                extra: torch.Tensor) -> MedKLIPOutput:
        """Scores of every label: entities from one pass over all of MedKLIP's queries (its own numbers); each
        custom finding as one more query beside them, in a pass of its own (so findings do not sway each other)."""
        base = self.model.decode(memory, entities)
        added = [self.model.decode(memory, torch.cat([entities, query[None]])) for query in extra]
        logits, attentions, k = [], [[] for _ in base.attentions], 0
        for slot in slots:
            source, column = (base, slot) if slot is not None else (added[k], len(entities))
            k += slot is None
            logits.append(source.logits[:, column])
            for layer, maps in zip(source.attentions, attentions, strict=True):
                maps.append(layer[:, column])
        return MedKLIPOutput(torch.stack(logits, dim=1), [torch.stack(m, dim=1) for m in attentions])

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, 3, 224, 224) after MedKLIP's test transform."""
        return torch.stack([medklip_preprocess(model_ready(image)) for image in images])

    @torch.no_grad()
    def outputs(self, images: Sequence[Image.Image], prompt_set: PromptSet) -> MedKLIPOutput:
        """Logits and attention maps of every image for the prompt set, ``batch_size`` images at a time."""
        if not images:
            raise BadInputError("no images to classify")
        slots, entities, extra = self.query_plan(prompt_set)
        entities, extra = entities.to(self.device), extra.to(self.device)
        started, parts = time.perf_counter(), []
        for start in range(0, len(images), self.batch_size):
            pixels = self.pixel_values(images[start:start + self.batch_size]).to(self.device)
            parts.append(self.decode_labels(self.model.image_tokens(pixels), slots, entities, extra))
        log.info("MedKLIP scored %d images in %.2f s", len(images), time.perf_counter() - started)
        layers = range(len(parts[0].attentions))
        return MedKLIPOutput(torch.cat([p.logits for p in parts]).cpu(),
                             [torch.cat([p.attentions[i] for p in parts]).cpu() for i in layers])

    def logits(self, images: Sequence[Image.Image], prompt_set: PromptSet) -> torch.Tensor:
        """(N, C) log-odds; sigmoid gives the positive-class probability (what evaluation ranks for AUC)."""
        logits = self.outputs(images, prompt_set).logits
        return logits[..., 1] - logits[..., 0]

    def classify(self, images: Sequence[Image.Image], labels: Sequence[str] | None = None, preset: str | None = None,
                 prompts: PromptSet | None = None, grounding: Sequence[str] = ()) -> list[EntityResult]:
        """One result per image; ``grounding`` names labels whose raw attention maps the results carry."""
        prompt_set = self.prompt_set(labels, preset, prompts)
        names = list(prompt_set)
        missing = [g for g in grounding if g not in names]
        if missing:
            raise BadInputError(f"--grounding names labels that are not scored: {', '.join(missing)}")
        out = self.outputs(images, prompt_set)
        log_odds, probabilities = out.logits[..., 1] - out.logits[..., 0], out.probabilities()
        maps = out.grounding() if grounding else None
        results = []
        for row in range(len(images)):
            probs = probabilities[row].tolist()
            ground = {g: maps[row, names.index(g)].tolist() for g in grounding} if maps is not None else {}
            results.append(EntityResult(names, log_odds[row].tolist(), probs, names[max(range(len(probs)),
                                        key=probs.__getitem__)], ground))
        return results


def entity_descriptions(path: Path) -> dict[str, str]:
    """MedKLIP's entity -> description: the JSON's texts in order, named by MedKLIP's entity list."""
    texts = list(read_descriptions(path).values())
    if len(texts) != len(ENTITIES):
        raise BadInputError(f"{path.name} holds {len(texts)} descriptions; MedKLIP's has one for each of its "
                            f"{len(ENTITIES)} entities")
    return dict(zip(ENTITIES, texts, strict=True))


def medklip_files(config: Config, name: str) -> tuple[Path, Path, Path]:
    """(checkpoint, descriptions JSON, BERT folder) of a medklip entry; MissingWeightsError for the first absent."""
    model = config.zeroshot.models[name]
    cache = config.weights.cache_dir
    weights = resolve_weights(model.weights, f"zeroshot.models.{name}.weights", cache_dir=cache)
    descriptions = resolve_weights(model.entity_descriptions, f"zeroshot.models.{name}.entity_descriptions",
                                   cache_dir=cache)
    return weights, descriptions, text_folder(model.text_config or "")
