"""Report evaluation beyond the metric functions: the report CSV layouts, intervals for BLEU and
ROUGE-L, and the before/after table of two models scored on the same references.

Pure functions of strings and ``metrics.json`` dicts; running models is the CLI's job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInputError
from .metrics import IMAGE_COLUMNS, REPORT_COLUMNS, _bleu, _pick, _sniff_rows

GENERATED_COLUMNS = ("generated", "generated_report", "hypothesis", "prediction")
METRIC_CHOICES = ("bleu", "rouge", "chexbert")
# The rows of the before/after table: (label, section of metrics.json, key).
COMPARED = (
    ("BLEU-4", "overall", "bleu4"),
    ("ROUGE-L", "overall", "rougeL"),
    ("CheXbert micro-F1 (14)", "chexbert", "micro_f1_14"),
    ("CheXbert macro-F1 (14)", "chexbert", "macro_f1_14"),
    ("CheXbert micro-F1 (5)", "chexbert", "micro_f1_5"),
    ("CheXbert macro-F1 (5)", "chexbert", "macro_f1_5"),
)


@dataclass
class ReportTable:
    """A report CSV: ``report,generated`` pairs to score as they are, or ``image,report`` rows to generate for."""

    references: list[str]
    generated: list[str] | None = None  # set for the report,generated layout
    images: list[str] | None = None  # set for the image,report layout


def parse_metrics(text: str) -> list[str]:
    """``chexbert,bleu,rouge`` -> the chosen metrics in that order, refusing unknown names."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRIC_CHOICES]
    if unknown or not names:
        raise BadInputError(f"--metrics: unknown metric {', '.join(unknown) or '(none given)'}"
                            f" (choose from {', '.join(METRIC_CHOICES)})")
    return list(dict.fromkeys(names))


def read_reports(path: str | Path) -> ReportTable:
    """Read a report CSV in either layout; a ``generated`` column makes it the scoring layout.

    In the scoring layout a report may be empty (CheXbert labels it as blank everywhere); in the
    generation layout every row needs an image and a non-empty reference.
    """
    path = Path(path)
    rows = _sniff_rows(path)
    columns = list(rows[0].keys())
    generated_col = _pick(columns, GENERATED_COLUMNS, None)
    if generated_col is None:
        return _image_rows(path, rows, columns)
    report_col = _pick([c for c in columns if c != generated_col], REPORT_COLUMNS, None)
    if report_col is None:
        raise BadInputError(f"{path}: a {generated_col!r} column needs a reference column beside it"
                            f" ({', '.join(REPORT_COLUMNS)})")
    return ReportTable(references=[row[report_col] or "" for row in rows],
                       generated=[row[generated_col] or "" for row in rows])


def _image_rows(path: Path, rows: list[dict], columns: list[str]) -> ReportTable:
    image_col = _pick(columns, IMAGE_COLUMNS, 0)
    report_col = _pick([c for c in columns if c != image_col], REPORT_COLUMNS, 0)
    if report_col is None:
        raise BadInputError(f"{path}: expected image,report columns (generate and score) or report,generated"
                            " (score as they are)")
    images = [(row[image_col] or "").strip() for row in rows]
    reports = [(row[report_col] or "").strip() for row in rows]
    if any(not i for i in images) or any(not r for r in reports):
        raise BadInputError(f"{path}: every row needs an image path and a non-empty reference report")
    return ReportTable(references=reports, images=images)


def read_report_column(path: str | Path) -> list[str]:
    """The reports of a CSV for labeling: its ``report`` column (or ``text``, ``findings``...), or its only column."""
    path = Path(path)
    rows = _sniff_rows(path)
    columns = list(rows[0].keys())
    column = _pick(columns, REPORT_COLUMNS + GENERATED_COLUMNS, 0 if len(columns) == 1 else None)
    if column is None:
        raise BadInputError(f"{path}: no report column (name it one of {', '.join(REPORT_COLUMNS)})")
    return [row[column] or "" for row in rows]


def text_intervals(hypotheses: Sequence[str], references: Sequence[str], rouge_per_item: Sequence[float],
                   n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals over report pairs for corpus BLEU-1..4 and mean ROUGE-L.

    BLEU is recomputed per resample from sacrebleu's per-report n-gram statistics (as its own
    paired-bootstrap test does), so a resample costs a sum, not a re-tokenisation.
    """
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(references), (n_resamples, len(references)))
    tail = (1 - level) / 2 * 100
    out = {}
    for n in range(1, 5):
        bleu = _bleu(n, False)
        stats = np.array(bleu._extract_corpus_statistics(list(hypotheses), [list(references)]))
        scores = [bleu._compute_score_from_stats(stats[row].sum(axis=0).tolist()).score / 100 for row in idx]
        out[f"bleu{n}"] = [float(np.percentile(scores, tail)), float(np.percentile(scores, 100 - tail))]
    rouge = np.asarray(rouge_per_item)[idx].mean(axis=1)
    out["rougeL"] = [float(np.percentile(rouge, tail)), float(np.percentile(rouge, 100 - tail))]
    return out


def _value_and_interval(metrics: Mapping, section: str, key: str) -> tuple[float, list[float] | None] | None:
    if section == "overall":
        if key not in metrics.get("overall", {}):
            return None
        return metrics["overall"][key], metrics.get("overall_ci95", {}).get(key)
    if section not in metrics:
        return None
    return metrics[section][key], metrics[section].get(f"{key}_ci95")


def comparison_rows(first: Mapping, second: Mapping) -> list[dict]:
    """One row per metric both runs have: values, difference (second - first), intervals and whether they overlap."""
    rows = []
    for label, section, key in COMPARED:
        a, b = _value_and_interval(first, section, key), _value_and_interval(second, section, key)
        if a is None or b is None:
            continue
        overlap = None if not (a[1] and b[1]) else bool(a[1][0] <= b[1][1] and b[1][0] <= a[1][1])
        rows.append({"metric": label, "first": a[0], "second": b[0], "difference": b[0] - a[0],
                     "first_ci95": a[1], "second_ci95": b[1], "intervals_overlap": overlap})
    return rows


def format_comparison(rows: Sequence[Mapping], first_name: str, second_name: str) -> str:
    """The before/after table as text: value [95% interval] per run, the difference, overlap yes/no."""
    def cell(value: float, ci: list[float] | None) -> str:
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"

    header = ("metric", f"A: {first_name}", f"B: {second_name}", "B - A", "95% intervals overlap")
    body = [(r["metric"], cell(r["first"], r["first_ci95"]), cell(r["second"], r["second_ci95"]),
             f"{r['difference']:+.3f}", {True: "yes", False: "no", None: "n/a"}[r["intervals_overlap"]])
            for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
             for line in [header, *body]]
    return "\n".join(lines)
