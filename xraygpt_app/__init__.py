"""xraygpt-app: a chest radiograph assistant (report chat, VQA, zero-shot scores) built from the field's libraries.

Research and education only: nothing this package produces is a diagnosis.

The public names load lazily (importing the package pulls in no torch)::

    from xraygpt_app import Assistant, ZeroShotClassifier, load_radiograph, load_config
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

# public name -> the module that defines it
_PUBLIC = {
    "Assistant": "xraygpt_app.api",
    "XrayGPT": "xraygpt_app.api",  # the old name of Assistant, kept for one release
    "ChatSession": "xraygpt_app.chat",
    "TurnResult": "xraygpt_app.chat",
    "ZeroShotClassifier": "xraygpt_app.zeroshot.classifier",
    "load_radiograph": "xraygpt_app.imaging.loader",
    "load_config": "xraygpt_app.config",
    "Config": "xraygpt_app.config",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'xraygpt_app' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
