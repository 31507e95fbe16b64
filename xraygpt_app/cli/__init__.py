"""The ``xraygpt`` command line: one parser, one sub-command module per concern.

Exit codes: 0 ok; 2 bad input (config, file, question); 3 missing weights.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import XrayGPTError

# Each module defines register(subparsers), adding its commands with set_defaults(func=...).
COMMAND_MODULES = (
    "xraygpt_app.cli.chat",
    "xraygpt_app.cli.serve",
    "xraygpt_app.cli.weights",
    "xraygpt_app.cli.inspect",
    "xraygpt_app.cli.zeroshot",
    "xraygpt_app.cli.finetune",
    "xraygpt_app.cli.reports",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xraygpt",
        description="Chest radiograph assistant (research and education only; not a diagnosis).")
    parser.add_argument("--verbose", "-v", action="store_true", help="log timings and sizes")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except XrayGPTError as exc:
        print(f"xraygpt: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("xraygpt: interrupted", file=sys.stderr)
        return 130
