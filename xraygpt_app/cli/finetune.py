"""``xraygpt finetune``: train the config's model family on report / VQA pairs (or only compute the loss).

XrayGPT with XrayGPT's objective; the llava family's projector (stage 1) or projector + LoRA (stage 2);
with ``--model NAME`` a zero-shot model of ``zeroshot.models`` with its own loss (MedCLIP, MedKLIP,
BiomedCLIP; see docs/fine-tuning-zeroshot.md).

Exit codes: 0 done; 2 bad config or data; 3 missing weights; 130 interrupted (a checkpoint was saved).
"""

from __future__ import annotations

import argparse
import json

from ..config import DEFAULT_CONFIG
from .options import add_config_options

DEFAULT_TRAIN_CONFIG = DEFAULT_CONFIG.parent.parent / "train_configs" / "xraygpt_openi_finetune.yaml"
EXIT_INTERRUPTED = 130


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``finetune``."""
    parser = subparsers.add_parser(
        "finetune", help="fine-tune the config's chat family (XrayGPT, llava), or with --model a zero-shot model",
        description="Fine-tune the config's model.family on report / VQA pairs. XrayGPT: its own objective on "
                    "llama_proj, optionally the Q-Former or LoRA adapters; checkpoints in XrayGPT's format that "
                    "`serve --set weights.ckpt=...` loads. llava: LLaVA-1.5's objective on the projector (stage 1) "
                    "or the projector and LoRA adapters (stage 2); `serve --set weights.projector=...` loads them. "
                    "With --model NAME: a zero-shot model of zeroshot.models (MedCLIP, MedKLIP, BiomedCLIP) with its "
                    "own loss on image-text or labelled rows, saved each epoch in its released format for `classify`. "
                    "Run it under `accelerate launch` for several GPUs or processes.")
    add_config_options(parser)  # a model config, with an optional train: section (XrayGPT's run settings)
    parser.set_defaults(config=str(DEFAULT_TRAIN_CONFIG))
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="fine-tune this zero-shot model of the config's zeroshot.models (MedCLIP, MedKLIP,"
                             " BiomedCLIP) with its own loss instead of the chat family (sets train.model)")
    parser.add_argument("--data", required=True, help="a folder with filter_cap.json, or a .jsonl / .csv file"
                        " (zero-shot models: .jsonl / .csv rows, see docs/fine-tuning-zeroshot.md)")
    parser.add_argument("--val", default=None, help="validation data (default: train.val_fraction of --data)")
    parser.add_argument("--output", "-o", default=None, help="output folder (default: train.output_dir)")
    parser.add_argument("--resume", default=None, metavar="CKPT", help="continue the run that wrote CKPT")
    parser.add_argument("--skip-bad", action="store_true", help="leave out unusable rows (counted) instead of stopping")
    parser.add_argument("--loss-only", action="store_true",
                        help="print loss and gradient norms per batch in file order; no update, shuffling or cropping")
    parser.add_argument("--batch-size", type=int, default=None, help="with --loss-only (default: train.batch_size)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from ..train.config import load_train_config  # torch and friends load only when the command runs

    config, train = load_train_config(args.config, args.overrides)
    if args.model:
        train.model = args.model
    if args.loss_only:
        return _loss_only(args, config, train)
    from ..train.trainer import Trainer

    trainer = Trainer.from_config((config, train), data=args.data, val=args.val, output=args.output,
                                  skip_bad=args.skip_bad)
    result = trainer.fit(resume=args.resume)
    if not trainer.accelerator.is_main_process:
        return EXIT_INTERRUPTED if result.interrupted else 0
    checkpoint = str(result.checkpoint) if result.checkpoint else None
    summary = {"output_dir": str(result.output_dir), "checkpoint": checkpoint,
               "iterations": result.iterations_done, "interrupted": result.interrupted,
               "train_rows": len(trainer.train_samples), "val_rows": len(trainer.val_samples),
               "skipped_rows": trainer.skipped, "val_loss": result.val_loss,
               "report_metrics": (result.report_metrics or {}).get("overall"),
               "chexbert_f1": _chexbert_summary(result.report_metrics),
               "auc_comparison": (result.report_metrics or {}).get("auc_comparison"),
               "export": str(result.export) if result.export else None}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        use = trainer.family.use_command(args.config, result.checkpoint, result.export) if checkpoint else None
        _print_summary(summary, use)
    return EXIT_INTERRUPTED if result.interrupted else 0


def _loss_only(args: argparse.Namespace, config, train) -> int:
    from ..train.evaluate import loss_only
    from ..train.trainer import make_accelerator, trainable_class

    make_accelerator(config, train)
    family_class = trainable_class(config, train)
    rows = family_class.read_data(args.data, skip_bad=args.skip_bad, limits=config.image)
    family = family_class.from_config(config, train)
    result = loss_only(family, rows.samples, config, train, args.batch_size or train.batch_size)
    result.update(rows=len(rows.samples), skipped_rows=len(rows.skipped))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for i, batch in enumerate(result["batches"]):
        norms = ", ".join(f"{name} {value:.6g}" for name, value in batch["grad_norms"].items())
        count = next((f"{v} {k.replace('_', ' ')}" for k, v in batch.items() if k not in ("loss", "grad_norms")), "")
        print(f"batch {i}: loss {batch['loss']:.6f} ({count}); grad L2 {norms}")
    print(f"{result['rows']} rows, {result['skipped_rows']} skipped")
    return 0


def _print_summary(summary: dict, use: str | None) -> None:
    state = "interrupted; resume with --resume " + str(summary["checkpoint"]) if summary["interrupted"] else "done"
    print(f"fine-tuning {state}: {summary['iterations']} iterations, {summary['train_rows']} training rows,"
          f" {summary['val_rows']} validation rows, {summary['skipped_rows']} skipped")
    print(f"outputs in {summary['output_dir']}: metrics.jsonl, loss_curve.png, checkpoints")
    if summary["val_loss"] is not None:
        print(f"validation loss: {summary['val_loss']:.4f}")
    if summary["report_metrics"]:
        print("report metrics on the validation split: "
              + ", ".join(f"{k} {v:.4f}" for k, v in summary["report_metrics"].items()))
    if summary["chexbert_f1"]:
        print("CheXbert F1 on the validation split: "
              + ", ".join(f"{k} {v:.4f}" for k, v in summary["chexbert_f1"].items()))
    if summary["auc_comparison"]:
        from ..train.zeroshot_eval import format_comparison

        print("AUC on the validation split, starting model vs fine-tuned (auc_comparison.json):")
        print(format_comparison(summary["auc_comparison"]))
    if use and not summary["interrupted"]:
        print(f"use it: {use}" if use.startswith("xraygpt classify") else f"serve it: {use}")


def _chexbert_summary(metrics: dict | None) -> dict | None:
    """The CheXbert F1 values of the run's report metrics (present when the config names CheXbert's files)."""
    section = (metrics or {}).get("chexbert")
    if not section:
        return None
    return {key: section[key] for key in ("micro_f1_14", "macro_f1_14", "micro_f1_5", "macro_f1_5")}
