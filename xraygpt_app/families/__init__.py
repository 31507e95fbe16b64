"""The small interface every model family gives the chat engine, and what all families share.

The chat engine (``chat.py``), the Python API and through them the CLI and the web app talk to a
loaded model only through :class:`ChatModel`: encode an image into LLM input embeddings once,
render a conversation into token segments around the image, say which token sequences end an
answer and how an answer's text is cleaned, and how long the context is. A family differs only
there; ``model.family`` in the config picks one from the registry (``families/registry.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .registry import FAMILIES, FamilySpec, family_spec  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from PIL import Image
    from transformers import PreTrainedTokenizerBase

    from ..config import Config
    from ..placement import Placement

# XrayGPT's own example prompts (its demo's "Prompt Examples"); the first is the default question.
DEFAULT_REPORT_QUESTION = "Describe the given chest x-ray image in detail."
EXAMPLE_QUESTIONS = (
    DEFAULT_REPORT_QUESTION,
    "Take a look at this chest x-ray and describe the findings and impression.",
    "Could you provide a detailed description of the given x-ray image?",
    "Describe the given chest x-ray image as detailed as possible.",
    "What are the key findings in this chest x-ray image?",
    "Could you highlight any abnormalities or concerns in this chest x-ray image?",
    "What specific features of the lungs and heart are visible in this chest x-ray image?",
    "What is the most prominent feature visible in this chest x-ray image, and how is it indicative of the"
    " patient's health?",
    "Based on the findings in this chest x-ray image, what is the overall impression?",
)


@dataclass(frozen=True)
class Turn:
    """One finished exchange of a conversation, as later prompts carry it."""

    question: str
    answer: str  # the stored (cleaned) answer, as later prompts carry it


@dataclass
class PromptSegments:
    """A rendered prompt: its text (image placeholder included) and the token ids either side of the image."""

    text: str
    before: list[int]
    after: list[int]


class ImageEmbedding(Protocol):
    llm_embeds: torch.Tensor  # (1, image tokens, llm hidden) on the LLM device, LLM dtype
    timings: dict[str, float]


class ChatModel(Protocol):
    """What the chat engine needs from a loaded model of any family."""

    config: Config
    llm: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    placement: Placement
    pending_suffixes: tuple[str, ...]  # answer text a later token may still change: held back while streaming
    suppressed_ids: list[int]  # ids the tokenizer cannot decode (a padded vocabulary's rows): never generated

    def encode_image(self, image: Image.Image) -> ImageEmbedding: ...

    def preprocess(self, image: Image.Image) -> torch.Tensor: ...  # (1, 3, S, S) pixels, the family's transform

    @property
    def preprocess_transform(self) -> Callable: ...  # the torchvision transform behind preprocess

    @property
    def patch_size(self) -> int: ...  # pixels per side of one vision patch

    def image_tokens(self, pixel_values: torch.Tensor, train: bool = False) -> torch.Tensor: ...

    def decode(self, ids: list[int]) -> str: ...

    def parts(self) -> dict[str, torch.nn.Module]: ...

    def cascade_layers(self) -> list[tuple[str, torch.nn.Module]]: ...

    def embed_ids(self, ids: list[int]) -> torch.Tensor: ...

    def render_prompt(self, history: list[Turn], question: str) -> PromptSegments: ...

    def stop_sequences(self) -> list[list[int]]: ...

    def answer_text(self, generated: list[int]) -> str: ...

    def display_answer(self, stored: str) -> str: ...

    @property
    def context_length(self) -> int: ...

    def describe(self) -> str: ...

    def input_view(self, image: Image.Image) -> tuple[Image.Image, str]: ...


def model_class(family: str) -> type:
    """The loaded-model class of ``family`` (a key of the registry; the config has checked it)."""
    return family_spec(family).load("model")


def load_model(config: Config, download: bool = False) -> ChatModel:
    """Load the model the config's ``model.family`` names."""
    return model_class(config.model.family).load(config, download=download)
