"""PNG charts with matplotlib's Agg backend (no display, no pyplot global state: safe in a web server).

Every function returns PNG bytes and, given ``path``, also writes them there.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DISCLAIMER = "Research and education only - not a diagnosis"
MAX_PANELS = 12


def _render(fig: Figure, path: str | Path | None) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def _score_panel(ax, labels: Sequence[str], probabilities: Sequence[float], scores: Sequence[float] | None,
                 predicted: str, title: str) -> None:
    """Probability and score bars per label; ``scores`` None: one bar of per-label probabilities (MedKLIP)."""
    y = np.arange(len(labels))
    height = 0.38 if scores is not None else 0.6
    shift = height / 2 if scores is not None else 0.0
    meaning = "probability (softmax across labels)" if scores is not None else "probability present (per label)"
    ax.barh(y - shift, probabilities, height, label=meaning, color="#3b75af")
    for i, p in enumerate(probabilities):
        ax.text(p + 0.01, i - shift, f"{p:.2f}", va="center", fontsize=8)
    if scores is not None:
        ax.barh(y + shift, scores, height, label="score (sigmoid of logit)", color="#ef8636")
        for i, s in enumerate(scores):
            ax.text(s + 0.01, i + shift, f"{s:.2f}", va="center", fontsize=8)
    ax.set_yticks(y, [f"{label}  \u25c0" if label == predicted else label for label in labels])
    ax.invert_yaxis()  # first label at the top
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("value (0-1)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def score_chart(results: Sequence, titles: Sequence[str] | None = None, path: str | Path | None = None) -> bytes:
    """Horizontal bars of probability and score per label, one panel per result (ZeroShotResult-like).

    The predicted label is marked with a triangle. At most 12 panels are drawn.
    """
    results = list(results)[:MAX_PANELS]
    titles = list(titles or [f"image {i + 1}" for i in range(len(results))])
    n_labels = max(len(r.labels) for r in results)
    fig = Figure(figsize=(7.5, (0.55 * n_labels + 1.2) * len(results) + 0.6), layout="constrained")
    axes = fig.subplots(len(results), 1, squeeze=False)[:, 0]
    for ax, result, title in zip(axes, results, titles, strict=False):
        scores = result.scores if result.across_labels else None  # MedKLIP: scores equal its probabilities
        _score_panel(ax, result.labels, result.probabilities, scores, result.predicted,
                     f"{title}: predicted {result.predicted}")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Zero-shot scores ({DISCLAIMER})", fontsize=10)
    return _render(fig, path)


def roc_chart(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path: str | Path | None = None) -> bytes:
    """ROC curve per label with its AUC in the legend; the diagonal marks chance."""
    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})", linewidth=1.6)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC per label (one-vs-rest)" if curves else "ROC: no label has both classes present")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _render(fig, path)


def auc_chart(per_class: Mapping[str, Mapping], macro: float | None = None, path: str | Path | None = None) -> bytes:
    """Bar per label of its AUC with the bootstrap 95% interval; labels without an AUC are shown as 'n/a'."""
    labels = list(per_class)
    fig = Figure(figsize=(max(5.0, 1.1 * len(labels) + 2), 4.5))
    ax = fig.subplots()
    x = np.arange(len(labels))
    values = [per_class[label]["auc"] or 0.0 for label in labels]
    bars = ax.bar(x, values, color="#3b75af")
    for i, label in enumerate(labels):
        entry = per_class[label]
        if entry["auc"] is None:
            ax.text(i, 0.3, "n/a\n(one class\nonly)", ha="center", va="center", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none"})  # above the legend, over the chance line
            bars[i].set_alpha(0.0)
            continue
        ci = entry.get("auc_ci95")
        if ci:
            ax.errorbar(i, entry["auc"], yerr=[[entry["auc"] - ci[0]], [ci[1] - entry["auc"]]], color="black",
                        capsize=4)
        ax.text(i + 0.06, entry["auc"] + 0.01, f"{entry['auc']:.3f}", ha="left", va="bottom", fontsize=8)
    ax.axhline(0.5, linestyle="--", color="grey", linewidth=1)
    if macro is not None:
        ax.axhline(macro, color="#ef8636", linewidth=1.2, label=f"macro AUC {macro:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("AUC (bars: bootstrap 95% CI)")
    ax.set_title("AUC per label")
    return _render(fig, path)


def loss_chart(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]] = (),
               path: str | Path | None = None, ylabel: str = "training loss") -> bytes:
    """Training loss per optimiser step, with the validation loss at the end of each epoch."""
    return _render(loss_figure(train, val, ylabel), path)


def loss_figure(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]] = (),
                ylabel: str = "training loss") -> Figure:
    """The figure :func:`loss_chart` renders."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    steps, losses = zip(*train, strict=True) if train else ((), ())
    ax.plot(steps, losses, color="#1f77b4", linewidth=1.2, label="training loss")
    if val:
        val_steps, val_losses = zip(*val, strict=True)
        ax.plot(val_steps, val_losses, "o-", color="#d62728", label="validation loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8)  # below the axes: covers no line
    ax.set_title("Fine-tuning loss")
    fig.subplots_adjust(bottom=0.28)
    return fig


def curve_chart(series: Mapping[str, Sequence[tuple[int, float]]], ylabel: str, title: str,
                path: str | Path | None = None, max_named: int = 10) -> bytes:
    """One line per named series of (step, value) points, the first drawn bold; the legend sits to the right,
    outside the axes. Past ``max_named`` series the others are faint grey lines under one legend entry."""
    fig = Figure(figsize=(7.6, 4.0))
    ax = fig.add_subplot()
    items = [(name, points) for name, points in series.items() if points]
    crowded = len(items) - 1 > max_named
    for i, (name, points) in enumerate(items):
        steps, values = zip(*points, strict=True)
        if i == 0 or not crowded:
            ax.plot(steps, values, "o-", linewidth=2.4 if i == 0 else 1.0, markersize=3, label=name, zorder=3)
        else:
            ax.plot(steps, values, "-", color="0.6", alpha=0.4, linewidth=0.8,
                    label=f"each of the {len(items) - 1} labels" if i == 1 else None)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7)
    fig.subplots_adjust(right=0.7)
    return _render(fig, path)


def f1_chart(per_observation: Mapping[str, Mapping], micro: float, macro: float, title: str = "CheXbert F1",
             path: str | Path | None = None) -> bytes:
    """Horizontal bar per observation of its F1 with its support (reference positives); micro/macro as lines."""
    names = list(per_observation)
    values = [per_observation[name]["f1"] for name in names]
    fig = Figure(figsize=(7, 0.38 * len(names) + 1.6))
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y, values, color="#3b75af")
    for i, name in enumerate(names):
        ax.text(values[i] + 0.01, i, f"{values[i]:.2f} (n={per_observation[name]['support']})", va="center",
                fontsize=8)
    ax.axvline(micro, color="#ef8636", linewidth=1.2, label=f"micro F1 {micro:.3f}")
    ax.axvline(macro, color="#2ca02c", linewidth=1.2, linestyle="--", label=f"macro F1 {macro:.3f}")
    ax.set_yticks(y, names)
    ax.invert_yaxis()  # CheXbert's order from the top
    ax.set_xlim(0, 1.2)
    ax.set_xlabel("F1 (positive or uncertain = 1); n = positives in the references")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)  # below: no bar is hidden
    ax.grid(axis="x", alpha=0.3)
    return _render(fig, path)
