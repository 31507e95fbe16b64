"""The ``xraygpt`` command line: one parser, one sub-command module per concern.

Exit codes: 0 ok; 2 bad input (config, file, question); 3 missing weights; 4 the vLLM server failed.
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


class _MissingKernelsNotice(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community: No module named
    'kernels'", logged on every import on CPUs with AVX-512 BF16: ``kernels`` is an optional package that
    fetches a kernel from the Hugging Face Hub, and without it bitsandbytes uses its own CPU kernel.
    Any other failure to load that kernel (``kernels`` installed but broken) is still shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
                    and isinstance(cause, ModuleNotFoundError) and cause.name == "kernels")


def quiet_known_notices() -> None:
    """Filter the third-party notices about nothing the user can act on (by logger and message only)."""
    bnb_cpu = logging.getLogger("bitsandbytes.backends.cpu.ops")  # the same object once bitsandbytes logs there
    if not any(isinstance(f, _MissingKernelsNotice) for f in bnb_cpu.filters):
        bnb_cpu.addFilter(_MissingKernelsNotice())


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
    quiet_known_notices()
    try:
        return int(args.func(args) or 0)
    except XrayGPTError as exc:
        print(f"xraygpt: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("xraygpt: interrupted", file=sys.stderr)
        return 130
