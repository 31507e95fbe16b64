"""Read foreign checkpoints and remap their keys onto library classes.

The shared pieces of every family's remap: reading, table-driven renaming, naming unknown keys and
loading strictly. The remaps themselves live beside the model they feed (``families/xraygpt/
checkpoints.py``, ``zeroshot/medclip.py``, ...): one pure function per foreign format, which never
mutates its input, renames by table, drops keys only when they match an explicit list, and raises
on any key it does not know, naming it.
Loading is strict (``load_exact``), so a silent ``strict=False`` can never hide a mistake.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import BadInputError

StateDict = dict[str, torch.Tensor]


class CheckpointKeyError(BadInputError):
    """A checkpoint holds keys we do not know, or lacks keys we need."""


def read_state_dict(path: str | Path, container_key: str | None = None) -> StateDict:
    """Load a ``.pth``/``.bin`` safely (tensors only, no arbitrary pickles).

    ``container_key`` unwraps ``{'model': state_dict, ...}`` files (BLIP-2, XrayGPT).
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        raise BadInputError(f"Cannot read checkpoint {path}: {exc}") from None
    if container_key is not None:
        if not isinstance(data, Mapping) or container_key not in data:
            keys = list(data)[:5] if isinstance(data, Mapping) else type(data).__name__
            raise CheckpointKeyError(f"{path}: expected a {{'{container_key}': state_dict}} file, found {keys}")
        data = data[container_key]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointKeyError(f"{path}: not a state dict of tensors")
    return dict(data)


def match_any(key: str, patterns: tuple[str, ...]) -> bool:
    return any(re.fullmatch(p, key) for p in patterns)


def raise_unknown(unknown: list[str], what: str) -> None:
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise CheckpointKeyError(f"Unknown key(s) in the {what}: {shown}")


def rename_by_table(key: str, table: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, template in table:
        if (m := re.fullmatch(pattern, key)) is not None:
            return m.expand(template)
    return None


def load_exact(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str,
               allowed_missing: tuple[str, ...] = ()) -> None:
    """Load strictly; only keys matching ``allowed_missing`` patterns may be absent."""
    try:
        result = module.load_state_dict(state_dict, strict=False, assign=_is_meta(module))
    except RuntimeError as exc:  # shape mismatches: the config's dims do not match the file
        raise CheckpointKeyError(f"{what}: {exc}".replace("\n\t", " ")) from None
    missing = [k for k in result.missing_keys if not match_any(k, allowed_missing)]
    if missing or result.unexpected_keys:
        raise CheckpointKeyError(
            f"{what}: missing keys {missing[:8]}, unexpected keys {result.unexpected_keys[:8]}")


def _is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())
