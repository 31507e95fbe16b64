"""docs/fine-tuning.md's XrayGPT commands run as written: a data folder, two runs, --loss-only, and serve.

They run in a scratch copy of the layout they expect (``eval_configs/`` of this repository,
``../shared`` beside it, ``.venv/bin/xraygpt`` calling this interpreter), never in the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _readme import REPO, run_readme_section, served_model_line, venv_scripts


@pytest.fixture
def layout(tmp_path: Path, shared_dir: Path) -> Path:
    (tmp_path / "shared").symlink_to(shared_dir)
    repo = tmp_path / "repo"
    venv_scripts(repo)
    (repo / "eval_configs").symlink_to(REPO / "eval_configs")
    (repo / "train_configs").symlink_to(REPO / "train_configs")
    return repo


def test_readme_finetune_commands_run_as_written(layout: Path) -> None:
    done, serve, env = run_readme_section("docs/fine-tuning.md", "## XrayGPT on your own pairs", layout, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (layout / "runs" / "tiny" / "checkpoint_1.pth").is_file()
    report = json.loads((layout / "runs" / "tiny" / "report_metrics.json").read_text(encoding="utf-8"))
    assert set(report["overall"]) == {"bleu1", "bleu2", "bleu3", "bleu4", "rougeL"} and len(report["reports"]) == 1
    assert (layout / "runs" / "tiny" / "loss_curve.png").is_file()
    plain, lora = (_val_losses(layout / "runs" / run / "metrics.jsonl") for run in ("tiny", "tiny_lora"))
    assert plain[-1] < plain[0]  # the demo schedule leaves warm-up: the validation loss falls
    # (LoRA's own validation loss moves ~1e-4 relative in these six steps, up or down between runs: noise)
    assert abs(lora[-1] - plain[-1]) > 1e-4 * plain[-1]  # LoRA learns something the projection alone does not
    assert "inside warm-up" not in done.stderr
    assert (layout / "runs" / "tiny_lora" / "lora_adapter_1" / "adapter_config.json").is_file()
    loss_only = json.loads(done.stdout[done.stdout.rindex('{\n  "batches"'):])
    assert len(loss_only["batches"]) == 2 and loss_only["rows"] == 4
    line = served_model_line(serve, layout, env)
    assert "checkpoint tiny_lora/checkpoint_1.pth" in line and "LoRA lora_adapter_1" in line



def _val_losses(path: Path) -> list[float]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [r["val_loss"] for r in records if r["type"] == "val"]
