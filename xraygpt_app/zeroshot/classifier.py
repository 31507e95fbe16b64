"""Zero-shot classification of radiographs: prompt ensembles, cached text embeddings, scores.

Scoring follows MedCLIP's ``PromptClassifier``: logit(image, prompt) = scale x cosine; a class's
logit is the mean (or max) over its prompts. From the class logits we report a softmax across
labels ("which of these") and a per-label sigmoid ("is this present", what MedCLIP's evaluator
feeds to AUC). Research and education only: a score is not a diagnosis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from PIL import Image

from ..config import ENSEMBLES, Config, ZeroShotModelConfig
from ..errors import BadInputError, ConfigError, MissingWeightsError
from ..imaging.loader import model_ready
from ..weights import HUB_PREFIX, resolve_weights
from .prompts import PRESETS, PromptSet, template_prompts

log = logging.getLogger(__name__)


class Encoder(Protocol):
    """What a zero-shot model must provide (see medclip.MedCLIPEncoder, biomedclip.BiomedCLIPEncoder)."""

    default_template: str

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor: ...

    def logit_scale(self) -> float: ...


@dataclass
class ZeroShotResult:
    """Scores of one image over the labels, in label order."""

    labels: list[str]
    logits: list[float]
    probabilities: list[float]  # softmax across labels
    scores: list[float]  # sigmoid(logit) per label
    predicted: str
    across_labels: ClassVar[bool] = True  # ``probabilities`` compete (softmax); MedKLIP's EntityResult: False

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return asdict(self)


def ensemble_logits(image_embeds: torch.Tensor, class_embeds: Sequence[torch.Tensor], scale: float,
                    ensemble: str = "mean") -> torch.Tensor:
    """(N, C) class logits: per class, scale x image @ prompts.T reduced over prompts by mean or max."""
    columns = []
    for prompts in class_embeds:
        logits = scale * image_embeds @ prompts.T  # (N, P)
        columns.append(logits.mean(dim=1) if ensemble == "mean" else logits.max(dim=1).values)
    return torch.stack(columns, dim=1)


def results_from_logits(logits: torch.Tensor, labels: Sequence[str]) -> list[ZeroShotResult]:
    """Softmax, sigmoid and argmax per row of an (N, C) logit matrix."""
    probabilities = logits.softmax(dim=1)
    scores = logits.sigmoid()
    return [ZeroShotResult(labels=list(labels), logits=row.tolist(), probabilities=prob.tolist(),
                           scores=score.tolist(), predicted=labels[int(row.argmax())])
            for row, prob, score in zip(logits, probabilities, scores, strict=True)]


class ZeroShotClassifier:
    """Scores images against labels with prompt ensembles; text embeddings are cached per prompt set."""

    def __init__(self, encoder: Encoder, name: str, *, ensemble: str = "mean", prompts_per_class: int | None = None,
                 seed: int = 42, batch_size: int = 16, preset: str = "chexpert5", templates: Sequence[str] = (),
                 cache_size: int = 32) -> None:
        if ensemble not in ENSEMBLES:
            raise BadInputError(f"ensemble must be mean or max, got {ensemble!r}")
        self.encoder, self.name, self.ensemble = encoder, name, ensemble
        self.prompts_per_class, self.seed, self.batch_size = prompts_per_class, seed, batch_size
        self.default_preset = preset
        self.templates = list(templates) or [encoder.default_template]
        self.cache_size = cache_size
        self._text_cache: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
        self._cache_lock = threading.Lock()  # the web app may score from several worker threads
        self.cache_hits = self.cache_misses = 0

    @classmethod
    def from_config(cls, config: Config, model_name: str | None = None) -> ZeroShotClassifier:
        """Build the named model of ``config.zeroshot.models``; raises MissingWeightsError if its weights are absent."""
        zs = config.zeroshot
        name = model_name or zs.default_model
        encoder = build_encoder(config, name)
        return cls(encoder, name, ensemble=zs.ensemble, prompts_per_class=zs.prompts_per_class, seed=zs.seed,
                   batch_size=zs.batch_size, preset=zs.preset, templates=zs.models[name].templates,
                   cache_size=zs.text_cache_size)

    def prompt_set(self, labels: Sequence[str] | None = None, preset: str | None = None,
                   prompts: PromptSet | None = None) -> PromptSet:
        """The prompts to score: explicit per-label prompts, typed labels with templates, or a preset."""
        if sum(x is not None for x in (labels, preset, prompts)) > 1:
            raise BadInputError("give labels, a preset or a prompt file, not several")
        if prompts is not None:
            return dict(prompts)
        if labels is not None:
            if not labels:
                raise BadInputError("the label list is empty")
            return template_prompts(labels, self.templates)
        name = preset or self.default_preset
        if name not in PRESETS:
            raise BadInputError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
        return PRESETS[name].build(self.prompts_per_class, self.seed)

    def text_embeddings(self, prompt_set: PromptSet) -> list[torch.Tensor]:
        """Per label, the (P, D) prompt embeddings; each label's prompts are encoded as one batch, LRU-cached."""
        key = tuple((label, tuple(prompts)) for label, prompts in prompt_set.items())
        with self._cache_lock:
            if key in self._text_cache:
                self.cache_hits += 1
                self._text_cache.move_to_end(key)
                return self._text_cache[key]
            self.cache_misses += 1
        start = time.perf_counter()
        embeds = [self.encoder.encode_prompts(prompts) for prompts in prompt_set.values()]
        log.info("encoded %d prompts for %d labels in %.2f s", sum(len(p) for p in prompt_set.values()),
                 len(prompt_set), time.perf_counter() - start)
        with self._cache_lock:
            self._text_cache[key] = embeds
            while len(self._text_cache) > self.cache_size:
                self._text_cache.popitem(last=False)
        return embeds

    def clear_cache(self) -> None:
        """Forget cached text embeddings (e.g. to measure uncached timings)."""
        with self._cache_lock:
            self._text_cache.clear()

    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) image embeddings, computed ``batch_size`` images at a time."""
        if not images:
            raise BadInputError("no images to classify")
        start = time.perf_counter()
        images = [model_ready(image) for image in images]
        parts = [self.encoder.encode_images(images[i:i + self.batch_size])
                 for i in range(0, len(images), self.batch_size)]
        log.info("encoded %d images in %.2f s", len(images), time.perf_counter() - start)
        return torch.cat(parts)

    def logits(self, images: Sequence[Image.Image], prompt_set: PromptSet) -> torch.Tensor:
        """(N, C) class logits of ``images`` for ``prompt_set`` (label order kept)."""
        class_embeds = self.text_embeddings(prompt_set)
        return ensemble_logits(self.image_embeddings(images), class_embeds, self.encoder.logit_scale(), self.ensemble)

    def classify(self, images: Sequence[Image.Image], labels: Sequence[str] | None = None, preset: str | None = None,
                 prompts: PromptSet | None = None) -> list[ZeroShotResult]:
        """One result per image; with neither labels, preset nor prompts, the configured preset is used."""
        prompt_set = self.prompt_set(labels, preset, prompts)
        return results_from_logits(self.logits(images, prompt_set), list(prompt_set))


def load_classifier(config: Config, model_name: str | None = None):
    """The classifier of a configured model: MedKLIP's entity classifier, or the prompt-ensemble one."""
    name = model_name or config.zeroshot.default_model
    models = config.zeroshot.models
    if model_name is None and name not in models and len(models) == 1:  # a one-model config needs no default_model
        name = next(iter(models))
    if _model_config(config, name).kind == "medklip":
        from .medklip_classifier import MedKLIPClassifier

        return MedKLIPClassifier.from_config(config, name)
    return ZeroShotClassifier.from_config(config, name)


def _device(config: Config) -> str:
    from ..placement import runtime_device  # the same resolution and check as the chat model's

    return str(runtime_device(config.runtime))


def _model_config(config: Config, name: str) -> ZeroShotModelConfig:
    models = config.zeroshot.models
    if name not in models:
        known = ", ".join(models) or "none configured"
        raise BadInputError(f"unknown zero-shot model {name!r} (in {config.source or 'config'}: {known})")
    return models[name]


def resolve_zeroshot_weights(config: Config, name: str, download: bool = False) -> Path:
    """The local weights of ``config.zeroshot.models[name]``; MissingWeightsError if they are absent."""
    model = config.zeroshot.models[name]
    return resolve_weights(model.weights, f"zeroshot.models.{name}.weights", download=download,
                           cache_dir=config.weights.cache_dir)


def build_encoder(config: Config, name: str) -> Encoder:
    """Resolve the model's weights and load its encoder (MedCLIP or BiomedCLIP)."""
    model = _model_config(config, name)
    path = resolve_zeroshot_weights(config, name)
    start = time.perf_counter()
    if model.kind == "biomedclip":
        from .biomedclip import load_encoder as load_biomedclip

        encoder = load_biomedclip(path, model.text_config, _device(config))
    else:
        from .medclip import load_encoder as load_medclip

        if not model.text_config:
            raise ConfigError(f"{config.source}: zeroshot.models.{name}.text_config is required for MedCLIP")
        variant = model.kind.removeprefix("medclip-")  # vit | resnet
        encoder = load_medclip(path, model.text_config, model.vision_config, variant, _device(config))
    log.info("zero-shot model loaded in %.1f s", time.perf_counter() - start)
    return encoder


def tower_config_repos(config: Config) -> dict[str, str]:
    """Hub repos whose config/tokenizer files the zero-shot towers read, by config entry.

    MedCLIP names its Swin and BERT configs; BiomedCLIP's open_clip_config.json names its text
    tower and tokenizer (read only when its weights folder is present).
    """
    repos: dict[str, str] = {}
    for name, model in config.zeroshot.models.items():
        for field_name in ("vision_config", "text_config"):
            value = getattr(model, field_name) or ""
            if value.startswith(HUB_PREFIX):
                repos[f"zeroshot.models.{name}.{field_name}"] = value.removeprefix(HUB_PREFIX)
        if model.kind == "biomedclip" and not model.text_config:
            repos.update(_biomedclip_text_repos(config, name, model))
    return repos


def _biomedclip_text_repos(config: Config, name: str, model: ZeroShotModelConfig) -> dict[str, str]:
    try:
        folder = resolve_zeroshot_weights(config, name)
    except MissingWeightsError:
        return {}
    from .biomedclip import text_tower_repos

    return {f"zeroshot.models.{name} text tower ({key})": repo for key, repo in text_tower_repos(folder).items()}


def available_models(config: Config) -> dict[str, str | None]:
    """Model name -> None when its weights are present, else the missing-weights message."""
    status: dict[str, str | None] = {}
    for name, model in config.zeroshot.models.items():
        try:
            if model.kind == "medklip":  # its checkpoint, BERT and descriptions are all needed
                from .medklip_classifier import medklip_files

                medklip_files(config, name)
            else:
                resolve_zeroshot_weights(config, name)
            status[name] = None
        except MissingWeightsError as exc:
            status[name] = str(exc)
    return status
