"""What a run writes: checkpoints (atomically), ``metrics.jsonl``, the loss curve and the summary."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..charts import curve_chart, loss_chart
from ..errors import XrayGPTError

log = logging.getLogger(__name__)


class TrainingError(XrayGPTError):
    """Training stopped (disk full, out of memory...); the message says why and names the last good checkpoint."""

    exit_code = 1


def save_atomically(obj: Any, path: Path, last_good: Path | None) -> None:
    """``torch.save`` to a temporary file, then rename: a failed write never replaces a good checkpoint."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        what = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        keep = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
        raise TrainingError(f"Could not write the checkpoint {path}: {what}; {keep}.") from None


def save_folder_atomically(write: Any, folder: Path) -> None:
    """Write a folder (a peft adapter) beside ``folder``, then swap it in."""
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        write(temporary)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(temporary, folder)
    except OSError as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        raise TrainingError(f"Could not write the adapter {folder}: {exc.strerror or exc}.") from None


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by a run (or XrayGPT's own), read safely (tensors and plain data only)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"--resume: checkpoint not found: {path}") from None
    except Exception as exc:  # torch raises many types for damaged or unsafe files
        raise TrainingError(f"--resume: cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or "model" not in data:
        raise TrainingError(f"--resume: {path} is not a {{'model': ..., 'optimizer': ...}} checkpoint")
    return data


class MetricsLog:
    """``metrics.jsonl``: one JSON object per optimiser step (``type: train``) or validation (``type: val``)."""

    def __init__(self, path: Path, resume_from_step: int | None = None):
        self.path = path
        if resume_from_step is None:
            path.write_text("", encoding="utf-8")
        elif path.is_file():  # keep the steps before the resume point, drop any logged after it
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_from_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]


def write_loss_curve(metrics: MetricsLog, path: Path, ylabel: str = "training loss") -> None:
    """The training loss per step and the validation loss per epoch, as a PNG."""
    records = metrics.records()
    train = [(r["step"], r["loss"]) for r in records if r["type"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r["type"] == "val"]
    if train:
        loss_chart(train, val, path=path, ylabel=ylabel)


def write_curves(metrics: MetricsLog, output_dir: Path, loss_name: str = "training loss") -> None:
    """``loss_curve.png``, and ``auc_curve.png`` when the family logs validation AUCs (zero-shot models)."""
    write_loss_curve(metrics, output_dir / "loss_curve.png", loss_name)
    points = [r for r in metrics.records() if r["type"] == "val_metrics" and "auc" in r]
    if points:
        series = {"macro AUC": [(r["step"], r["macro_auc"]) for r in points if r["macro_auc"] is not None]}
        for name in points[-1]["auc"]:
            series[name] = [(r["step"], r["auc"][name]) for r in points if r["auc"].get(name) is not None]
        curve_chart(series, "validation AUC", "Validation AUC per epoch (step 0: the starting model)",
                    path=output_dir / "auc_curve.png")
