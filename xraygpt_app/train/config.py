"""The ``train:`` section of a config: XrayGPT's run settings as typed fields (unknown keys are errors).

A training config is a model config (the sections of ``eval_configs/*.yaml``) plus ``train:``.
Defaults are ``train_configs/xraygpt_openi_finetune.yaml`` of XrayGPT, so any eval config trains
as XrayGPT would; ``train_configs/`` holds ours.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, config_from_raw
from ..errors import ConfigError
from ..yamlconfig import build_section, read_raw_config

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
QUANTIZATIONS = ("none", "8bit", "4bit")


@dataclass
class LoraSettings:
    """LoRA adapters on the LLM (peft); off by default, as XrayGPT trains ``llama_proj`` only."""

    enabled: bool = False
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class TrainConfig:
    """XrayGPT's model and run settings for fine-tuning, plus ours (marked)."""

    # ours: which model trains
    model: str | None = None  # a zeroshot.models name (finetune --model NAME); None: the config's model.family
    # XrayGPT's model section
    max_txt_len: int = 160
    end_sym: str = "###"
    prompt_template: str = "###Patient: {} ###Doctor: "
    instructions: str | None = None  # an alignment.txt-style file; None: XrayGPT's list (shipped)
    train_qformer: bool = False  # XrayGPT: freeze_qformer True
    # ours: LoRA / QLoRA and memory
    lora: LoraSettings = field(default_factory=LoraSettings)
    quantization: str = "none"  # QLoRA base: none | 8bit | 4bit (CUDA only)
    gradient_checkpointing: bool = True  # when the LLM trains (LoRA)
    # XrayGPT's run section (LAVIS runner, linear_warmup_cosine_lr)
    init_lr: float = 3e-5
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 200
    weight_decay: float = 0.05
    max_epoch: int = 1
    iters_per_epoch: int | None = None  # XrayGPT: 2501; None: one pass over the training rows
    batch_size: int = 1  # per process
    grad_accum_steps: int = 1
    seed: int = 42
    precision: str = "auto"  # auto (fp16 + grad scaler on CUDA, fp32 on CPU) | fp16 | bf16 | fp32
    num_workers: int = 0
    output_dir: str = "output/xraygpt_finetune"
    # ours: data and reporting
    augment: bool = True  # blip2_image_train's random crop; false: the eval transform
    val_fraction: float = 0.1  # held out by seed when no --val file is given
    max_grad_norm: float | None = None  # XrayGPT does not clip
    report_samples: int = 32  # validation rows whose generated reports are scored at the end (0: none)
    report_max_new_tokens: int = 100

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_train_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, TrainConfig]:
    """A model config and its ``train:`` section, overrides applied to both (``--set train.batch_size=2``)."""
    path = Path(path)
    raw = read_raw_config(path, overrides)
    train_raw = raw.pop("train", None)
    config = config_from_raw(raw, path)
    train = build_section(TrainConfig, train_raw, str(path), "train")
    for name in ("instructions", "output_dir"):  # relative to the config file, like weights paths
        value = getattr(train, name)
        if value and name in (train_raw or {}) and not Path(value).is_absolute():
            setattr(train, name, str((path.parent / value).resolve()))
    validate_train_config(train, str(path))
    return config, train


def validate_train_config(train: TrainConfig, source: str) -> None:
    """Cross-field checks a type hint cannot express."""
    if train.precision not in PRECISIONS:
        raise ConfigError(f"{source}: train.precision must be one of {', '.join(PRECISIONS)}")
    if train.quantization not in QUANTIZATIONS:
        raise ConfigError(f"{source}: train.quantization must be one of {', '.join(QUANTIZATIONS)}")
    if train.quantization != "none" and not train.lora.enabled:
        raise ConfigError(f"{source}: train.quantization (QLoRA) needs train.lora.enabled: true")
    positive = {"batch_size": train.batch_size, "grad_accum_steps": train.grad_accum_steps,
                "max_epoch": train.max_epoch, "max_txt_len": train.max_txt_len, "lora.rank": train.lora.rank}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{source}: train.{name} must be at least 1")
    if train.iters_per_epoch is not None and train.iters_per_epoch < 1:
        raise ConfigError(f"{source}: train.iters_per_epoch must be at least 1 (or null)")
    if not 0 <= train.val_fraction < 1:
        raise ConfigError(f"{source}: train.val_fraction must be in [0, 1)")
    if not 0 <= train.min_lr <= train.init_lr or train.warmup_lr < 0 or train.warmup_steps < 0:
        raise ConfigError(f"{source}: need 0 <= min_lr <= init_lr, warmup_lr >= 0 and warmup_steps >= 0")
    if "{}" not in train.prompt_template:
        raise ConfigError(f"{source}: train.prompt_template must hold {{}} for the instruction")
