"""Typed sections from YAML: read a file, apply ``--set key.path=value`` overrides, build dataclasses.

Generic machinery behind :mod:`xraygpt_app.config` and the training config: an unknown key is an
error naming the file and the key path, and YAML's looser scalars are coerced to the field types.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def read_raw_config(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The YAML mapping of a config file with ``key.path=value`` overrides applied (not yet validated)."""
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        apply_override(raw, item, path)
    return raw


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def apply_override(raw: dict, item: str, path: Path) -> None:
    keys, value = parse_override(item)
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {key!r} is not a section (in {path})")
        node = child
    if PATH_KEYS.intersection(keys) and keys[-1] not in NOT_PATHS:
        value = _from_working_dir(value)
    current = node.get(keys[-1])
    if isinstance(current, dict) and "sources" in current and isinstance(value, (str, list)):
        current["sources"] = [value] if isinstance(value, str) else value  # keep sha256/how_to_get
    else:
        node[keys[-1]] = value


# Keys whose values are file locations. Typed on the command line, a relative path means the working
# directory, as in any shell command; written in a config file, it means that file's folder.
PATH_KEYS = frozenset({"weights", "sources", "lora", "vision_config", "text_config", "bert"})
NOT_PATHS = frozenset({"sha256", "how_to_get", "licence", "files"})  # the other fields of a weights entry


def _from_working_dir(value: Any) -> Any:
    if isinstance(value, str):
        return absolute_path(value, Path.cwd())
    if isinstance(value, list):
        return [_from_working_dir(item) for item in value]
    return value


LOADER_FIELDS = frozenset({"source", "overrides"})  # set by the loader (how a config was read), never keys in YAML


def build_section(cls: type, data: Any, source: str, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by name (``where``: its key path)."""
    if data is None:
        data = {}
    shorthand = getattr(cls, "SHORTHAND_FIELD", None)  # e.g. a weights entry given as a bare path or list
    if shorthand and isinstance(data, (str, list)):
        data = {shorthand: [data] if isinstance(data, str) else data}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.name not in LOADER_FIELDS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {where + '.' if where else ''}{unknown[0]}"
            f" (known keys{' in ' + where if where else ''}: {', '.join(sorted(known))})"
        )
    values = {name: _coerce(hints[name], value, source, f"{where}.{name}" if where else name)
              for name, value in data.items()}
    return cls(**values)


def _coerce(hint: Any, value: Any, source: str, where: str) -> Any:
    """Check ``value`` against a field's type hint, converting where YAML is looser."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value, source, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, source, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a mapping")
        return {str(k): _coerce(args[1], v, source, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {where} must be a list, got {value!r}")
        items = [_coerce(args[0], v, source, where) for v in value]
        return tuple(items) if origin is tuple else items
    return _coerce_scalar(hint, value, source, where)


def _coerce_scalar(hint: Any, value: Any, source: str, where: str) -> Any:
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-6" as a string
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{source}: {where} must be {hint.__name__}, got {value!r}")
    return value


def absolute_path(source: str, base: Path) -> str:
    """A local path made absolute against ``base``; ``hf-hub:``/URL sources and absolute paths unchanged."""
    if ":" in source.split("/")[0] or Path(source).expanduser().is_absolute():
        return str(Path(source).expanduser()) if source.startswith(("~", "/")) else source
    return str((base / source).resolve())
