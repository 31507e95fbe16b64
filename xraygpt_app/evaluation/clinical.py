"""Clinical efficacy of generated reports: CheXbert F1 as f1chexbert 0.0.2 computes it, with bootstrap intervals.

Pure functions of CheXbert class indices (see :mod:`.chexbert`); no model, no torch. The point
values are scikit-learn's ``classification_report`` over the 14 observations and over the
five of the CheXpert competition, and ``accuracy_score`` on the five (a report counts only when
all five agree), in the ``rrg`` convention: positive or uncertain is 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, classification_report

from .chexbert import CONDITIONS, FIVE_CONDITIONS, classification_labels, rrg_labels

FIVE_INDEX = [CONDITIONS.index(name) for name in FIVE_CONDITIONS]
SUMMARY_KEYS = ("micro_f1_14", "macro_f1_14", "micro_f1_5", "macro_f1_5", "accuracy_5")
RESAMPLE_CHUNK = 100  # resamples scored at once: bounds the (chunk, reports, 14) boolean array


def _report(refs: np.ndarray, hyps: np.ndarray, names: Sequence[str]) -> dict:
    # zero_division=0 is the value the reference's default ("warn") gives, without the warnings
    return classification_report(refs, hyps, target_names=list(names), output_dict=True, zero_division=0)


def f1_scores(refs: np.ndarray, hyps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(micro F1, macro F1) per leading index of (..., reports, labels) 0/1 arrays; 0 where undefined.

    The same numbers as scikit-learn's micro and macro averages with zero_division=0 (tested),
    vectorised over bootstrap resamples.
    """
    refs, hyps = refs.astype(bool), hyps.astype(bool)
    tp = (refs & hyps).sum(axis=-2)
    errors = (refs ^ hyps).sum(axis=-2)  # false positives + false negatives
    micro_den = 2 * tp.sum(axis=-1) + errors.sum(axis=-1)
    micro = np.divide(2 * tp.sum(axis=-1), micro_den, out=np.zeros(micro_den.shape), where=micro_den > 0)
    per_den = 2 * tp + errors
    per = np.divide(2 * tp, per_den, out=np.zeros(per_den.shape), where=per_den > 0)
    return micro, per.mean(axis=-1)


def _resampled(refs: np.ndarray, hyps: np.ndarray, n_resamples: int, seed: int) -> dict[str, np.ndarray]:
    """Every summary metric on ``n_resamples`` bootstrap resamples of the reports."""
    rng = np.random.default_rng(seed)
    n = len(refs)
    values: dict[str, list[np.ndarray]] = {key: [] for key in SUMMARY_KEYS}
    for start in range(0, n_resamples, RESAMPLE_CHUNK):
        idx = rng.integers(0, n, (min(RESAMPLE_CHUNK, n_resamples - start), n))
        r, h = refs[idx], hyps[idx]
        for suffix, cols in (("14", slice(None)), ("5", FIVE_INDEX)):
            micro, macro = f1_scores(r[..., cols], h[..., cols])
            values[f"micro_f1_{suffix}"].append(micro)
            values[f"macro_f1_{suffix}"].append(macro)
        values["accuracy_5"].append((r[..., FIVE_INDEX] == h[..., FIVE_INDEX]).all(axis=-1).mean(axis=-1))
    return {key: np.concatenate(parts) for key, parts in values.items()}


def chexbert_metrics(reference_classes: Sequence[Sequence[int]], generated_classes: Sequence[Sequence[int]],
                     n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """The ``chexbert`` section of ``metrics.json`` from both sides' CheXbert class indices.

    Summary values with percentile bootstrap intervals (reports resampled with replacement),
    per-observation precision/recall/F1/support, scikit-learn's reports verbatim (the reference's
    output) and every report's labels in both conventions.
    """
    if len(reference_classes) != len(generated_classes) or not reference_classes:
        raise ValueError("CheXbert F1 needs as many generated reports as references (and at least one)")
    refs, hyps = np.array(rrg_labels(reference_classes)), np.array(rrg_labels(generated_classes))
    report_14 = _report(refs, hyps, CONDITIONS)
    report_5 = _report(refs[:, FIVE_INDEX], hyps[:, FIVE_INDEX], FIVE_CONDITIONS)
    per_report_5 = (refs[:, FIVE_INDEX] == hyps[:, FIVE_INDEX]).all(axis=1)
    point = {"micro_f1_14": report_14["micro avg"]["f1-score"], "macro_f1_14": report_14["macro avg"]["f1-score"],
             "micro_f1_5": report_5["micro avg"]["f1-score"], "macro_f1_5": report_5["macro avg"]["f1-score"],
             "accuracy_5": float(accuracy_score(refs[:, FIVE_INDEX], hyps[:, FIVE_INDEX]))}
    tail = (1 - level) / 2 * 100
    resampled = _resampled(refs, hyps, n_resamples, seed)
    out: dict = {}
    for key in SUMMARY_KEYS:
        out[key] = float(point[key])
        low, high = np.percentile(resampled[key], [tail, 100 - tail])
        out[f"{key}_ci95"] = [float(low), float(high)]
    out["per_observation"] = {name: {"precision": report_14[name]["precision"], "recall": report_14[name]["recall"],
                                     "f1": report_14[name]["f1-score"], "support": int(report_14[name]["support"])}
                              for name in CONDITIONS}
    out.update({
        "n_reports": len(refs),
        "observations": list(CONDITIONS),
        "observations_5": list(FIVE_CONDITIONS),
        "classification_report_14": report_14,
        "classification_report_5": report_5,
        "per_report_accuracy_5": per_report_5.astype(float).tolist(),
        "labels": {"convention": "rrg: 1 = positive or uncertain, 0 = negative or blank (used for F1)",
                   "references": refs.tolist(), "generated": hyps.tolist(),
                   "classification_convention": "CheXbert's: '' blank, 1 positive, 0 negative, -1 uncertain",
                   "references_classification": classification_labels(reference_classes),
                   "generated_classification": classification_labels(generated_classes)},
        "bootstrap": {"resamples": n_resamples, "seed": seed, "level": level, "unit": "report pairs"},
        "definition": "f1chexbert 0.0.2: CheXbert labels, scikit-learn classification_report and accuracy_score",
    })
    return out
