"""The model services of the web app, built once at start-up and shared by every session.

A component whose weights are missing does not stop the app: it is recorded as unavailable
with the weights layer's message (what is missing, where we looked, how to get it), and its
tab shows that message instead of controls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import ZEROSHOT_KINDS, Config, iter_weight_specs
from ..errors import LLMServerError, MissingWeightsError, XrayGPTError
from ..families.registry import family_spec

logger = logging.getLogger(__name__)

ZEROSHOT_TITLES = {"medclip-vit": "MedCLIP ViT", "medclip-resnet": "MedCLIP ResNet", "biomedclip": "BiomedCLIP",
                   "medklip": "MedKLIP"}


@dataclass
class Services:
    """What the UI handlers call: the chat model and the loaded zero-shot classifiers.

    ``assistant`` (the chat model of the config's family) is None when it could not be loaded;
    ``assistant_missing`` then says why.
    ``zeroshot_missing`` maps each zero-shot model that is not loaded to the reason.
    """

    config: Config
    assistant: Any = None
    assistant_missing: str | None = None
    classifiers: dict[str, Any] = field(default_factory=dict)
    zeroshot_missing: dict[str, str] = field(default_factory=dict)

    def classifier(self, name: str) -> Any:
        """The loaded classifier called ``name``; raises KeyError with the reason if unavailable."""
        if name not in self.classifiers:
            raise KeyError(self.zeroshot_missing.get(name, f"Unknown zero-shot model {name!r}."))
        return self.classifiers[name]


def build_services(config: Config, *, progress: Callable[[str], None] | None = None, download: bool = False,
                   with_assistant: bool = True, with_zeroshot: bool = True) -> Services:
    """Load every model the config names, reporting progress through ``progress``.

    ``download`` lets the weights layer fetch XrayGPT's missing files from their Hub/URL sources
    (e.g. on a Hugging Face Space); otherwise only local files and the cache are used.
    """
    say = progress or logger.info
    services = Services(config=config)
    if with_assistant:
        services.assistant, services.assistant_missing = _load_assistant(config, say, download)
    if with_zeroshot:
        services.classifiers, services.zeroshot_missing = _load_zeroshot(config, say, download)
    return services


def _load_assistant(config: Config, say: Callable[[str], None], download: bool) -> tuple[Any, str | None]:
    spec = family_spec(config.model.family)
    say(f"Loading {spec.title} ({spec.parts})...")
    start = time.perf_counter()
    try:
        from ..api import Assistant
        from ..serving.server import progress_to

        with progress_to(say):  # a vLLM server's start-up (runtime.llm_backend: vllm)
            model = Assistant.from_config(config, download=download)
    except MissingWeightsError as exc:
        reason = _every_missing_file(config, exc)
        say(f"{spec.title} is unavailable: {reason}")
        return None, reason
    except LLMServerError as exc:  # the chat tabs say why; zero-shot still works
        say(f"{spec.title} is unavailable: {exc}")
        return None, str(exc)
    except ImportError as exc:  # an optional dependency missing on this install
        say(f"{spec.title} is unavailable: {exc}")
        return None, f"{spec.title} could not be imported on this install: {exc}"
    say(f"{spec.title} loaded in {time.perf_counter() - start:.1f} s.")
    return model, None


def _every_missing_file(config: Config, first: MissingWeightsError) -> str:
    """What loading stopped at, and every other weights file of the family that is missing too.

    Loading stops at the first missing file; a user who fetches that one would only learn of the
    next on the following start. ``first`` keeps its own message (it may name failed downloads).
    """
    from ..weights import resolve_weights

    reasons = {first.name: str(first)}  # first, whichever entry (if any) it names
    for name in family_spec(config.model.family).weights:
        label = f"weights.{name}"
        try:
            if label != first.name:
                resolve_weights(getattr(config.weights, name), label, cache_dir=config.weights.cache_dir)
        except MissingWeightsError as exc:
            reasons[label] = str(exc)
    if len(reasons) == 1:
        return str(first)
    return f"{len(reasons)} weights files are missing.\n\n" + "\n\n".join(reasons.values())


def _load_zeroshot(config: Config, say: Callable[[str], None], download: bool
                   ) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        from ..zeroshot import classifier as zeroshot
    except ImportError as exc:
        reason = f"Zero-shot models could not be imported on this install: {exc}"
        say(reason)
        return {}, dict.fromkeys(ZEROSHOT_KINDS, reason)
    if download:
        _fetch_zeroshot_weights(config, say)
    loaded: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for name, reason in zeroshot.available_models(config).items():
        if reason is not None:
            missing[name] = reason
            say(f"Zero-shot model {name} is unavailable: {reason}")
            continue
        say(f"Loading zero-shot model {name}...")
        start = time.perf_counter()
        try:
            loaded[name] = zeroshot.load_classifier(config, name)
        except XrayGPTError as exc:
            missing[name] = str(exc)
            say(f"Zero-shot model {name} is unavailable: {exc}")
            continue
        say(f"Zero-shot model {name} loaded in {time.perf_counter() - start:.1f} s.")
    return loaded, missing


def _fetch_zeroshot_weights(config: Config, say: Callable[[str], None]) -> None:
    """Download missing zero-shot files into the cache, where ``available_models`` then finds them
    (MedKLIP's descriptions and BERT weights too)."""
    from ..weights import resolve_weights

    for key, spec in iter_weight_specs(config).items():
        if not key.startswith("zeroshot."):
            continue
        try:
            resolve_weights(spec, key, download=True, cache_dir=config.weights.cache_dir)
        except MissingWeightsError:
            say(f"{key}: could not be downloaded.")
