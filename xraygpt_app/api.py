"""The documented Python API.

>>> from xraygpt_app.api import Assistant
>>> from xraygpt_app.imaging.loader import load_radiograph
>>> model = Assistant.from_config("eval_configs/tiny_fixture.yaml")
>>> image = load_radiograph("chest.dcm").image
>>> print(model.report(image).answer)
>>> chat = model.chat(image)
>>> chat.ask("Is there evidence of pleural effusion?").answer
>>> for piece in chat.ask_stream("Any cardiomegaly?"): print(piece, end="")

Outputs are machine-generated, can be wrong, and are never a diagnosis.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from .chat import ChatSession, TurnResult
from .config import Config, load_config
from .families import DEFAULT_REPORT_QUESTION, ChatModel, load_model

__all__ = ["Assistant", "XrayGPT", "ChatSession", "TurnResult", "DEFAULT_REPORT_QUESTION"]


class Assistant:
    """A model loaded from a config (``model.family``: xraygpt or llava): one model, any number of conversations."""

    def __init__(self, model: ChatModel):
        self.model = model
        self.config: Config = model.config

    @classmethod
    def from_config(cls, config: Config | str | Path | None = None, overrides: tuple[str, ...] | list[str] = (),
                    download: bool = False) -> Assistant:
        """Load from a Config or a YAML path (default: the real model's eval config)."""
        if not isinstance(config, Config):
            config = load_config(config, overrides)
        return cls(load_model(config, download=download))

    def chat(self, image: Image.Image, reuse_kv: bool = True) -> ChatSession:
        """Start a conversation about ``image``; it is encoded once, here."""
        return ChatSession(self.model, self.model.encode_image(image), reuse_kv=reuse_kv)

    def describe(self) -> str:
        """One line naming what is loaded (the family and its weights), for the app's "model" line."""
        return self.model.describe()

    def input_view(self, image: Image.Image) -> tuple[Image.Image, str]:
        """The image as the model's preprocessing frames it (before normalisation), and how, for previews."""
        return self.model.input_view(image)

    def report(self, image: Image.Image, question: str = DEFAULT_REPORT_QUESTION, **generation) -> TurnResult:
        """The first-turn report for ``image``."""
        return self.chat(image).ask(question, **generation)


# The class was called XrayGPT until 0.2 although it serves any family: the old name stays for one release.
XrayGPT = Assistant
