"""docs/fine-tuning.md's llava-family commands run as written: build the tiny model, stage 1, stage 2, ask, serve.

They run in a scratch copy of the layout they expect (``eval_configs/``, ``train_configs/`` and
``tests/`` of this repository, ``../shared`` beside it, ``.venv/bin/python`` and ``.venv/bin/xraygpt``
calling this interpreter), never in the repository.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _readme import REPO, run_readme_section, served_model_line, venv_scripts


@pytest.fixture
def layout(tmp_path: Path, shared_dir: Path) -> Path:
    (tmp_path / "shared").symlink_to(shared_dir)
    repo = tmp_path / "repo"
    venv_scripts(repo)
    for name in ("eval_configs", "train_configs"):  # copied: their relative paths point into this layout
        shutil.copytree(REPO / name, repo / name)
    (repo / "tests").symlink_to(REPO / "tests")
    return repo


def test_readme_llava_commands_run_as_written(layout: Path) -> None:
    done, serve, env = run_readme_section("docs/fine-tuning.md", "## The llava family: stage 1 and stage 2", layout,
                                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (layout / "output" / "llava_tiny_stage1" / "checkpoint_1.pth").is_file()
    assert (layout / "output" / "llava_tiny_stage2" / "lora_adapter_1" / "adapter_config.json").is_file()
    assert "model: LLaVA-style" in done.stderr and done.stdout.count("Question: ") == 2
    line = served_model_line(serve, layout, env)
    assert "projector llava_tiny_stage2/checkpoint_1.pth" in line and "LoRA lora_adapter_1" in line
