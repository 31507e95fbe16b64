"""Core commands: ``xraygpt report`` and ``xraygpt ask``.

Text streams to the terminal unless ``--json``, which prints one object: per turn the question,
the exact prompt fed to the LLM, the generated token ids, the answer and timings, plus the image
description and the resolved config.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ..config import load_config
from ..errors import BadInputError, ImageLoadError
from ..families import DEFAULT_REPORT_QUESTION
from ..imaging.loader import load_radiograph
from ..serving.server import progress_to
from .heatmaps import MEANING_LINE, add_heatmap_option, output_folder, write_report_maps
from .options import add_config_options

if TYPE_CHECKING:
    from ..chat import ChatSession

DISCLAIMER = "Research and education only: machine-generated text, may be wrong, not a diagnosis."


def register(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser("report", help="draft a report for one radiograph")
    _add_common(report)
    report.add_argument("-q", "--question", default=DEFAULT_REPORT_QUESTION,
                        help=f"the first-turn request (default: {DEFAULT_REPORT_QUESTION!r})")
    report.set_defaults(func=run_report)

    ask = subparsers.add_parser("ask", help="a multi-turn conversation about one radiograph")
    _add_common(ask)
    ask.add_argument("-q", "--question", dest="questions", action="append", required=True,
                     help="a question; repeat for follow-ups in the same conversation")
    ask.set_defaults(func=run_ask)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="PNG, JPEG or DICOM file")
    add_config_options(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (XrayGPT samples by default)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling, for repeatable answers")
    parser.add_argument("--no-kv-reuse", action="store_true", help="re-run the whole prompt each turn")
    add_heatmap_option(parser, report=True)


def run_report(args: argparse.Namespace) -> int:
    return _converse(args, [args.question])


def run_ask(args: argparse.Namespace) -> int:
    return _converse(args, args.questions)


def _converse(args: argparse.Namespace, questions: list[str]) -> int:
    # torch and transformers load only for the commands that need them
    from ..api import Assistant
    from ..chat import check_question
    from ..generation import settings_with

    config = load_config(args.config, args.overrides)
    generation = {"max_new_tokens": args.max_new_tokens, "seed": args.seed}
    if args.greedy:
        generation["do_sample"] = False
    # Everything the user typed or pointed at is checked before the (slow) model load.
    settings_with(config.generation, **generation)
    for question in questions:
        check_question(question)
    if args.span and not args.heatmap:
        raise BadInputError("--span needs --heatmap DIR")
    if args.heatmap:
        output_folder(args.heatmap)
    try:
        radiograph = load_radiograph(args.image, config.image)
    except ImageLoadError as exc:
        raise ImageLoadError(f"{args.image}: {exc}") from None
    with progress_to(lambda line: print(line, file=sys.stderr, flush=True)):  # a vLLM server's start-up
        model = Assistant.from_config(config)
    session = model.chat(radiograph.image, reuse_kv=not args.no_kv_reuse)
    if not args.json:
        print(DISCLAIMER, file=sys.stderr)
        print(f"model: {model.describe()}", file=sys.stderr)
    for question in questions:
        _run_turn(session, question, generation, stream=not args.json)
    heatmaps = write_report_maps(args.heatmap, session, args.image, radiograph.image, args.span) if args.heatmap else []
    if args.json:
        print(json.dumps({
            "image": radiograph.info.to_dict(),
            "image_encoding_timings": session.encoding.timings,
            "turns": [turn.to_dict() for turn in session.turns],
            "model": model.describe(),
            "config": config.to_dict(),
            "disclaimer": DISCLAIMER,
            **({"heatmaps": [str(p) for p in heatmaps], "heatmap_meaning": MEANING_LINE} if args.heatmap else {}),
        }, indent=2, ensure_ascii=False))
    elif args.heatmap:
        print(f"{len(heatmaps)} heatmap(s) written to {args.heatmap}. {MEANING_LINE}", file=sys.stderr)
    return 0


def _run_turn(session: ChatSession, question: str, generation: dict, stream: bool) -> None:
    if not stream:
        session.ask(question, **generation)
        return
    print(f"\nQuestion: {question}\nAnswer: ", end="", flush=True)  # the same labels for every model family
    for piece in session.ask_stream(question, **generation):
        print(piece, end="", flush=True)
    turn = session.turns[-1]
    if turn.dropped_turns:
        print(f"\n[{turn.dropped_turns} earlier turn(s) left out to fit the context]", end="")
    print(flush=True)
