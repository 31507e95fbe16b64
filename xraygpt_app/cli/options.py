"""Options shared by every command that builds models."""

from __future__ import annotations

import argparse


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """--config and --set, shared by every command that builds models."""
    parser.add_argument("--config", "-c", default=None,
                        help="YAML config (default: eval_configs/xraygpt_eval.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set generation.max_new_tokens=50 (repeatable)")
