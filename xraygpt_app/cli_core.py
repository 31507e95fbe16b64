"""Core commands: report, ask, fetch, check."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the core commands (filled in by the inference-core work)."""
