"""Report commands: ``xraygpt evaluate --task report`` (score, or generate then score, or compare two
configs) and ``xraygpt label-reports`` (CheXbert's 14 labels per report).

Exit codes: 0 ok; 2 bad input (CSV, config, option); 3 missing weights (CheXbert's files, a model's).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..config import Config, load_config
from ..errors import BadInputError
from ..evaluation.report_scores import (
    METRIC_CHOICES,
    comparison_rows,
    format_comparison,
    parse_metrics,
    read_report_column,
    read_reports,
    text_intervals,
)
from .files import load_csv_images, make_folder
from .options import add_config_options

log = logging.getLogger(__name__)
LABEL_NOTICE = "CheXbert labels are a model's reading of the text, not a diagnosis."


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``label-reports``."""
    label = subparsers.add_parser(
        "label-reports", help="CheXbert's 14 observation labels for each report of a CSV",
        description="Label radiology reports with CheXbert: per observation blank (not mentioned), 1 (positive),"
                    " 0 (negative) or -1 (uncertain), CheXbert's own convention. " + LABEL_NOTICE)
    label.add_argument("reports", metavar="REPORTS.csv",
                       help="a CSV with a report column (report, reference, text or findings) or a single column")
    label.add_argument("--out", metavar="FILE.csv", default=None, help="write the labels here (default: print them)")
    add_config_options(label)
    label.set_defaults(func=run_label_reports)


def add_report_options(evaluate: argparse.ArgumentParser) -> None:
    """``evaluate``'s options for --task report."""
    evaluate.add_argument("--metrics", default="bleu,rouge",
                          help=f"report task: comma-separated, from {', '.join(METRIC_CHOICES)} (default: bleu,rouge)."
                               " chexbert needs evaluation.chexbert.weights and .bert (`xraygpt fetch`)")
    evaluate.add_argument("--compare-config", metavar="FILE.yaml", default=None,
                          help="report task with image,report rows: also generate with this second config (e.g. the"
                               " fine-tuned model; --set applies to both) and print a before/after table")


def _labeler(config: Config):
    from ..evaluation.chexbert import CheXbertLabeler, chexbert_files

    weights, bert = chexbert_files(config)
    start = time.perf_counter()
    labeler = CheXbertLabeler.from_files(weights, bert)
    log.info("CheXbert loaded in %.1f s", time.perf_counter() - start)
    return labeler


def run_label_reports(args: argparse.Namespace) -> int:
    """Write (or print) one row per report: the report and its 14 labels."""
    from ..evaluation.chexbert import CONDITIONS, classification_labels

    config = load_config(args.config, args.overrides)
    reports = read_report_column(args.reports)
    labeler = _labeler(config)
    labels = classification_labels(labeler.label_classes(reports, config.evaluation.chexbert.batch_size))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["report", *CONDITIONS])
    writer.writerows([report, *row] for report, row in zip(reports, labels, strict=True))
    if args.out is None:
        sys.stdout.write(buffer.getvalue())
        return 0
    _write(Path(args.out), buffer.getvalue())
    print(f"{len(reports)} reports labelled; wrote {args.out}. {LABEL_NOTICE}")
    return 0


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise BadInputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _generate(config: Config, csv_path: Path, images: list[str]) -> list[str]:
    """One report per image with the config's model (loaded here and released on return)."""
    from ..api import Assistant
    pictures = load_csv_images(csv_path, images, config)
    model = Assistant.from_config(config)
    start = time.perf_counter()
    reports = [model.report(picture).answer for picture in pictures]
    log.info("generated %d reports in %.1f s", len(reports), time.perf_counter() - start)
    return reports


def score_reports(hypotheses: Sequence[str], references: Sequence[str], metrics: list[str], labeler,
                  batch_size: int, n_resamples: int, seed: int) -> dict:
    """metrics.json's content for one set of generated reports: the chosen text metrics and CheXbert F1."""
    from ..evaluation.metrics import report_metrics

    out: dict = {}
    text_keys = [k for k in ("bleu1", "bleu2", "bleu3", "bleu4") if "bleu" in metrics] + (
        ["rougeL"] if "rouge" in metrics else [])
    if text_keys:
        scores = report_metrics(hypotheses, references)
        intervals = text_intervals(hypotheses, references, [item["rougeL"] for item in scores["per_item"]],
                                   n_resamples, seed)
        out["overall"] = {k: scores["overall"][k] for k in text_keys}
        out["overall_ci95"] = {k: intervals[k] for k in text_keys}
        out["per_item"] = [{k: item[k] for k in text_keys} for item in scores["per_item"]]
        out["settings"] = {k: v for k, v in scores["settings"].items() if k.removesuffix("L") in metrics}
    if "chexbert" in metrics:
        from ..evaluation.clinical import chexbert_metrics

        start = time.perf_counter()
        reference_classes = labeler.label_classes(references, batch_size)
        generated_classes = labeler.label_classes(hypotheses, batch_size)
        log.info("CheXbert labelled %d reports in %.1f s", 2 * len(references), time.perf_counter() - start)
        out["chexbert"] = chexbert_metrics(reference_classes, generated_classes, n_resamples, seed)
    return out


def write_outputs(out: Path, metrics: dict) -> list[Path]:
    """metrics.json, and with CheXbert its labels CSV and F1 chart; returns the files written."""
    make_folder(out)
    written = [out / "metrics.json"]
    written[0].write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    if "chexbert" in metrics:
        from ..charts import f1_chart

        section = metrics["chexbert"]
        (out / "chexbert_labels.csv").write_text(labels_csv(section), encoding="utf-8")
        f1_chart(section["per_observation"], section["micro_f1_14"], section["macro_f1_14"],
                 title=f"CheXbert F1 per observation ({section['n_reports']} reports)", path=out / "chexbert_f1.png")
        written += [out / "chexbert_labels.csv", out / "chexbert_f1.png"]
    return written


def labels_csv(section: dict) -> str:
    """Four rows per report pair: reference and generated, each in the rrg and CheXbert conventions."""
    labels = section["labels"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "report", "convention", *section["observations"]])
    for row in range(section["n_reports"]):
        for side, key in (("reference", "references"), ("generated", "generated")):
            writer.writerow([row + 1, side, "rrg", *labels[key][row]])
            writer.writerow([row + 1, side, "classification", *labels[f"{key}_classification"][row]])
    return buffer.getvalue()


def evaluate_reports(config: Config, args: argparse.Namespace, out: Path) -> str:
    """Score report,generated pairs, or generate for image,report rows first (with --compare-config: two
    configs on the same rows, printed as one table). Returns the summary to print."""
    metrics = parse_metrics(args.metrics)
    csv_path = Path(args.data)
    table = read_reports(csv_path)
    second = load_config(args.compare_config, args.overrides) if args.compare_config else None
    if second is not None and table.images is None:
        raise BadInputError("--compare-config generates with both configs: the CSV needs image,report rows")
    labeler = _labeler(config) if "chexbert" in metrics else None  # before generating: missing files fail fast
    batch = config.evaluation.chexbert.batch_size
    hypotheses = table.generated if table.images is None else _generate(config, csv_path, table.images)
    first = score_reports(hypotheses, table.references, metrics, labeler, batch, args.bootstrap, args.seed)
    if table.images is not None:
        _attach_generated(first, table.images, hypotheses, config)
    written = write_outputs(out, first)
    summary = f"{len(hypotheses)} reports: {_headline(first)}; wrote {', '.join(str(p) for p in written)}"
    if second is None:
        return summary
    other = _generate(second, csv_path, table.images)
    scored = score_reports(other, table.references, metrics, labeler, batch, args.bootstrap, args.seed)
    _attach_generated(scored, table.images, other, second)
    write_outputs(out / "compare", scored)
    rows = comparison_rows(first, scored)
    names = (config.source, second.source)
    (out / "comparison.json").write_text(json.dumps({"A": names[0], "B": names[1], "rows": rows}, indent=2),
                                         encoding="utf-8")
    return f"{summary}\n{format_comparison(rows, *names)}\nB's outputs in {out / 'compare'}; table in " \
           f"{out / 'comparison.json'}"


def _attach_generated(metrics: dict, images: list[str], hypotheses: list[str], config: Config) -> None:
    """Keep each image's generated report beside its scores, and the generation settings, so they can be checked."""
    items = metrics.setdefault("per_item", [{} for _ in images])
    for item, image, hypothesis in zip(items, images, hypotheses, strict=True):
        item["image"], item["generated_report"] = image, hypothesis
    metrics.setdefault("settings", {})["generation"] = dataclasses.asdict(config.generation)


def _headline(metrics: dict) -> str:
    parts = [f"{k} {v:.3f}" for k, v in metrics.get("overall", {}).items()]
    if "chexbert" in metrics:
        section = metrics["chexbert"]
        parts += [f"CheXbert micro-F1(14) {section['micro_f1_14']:.3f}", f"macro-F1(14) {section['macro_f1_14']:.3f}",
                  f"micro-F1(5) {section['micro_f1_5']:.3f}", f"accuracy(5) {section['accuracy_5']:.3f}"]
    return ", ".join(parts)
