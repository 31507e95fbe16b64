"""Evaluation metrics: zero-shot classification (scikit-learn, bootstrap CIs) and report text (BLEU, ROUGE-L).

Pure functions of arrays and strings; reading data and running models is the CLI's job.
AUC is that of sigmoid(logit) per label, as in MedCLIP's evaluator, but computed on the logits:
the ranking is the same, and sigmoid rounds every logit above ~37 to exactly 1.0 (MedCLIP's
scale is up to 100), which would turn distinct scores into ties. A label whose ground truth has
only one class gets no AUC and a note instead of a number.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInputError

IMAGE_COLUMNS = ("image", "image_path", "path", "file")
LABEL_COLUMNS = ("label", "class", "finding")
REPORT_COLUMNS = ("report", "reference", "text", "findings")


@dataclass
class LabelTable:
    """Ground truth read from a labels CSV: image paths and a (N, C) 0/1 matrix over ``labels``.

    ``single_label``: every image has exactly one positive label (multi-class); accuracy is then
    argmax accuracy, otherwise the mean per-label accuracy at sigmoid >= 0.5.
    """

    images: list[str]
    labels: list[str]
    targets: np.ndarray
    single_label: bool


def _sniff_rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInputError(f"cannot read CSV {path}: {exc}") from None
    if not rows:
        raise BadInputError(f"{path}: no data rows (a header row and one row per image are expected)")
    header = [name.strip() for name in reader.fieldnames or []]  # the rows' dict keys hide repeated names
    if len(set(header)) != len(header) or not all(header):
        raise BadInputError(f"{path}: the header row has empty or repeated column names")
    for number, row in enumerate(rows, start=1):
        if None in row:  # DictReader files surplus fields under the key None
            raise BadInputError(f"{path}: data row {number} has more fields than the header")
    return rows


def _pick(columns: Sequence[str], names: Sequence[str], fallback: int | None) -> str | None:
    lowered = {c.strip().lower(): c for c in columns}
    for name in names:
        if name in lowered:
            return lowered[name]
    return columns[fallback] if fallback is not None and len(columns) > fallback else None


def read_label_table(path: str | Path) -> LabelTable:
    """Read ``image,label`` rows, or an image column plus one 0/1 column per label. Paths stay as written."""
    path = Path(path)
    rows = _sniff_rows(path)
    columns = list(rows[0].keys())
    image_col = _pick(columns, IMAGE_COLUMNS, 0)
    others = [c for c in columns if c != image_col]
    images = [(row[image_col] or "").strip() for row in rows]
    if any(not image for image in images):
        raise BadInputError(f"{path}: every row needs an image path in column {image_col!r}")
    label_col = _pick(others, LABEL_COLUMNS, None)
    if label_col is not None and len(others) == 1:
        names = [(row[label_col] or "").strip() for row in rows]
        labels = list(dict.fromkeys(sorted(n for n in names if n)))
        if len(labels) != len(set(names)):
            raise BadInputError(f"{path}: some rows have an empty label")
        if set(labels) <= {"0", "1"}:  # else "0"/"1" would become class names scored as "chest x-ray showing 1"
            raise BadInputError(f"{path}: column {label_col!r} holds 0/1, not finding names: name the column after"
                                " the finding (e.g. image,Edema) or write the finding name in each row")
        targets = np.array([[name == label for label in labels] for name in names], dtype=int)
        return LabelTable(images, labels, targets, single_label=True)
    return _binary_columns(path, rows, images, others)


def _binary_columns(path: Path, rows: list[dict], images: list[str], label_cols: list[str]) -> LabelTable:
    if not label_cols:
        raise BadInputError(f"{path}: expected a label column or one 0/1 column per label")
    try:
        values = np.array([[float(row[c]) for c in label_cols] for row in rows])
    except (TypeError, ValueError):
        raise BadInputError(f"{path}: label columns must hold 0 or 1 (or use an image,label layout)") from None
    if not np.isin(values, (0.0, 1.0)).all():  # also refuses 0.7, -1 (CheXpert's "uncertain") and nan
        raise BadInputError(f"{path}: label columns must hold 0 or 1")
    targets = values.astype(int)
    single = bool((targets.sum(axis=1) == 1).all())
    return LabelTable(images, [c.strip() for c in label_cols], targets, single_label=single)


def _auc_or_none(truth: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score  # imported when used: the CLI loads without it
    if truth.min() == truth.max():
        return None
    return float(roc_auc_score(truth, score))


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def accuracy(targets: np.ndarray, logits: np.ndarray, single_label: bool) -> float:
    """Argmax accuracy (single label) or mean per-label accuracy at sigmoid >= 0.5 (multi-label)."""
    from sklearn.metrics import accuracy_score  # imported when used: the CLI loads without it
    if single_label:
        return float(accuracy_score(targets.argmax(axis=1), logits.argmax(axis=1)))
    predicted = (_sigmoid(logits) >= 0.5).astype(int)
    return float(np.mean([accuracy_score(targets[:, c], predicted[:, c]) for c in range(targets.shape[1])]))


def per_class_auc(targets: np.ndarray, logits: np.ndarray) -> list[float | None]:
    """One-vs-rest AUC of sigmoid(logit) per label (ranked by the logit); None where only one class is present."""
    return [_auc_or_none(targets[:, c], logits[:, c]) for c in range(targets.shape[1])]


def macro_auc(aucs: Sequence[float | None]) -> float | None:
    """Mean over the labels that have an AUC (None if none has)."""
    defined = [a for a in aucs if a is not None]
    return float(np.mean(defined)) if defined else None


def bootstrap_intervals(targets: np.ndarray, logits: np.ndarray, single_label: bool, n_resamples: int = 1000,
                        seed: int = 0, level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals (images resampled with replacement) for accuracy, each AUC and macro AUC.

    A resample where a label has one class only contributes no AUC for that label; an interval
    built from fewer than half the resamples is reported as None.
    """
    rng = np.random.default_rng(seed)
    n, n_labels = targets.shape
    acc, macro, per = [], [], [[] for _ in range(n_labels)]
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        acc.append(accuracy(targets[idx], logits[idx], single_label))
        aucs = per_class_auc(targets[idx], logits[idx])
        for c, value in enumerate(aucs):
            if value is not None:
                per[c].append(value)
        if (m := macro_auc(aucs)) is not None:
            macro.append(m)
    tail = (1 - level) / 2 * 100

    def interval(values: list[float]) -> list[float] | None:
        if len(values) < n_resamples / 2:
            return None
        return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]

    out = {"accuracy": interval(acc), "macro_auc": interval(macro)}
    out.update({f"auc:{c}": interval(values) for c, values in enumerate(per)})
    return out


def zeroshot_metrics(table: LabelTable, logits: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Everything ``metrics.json`` holds for a zero-shot run; ``logits`` columns follow ``table.labels``."""
    targets, labels = table.targets, table.labels
    aucs = per_class_auc(targets, logits)
    cis = bootstrap_intervals(targets, logits, table.single_label, n_resamples, seed)
    per_class = {}
    for c, label in enumerate(labels):
        positives = int(targets[:, c].sum())
        entry = {"auc": aucs[c], "auc_ci95": cis[f"auc:{c}"], "positives": positives,
                 "negatives": int(len(targets) - positives)}
        if aucs[c] is None:
            entry["note"] = f"only {'positive' if positives else 'negative'} examples: AUC is undefined"
        per_class[label] = entry
    return {
        "task_type": "single-label" if table.single_label else "multi-label",
        "n_images": int(len(targets)),
        "labels": list(labels),
        "accuracy": accuracy(targets, logits, table.single_label),
        "accuracy_ci95": cis["accuracy"],
        "accuracy_definition": "argmax over labels" if table.single_label
        else "mean per-label accuracy of sigmoid(logit) >= 0.5",
        "macro_auc": macro_auc(aucs),
        "macro_auc_ci95": cis["macro_auc"],
        "per_class": per_class,
        "confusion_matrix": {"labels": list(labels), "rows": "true label", "columns": "predicted label",
                             **_confusion(targets, logits, table.single_label)},
        "bootstrap": {"resamples": n_resamples, "seed": seed, "level": 0.95},
        "auc_score": "sigmoid(logit), one-vs-rest (MedCLIP's evaluator)",
    }


def _confusion(targets: np.ndarray, logits: np.ndarray, single_label: bool) -> dict:
    """Rows = truth, columns = prediction; per label 2x2 [[TN, FP], [FN, TP]] for multi-label data."""
    from sklearn.metrics import confusion_matrix  # imported when used: the CLI loads without it
    if single_label:
        matrix = confusion_matrix(targets.argmax(axis=1), logits.argmax(axis=1), labels=range(targets.shape[1]))
        return {"matrix": matrix.tolist()}
    predicted = (_sigmoid(logits) >= 0.5).astype(int)
    return {"per_label": [confusion_matrix(targets[:, c], predicted[:, c], labels=[0, 1]).tolist()
                          for c in range(targets.shape[1])]}


def roc_curves(table: LabelTable, logits: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """label -> (false positive rates, true positive rates, AUC) for labels where AUC is defined."""
    from sklearn.metrics import roc_curve  # imported when used: the CLI loads without it
    curves = {}
    for c, label in enumerate(table.labels):
        auc = _auc_or_none(table.targets[:, c], logits[:, c])
        if auc is not None:
            fpr, tpr, _ = roc_curve(table.targets[:, c], logits[:, c])  # same curve as sigmoid(logit), no ties
            curves[label] = (fpr, tpr, auc)
    return curves


# --- report text metrics -----------------------------------------------------------------------

def read_report_table(path: str | Path) -> tuple[list[str], list[str]]:
    """(image paths, reference reports) from a CSV with an image column and a report column."""
    path = Path(path)
    rows = _sniff_rows(path)
    columns = list(rows[0].keys())
    image_col = _pick(columns, IMAGE_COLUMNS, 0)
    report_col = _pick([c for c in columns if c != image_col], REPORT_COLUMNS, 0)
    if report_col is None:
        raise BadInputError(f"{path}: expected an image column and a reference report column")
    images = [(row[image_col] or "").strip() for row in rows]
    reports = [(row[report_col] or "").strip() for row in rows]
    if any(not i for i in images) or any(not r for r in reports):
        raise BadInputError(f"{path}: every row needs an image path and a non-empty reference report")
    return images, reports


def _bleu(order: int, sentence: bool):
    from sacrebleu.metrics import BLEU  # deferred: only report evaluation needs it

    # Cumulative BLEU-n (uniform weights over 1..n-grams), as captioning papers report it;
    # sentence scores use effective order so a short text without 4-grams is not zeroed.
    return BLEU(max_ngram_order=order, lowercase=True, effective_order=sentence)


def report_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """BLEU-1..4 (sacrebleu, lowercased, 13a tokens, on a 0-1 scale) and ROUGE-L F1 (rouge_score, stemmed).

    ``overall``: corpus BLEU over all pairs and the mean ROUGE-L; ``per_item``: sentence-level scores.
    """
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references) or not hypotheses:
        raise BadInputError("report metrics need as many generated reports as references (and at least one)")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references, strict=True)]
    overall = {f"bleu{n}": _bleu(n, False).corpus_score(list(hypotheses), [list(references)]).score / 100
               for n in range(1, 5)}
    overall["rougeL"] = float(np.mean(rouge))
    sentence_bleu = {n: _bleu(n, True) for n in range(1, 5)}  # built once, not per report
    per_item = []
    for hyp, ref, rouge_l in zip(hypotheses, references, rouge, strict=True):
        item = {f"bleu{n}": bleu.sentence_score(hyp, [ref]).score / 100 for n, bleu in sentence_bleu.items()}
        item["rougeL"] = rouge_l
        per_item.append(item)
    return {"overall": overall, "per_item": per_item,
            "settings": {"bleu": "sacrebleu cumulative BLEU-n, lowercase, 13a tokenizer, exp smoothing, 0-1 scale",
                         "rougeL": "rouge_score rougeL F-measure with Porter stemmer"}}
