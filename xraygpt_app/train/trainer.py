"""The fine-tuning loop, on ``accelerate``: ``accelerate launch`` runs the same command as DDP.

>>> from xraygpt_app.train.trainer import Trainer
>>> trainer = Trainer.from_config("train_configs/xraygpt_openi_finetune.yaml", data="dataset/openi")
>>> result = trainer.fit()          # checkpoints, metrics.jsonl, loss curve, report metrics
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import Config
from ..errors import ConfigError
from ..families.registry import family_spec
from .batches import RunBatches, iteration_seed
from .config import TrainConfig, load_train_config
from .data import Sample, split_samples
from .evaluate import validation_loss
from .family import TrainableFamily
from .outputs import MetricsLog, TrainingError, load_checkpoint, save_atomically, write_curves
from .schedule import build_optimizer, learning_rate, set_learning_rate

log = logging.getLogger(__name__)


# zeroshot.models.<name>.kind -> "module:class" of its trainable (``train.model`` / ``finetune --model NAME``)
ZEROSHOT_TRAINABLES = {"medclip-vit": "xraygpt_app.train.zeroshot_objectives:MedCLIPTrainable",
                       "medclip-resnet": "xraygpt_app.train.zeroshot_objectives:MedCLIPTrainable",
                       "biomedclip": "xraygpt_app.train.zeroshot_objectives:BiomedCLIPTrainable",
                       "medklip": "xraygpt_app.train.medklip_objective:MedKLIPTrainable"}


def trainable_class(config: Config, train: TrainConfig) -> type[TrainableFamily]:
    """The trainable class of ``train.model`` (a zero-shot model) if set, else of the config's ``model.family``."""
    if train.model is None:
        return family_spec(config.model.family).load("trainable")  # the config has checked the name
    models = config.zeroshot.models
    if train.model not in models:
        raise ConfigError(f"{config.source}: --model / train.model {train.model!r} is not a zeroshot.models entry"
                          f" (configured: {', '.join(models) or 'none'})")
    kind = models[train.model].kind
    if kind not in ZEROSHOT_TRAINABLES:
        raise ConfigError(f"fine-tuning is not available for zero-shot kind {kind!r} yet"
                          f" (trainable kinds: {', '.join(ZEROSHOT_TRAINABLES)})")
    module, name = ZEROSHOT_TRAINABLES[kind].split(":")
    return getattr(importlib.import_module(module), name)


class _StopRequested(Exception):
    """Ctrl-C, or ``fit(stop_after=...)`` reached: save at this optimiser step and stop."""


class _CtrlC:
    """The first Ctrl-C stops the loop after the current optimiser step (which is then saved); a second at once."""

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: finishing this step, then saving a checkpoint (press Ctrl-C again to stop at once)")


@dataclass
class RunResult:
    iterations_done: int
    checkpoint: Path | None  # the last checkpoint written
    interrupted: bool
    output_dir: Path
    val_loss: float | None = None
    report_metrics: dict | None = None  # the family's end-of-run evaluation (report metrics, AUC before/after)
    export: Path | None = None  # what the last epoch wrote beside its checkpoint (adapter, released-format folder)


@dataclass
class _Run:
    """Everything one ``fit`` call carries from step to step."""

    model: nn.Module  # the family as accelerate prepared it (DDP-wrapped across processes)
    optimizer: torch.optim.Optimizer
    metrics: MetricsLog | None = None
    progress: tqdm | None = None
    ctrl_c: _CtrlC | None = None
    stop_after: int | None = None  # stop (as if interrupted) once this iteration is reached
    iteration: int = 0  # next iteration to run
    step: int = 0  # optimiser steps done
    last_checkpoint: Path | None = None
    last_export: Path | None = None
    window: _Window = field(default_factory=lambda: _Window())


def make_accelerator(config: Config, train: TrainConfig) -> Accelerator:
    """The accelerator for this machine; sets ``runtime.device``/``mode`` so the model loads where it trains."""
    cuda = torch.cuda.is_available() and config.runtime.device != "cpu"
    precision = train.precision if train.precision != "auto" else ("fp16" if cuda else "fp32")
    if train.quantization != "none" and not cuda:
        raise ConfigError("QLoRA (train.quantization 8bit/4bit) needs a CUDA GPU; on the CPU train with"
                          " train.quantization: none (llama_proj, Q-Former or plain LoRA)")
    if precision == "fp16" and not cuda:
        raise ConfigError("train.precision fp16 needs a CUDA GPU; on the CPU use fp32 (or bf16)")
    accelerator = Accelerator(cpu=not cuda, mixed_precision="no" if precision == "fp32" else precision)
    config.runtime.device = str(accelerator.device)
    config.runtime.mode = train.quantization if train.quantization != "none" else precision
    return accelerator


class Trainer:
    """One fine-tuning run: a model family, its data, the accelerator and an output folder."""

    def __init__(self, config: Config, train: TrainConfig, family: TrainableFamily, accelerator: Accelerator,
                 train_samples: list[Sample], val_samples: list[Sample], output_dir: Path, skipped: int = 0):
        self.config, self.train, self.family, self.accelerator = config, train, family, accelerator
        self.train_samples, self.val_samples, self.skipped = train_samples, val_samples, skipped
        self.output_dir = output_dir
        world = accelerator.num_processes
        self.iters_per_epoch = train.iters_per_epoch or math.ceil(len(train_samples) / (train.batch_size * world))
        self.total_iterations = train.max_epoch * self.iters_per_epoch

    @classmethod
    def from_config(cls, config: str | Path | tuple[Config, TrainConfig], data: str | Path,
                    val: str | Path | None = None, overrides: tuple[str, ...] | list[str] = (),
                    output: str | Path | None = None, skip_bad: bool = False) -> Trainer:
        """Read the config and the data (every row checked), load the model family, pick the output folder."""
        config, train = config if isinstance(config, tuple) else load_train_config(config, overrides)
        accelerator = make_accelerator(config, train)
        family_class = trainable_class(config, train)
        rows = family_class.read_data(data, skip_bad=skip_bad, limits=config.image)
        skipped = len(rows.skipped)
        if val is not None:
            val_rows = family_class.read_data(val, skip_bad=skip_bad, limits=config.image)
            train_samples, val_samples, skipped = rows.samples, val_rows.samples, skipped + len(val_rows.skipped)
        else:
            train_samples, val_samples = split_samples(rows.samples, train.val_fraction, train.seed)
        log.info("data: %d training rows, %d validation rows, %d skipped", len(train_samples), len(val_samples),
                 skipped)
        model = family_class.from_config(config, train)
        output_dir = Path(output or train.output_dir).resolve()  # printed paths work from anywhere
        output_dir.mkdir(parents=True, exist_ok=True)
        return cls(config, train, model, accelerator, train_samples, val_samples, output_dir, skipped)

    # --- the run ----------------------------------------------------------------------------------
    def fit(self, resume: str | Path | None = None, stop_after: int | None = None) -> RunResult:
        """Train to the end (or to iteration ``stop_after``, as if interrupted there); returns what was written."""
        acc = self.accelerator
        model = acc.prepare_model(self.family, device_placement=False)
        optimizer = acc.prepare_optimizer(build_optimizer(self.family.named_trainable(), self.train))
        run = _Run(model, optimizer, stop_after=stop_after)
        if self.total_iterations <= self.train.warmup_steps:
            log.warning("this run ends inside warm-up (%d iterations, train.warmup_steps %d): the learning rate never"
                        " reaches train.init_lr %g and the model barely changes; lower train.warmup_steps or train"
                        " longer", self.total_iterations, self.train.warmup_steps, self.train.init_lr)
        if resume:
            self._resume(resume, run)
        run.metrics = MetricsLog(self.output_dir / "metrics.jsonl", run.step if resume else None)
        if not resume:
            self._validation_metrics(run, epoch=-1)  # the starting model's point on the curves
        run.progress = tqdm(total=self.total_iterations, initial=run.iteration, unit="it", dynamic_ncols=True,
                            disable=not acc.is_local_main_process, desc="fine-tuning")
        model.train()
        try:
            with _CtrlC() as run.ctrl_c:
                self._loop(run)
        except _StopRequested:
            run.progress.close()
            path = self._save(run, self.output_dir / "checkpoint_last.pth")
            if self.accelerator.is_main_process:
                write_curves(run.metrics, self.output_dir, self.family.loss_name)
            log.warning("interrupted at iteration %d; saved %s", run.iteration, path)
            return RunResult(run.iteration, path, True, self.output_dir)
        except KeyboardInterrupt:  # the second Ctrl-C: mid-step, so nothing consistent to save
            run.progress.close()
            log.warning("stopped at once; the last good checkpoint is %s", run.last_checkpoint)
            return RunResult(run.iteration, run.last_checkpoint, True, self.output_dir)
        except torch.OutOfMemoryError:  # CUDA's allocator
            raise self._out_of_memory(run) from None
        except RuntimeError as exc:
            # torch's CPU allocator raises a plain RuntimeError (c10::Error) with no subtype: only its text says so.
            if "can't allocate memory" in str(exc) or "out of memory" in str(exc):
                raise self._out_of_memory(run) from None
            raise
        run.progress.close()
        return self._finish(run)

    def _loader(self, start: int) -> DataLoader:
        acc, train = self.accelerator, self.train
        sampler = RunBatches(len(self.train_samples), train.batch_size, acc.num_processes, acc.process_index,
                             train.seed, start, self.total_iterations)
        dataset = self.family.dataset(self.train_samples, train.augment, self.config.image)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=self.family.collate,
                          num_workers=train.num_workers, worker_init_fn=_ignore_ctrl_c)

    def _loop(self, run: _Run) -> None:
        run.window = _Window()
        for batch in self._loader(run.iteration):
            boundary = self._step(run, batch)
            run.iteration += 1
            run.progress.update(1)
            if run.iteration % self.iters_per_epoch == 0:
                self._end_epoch(run)
            if boundary and (run.ctrl_c.requested or (run.stop_after is not None and run.iteration >= run.stop_after)):
                raise _StopRequested

    def _step(self, run: _Run, batch: object) -> bool:
        """One iteration (forward, backward, and the optimiser step at an accumulation boundary)."""
        acc, train, iteration = self.accelerator, self.train, run.iteration
        set_learning_rate(run.optimizer, learning_rate(iteration, self.iters_per_epoch, train))
        torch.manual_seed(iteration_seed(train.seed, iteration, acc.process_index))
        inputs = self.family.step_inputs(batch, train.seed, iteration)
        boundary = (iteration + 1) % train.grad_accum_steps == 0 or (iteration + 1) % self.iters_per_epoch == 0
        with contextlib.nullcontext() if boundary else acc.no_sync(run.model):
            loss, count = run.model(*inputs)
            acc.backward(loss / train.grad_accum_steps)
        run.window.add(acc.reduce(loss.detach(), "mean").item(), acc.reduce(count.detach(), "sum").item(),
                       len(inputs[0]) * acc.num_processes)  # pixels come first
        if boundary:
            norm = acc.clip_grad_norm_(list(self.family.named_trainable().values()),
                                       train.max_grad_norm or float("inf"))
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            record = run.window.record(run.step, iteration, iteration // self.iters_per_epoch,
                                       run.optimizer.param_groups[0]["lr"], float(norm))
            run.window = _Window()
            if acc.is_main_process:
                run.metrics.write(record)
            run.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        return boundary

    def _end_epoch(self, run: _Run) -> None:
        epoch = run.iteration // self.iters_per_epoch - 1
        val = validation_loss(self.family, self.val_samples, self.config, self.train)
        if val is not None and self.accelerator.is_main_process:
            run.metrics.write({"type": "val", "step": run.step, "epoch": epoch, "val_loss": val})
            log.info("epoch %d: validation loss %.4f", epoch, val)
        self._validation_metrics(run, epoch)
        self.family.train()
        self._save(run, self.output_dir / f"checkpoint_{epoch}.pth")
        if self.accelerator.is_main_process:
            run.last_export = self.family.save_epoch(self.output_dir, epoch)

    def _validation_metrics(self, run: _Run, epoch: int) -> None:
        """The family's per-epoch numbers beyond the loss (zero-shot models: AUC per label), into metrics.jsonl."""
        if self.accelerator.is_main_process and self.val_samples:
            found = self.family.validation_metrics(self.val_samples, self.config)
            if found:
                run.metrics.write({"type": "val_metrics", "step": run.step, "epoch": epoch, **found})

    def _save(self, run: _Run, path: Path) -> Path:
        """The family's checkpoint layout, plus what an exact resume needs (iteration, step, adapter weights)."""
        acc = self.accelerator
        if acc.is_main_process:
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            checkpoint = {"model": self.family.checkpoint_state(), "optimizer": run.optimizer.state_dict(),
                          "config": {"model": self.config.to_dict(), "train": self.train.to_dict(),
                                     "family": self.family.family},
                          "scaler": scaler, "epoch": run.iteration // self.iters_per_epoch,
                          "iteration": run.iteration, "step": run.step, "lora": self.family.adapter_state()}
            checkpoint.update(self.family.checkpoint_extras(self.config))
            save_atomically(checkpoint, path, run.last_checkpoint)
        acc.wait_for_everyone()
        run.last_checkpoint = path
        return path

    def _resume(self, path: str | Path, run: _Run) -> None:
        checkpoint = load_checkpoint(path)
        self.family.load_checkpoint_state(checkpoint["model"], checkpoint.get("lora"))
        if checkpoint.get("optimizer"):
            run.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(checkpoint["scaler"])
        # XrayGPT's own checkpoints end an epoch and carry no iteration: continue with the next epoch.
        run.iteration = checkpoint.get("iteration", (checkpoint.get("epoch", 0) + 1) * self.iters_per_epoch)
        run.step = checkpoint.get("step", run.iteration // self.train.grad_accum_steps)
        run.last_checkpoint = Path(path)
        log.info("resuming %s at iteration %d (optimiser step %d)", path, run.iteration, run.step)

    def _out_of_memory(self, run: _Run) -> TrainingError:
        keep = f"the last good checkpoint is {run.last_checkpoint}" if run.last_checkpoint else "no checkpoint yet"
        return TrainingError(f"Out of memory at iteration {run.iteration} (train.batch_size"
                             f" {self.train.batch_size}); {keep}. Lower train.batch_size (raise train.grad_accum_steps"
                             f" to keep the global batch), or train LoRA with gradient checkpointing / QLoRA.")

    def _finish(self, run: _Run) -> RunResult:
        result = RunResult(run.iteration, run.last_checkpoint, False, self.output_dir, export=run.last_export)
        if self.accelerator.is_main_process:
            write_curves(run.metrics, self.output_dir, self.family.loss_name)
            vals = [r["val_loss"] for r in run.metrics.records() if r["type"] == "val"]
            result.val_loss = vals[-1] if vals else None
            result.report_metrics = self.family.end_of_run(self.val_samples, self.config, self.output_dir)
        self.accelerator.wait_for_everyone()
        return result


def _ignore_ctrl_c(worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which finishes the step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class _Window:
    """Loss, tokens and samples since the last optimiser step, and the time they took (a new one per step)."""

    start: float = field(default_factory=time.perf_counter)
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    samples: int = 0

    def add(self, loss: float, tokens: float, samples: int) -> None:
        self.losses.append(loss)
        self.tokens += int(tokens)
        self.samples += samples

    def record(self, step: int, iteration: int, epoch: int, lr: float, grad_norm: float) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        record = {"type": "train", "step": step, "iteration": iteration, "epoch": epoch,
                  "loss": sum(self.losses) / len(self.losses), "lr": lr, "grad_norm": grad_norm,
                  "samples_per_s": self.samples / elapsed, "tokens_per_s": self.tokens / elapsed}
        return record
