"""Zero-shot and evaluation commands: ``xraygpt classify`` and ``xraygpt evaluate``.

Exit codes: 0 ok; 2 bad input (image, CSV, labels, config); 3 missing weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from ..config import ENSEMBLES, Config, load_config
from ..errors import BadInputError
from ..zeroshot.entities import PRESETS as MEDKLIP_PRESETS
from ..zeroshot.prompts import PRESETS, PromptSet, load_prompt_file, parse_labels
from .files import load_csv_images, load_images, make_folder
from .heatmaps import MEANING_LINE, add_heatmap_option, output_folder, write_zeroshot_maps
from .options import add_config_options
from .reports import add_report_options, evaluate_reports

log = logging.getLogger(__name__)
NOTICE = "Research and education only: these scores are not a diagnosis."


def _add_label_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None,
                        help="zero-shot model name from the config (e.g. medclip-vit, medclip-resnet, biomedclip)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--labels", help="comma-separated labels, each scored with the model's prompt templates"
                       " (MedKLIP: entity names, or 'all' for its 75 entities)")
    group.add_argument("--preset", choices=tuple(dict.fromkeys([*PRESETS, *MEDKLIP_PRESETS])),
                       help="a built-in prompt set (cxr14: MedKLIP only)")
    group.add_argument("--prompts", metavar="FILE.yaml", help="YAML mapping label -> list of prompts (MedKLIP:"
                       " label -> one description, for findings that are not among its 75 entities)")
    parser.add_argument("--template", action="append", default=[], metavar="TEXT",
                        help="prompt template for --labels with one {} (repeatable; default: the model's,"
                             " e.g. 'chest x-ray showing {}')")
    parser.add_argument("--ensemble", choices=ENSEMBLES, default=None,
                        help="how prompt logits combine per label (default from config: mean, as MedCLIP)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``classify`` and ``evaluate``."""
    classify = subparsers.add_parser("classify", help="zero-shot scores of radiographs against findings",
                                     description=f"Score each image against labels without training. {NOTICE}")
    classify.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or DICOM files")
    _add_label_options(classify)
    classify.add_argument("--json", action="store_true", help="print JSON instead of a table")
    classify.add_argument("--grounding", metavar="LABELS",
                          help="MedKLIP: comma-separated scored labels whose raw 14x14 grounding maps (cross-attention,"
                               " before resizing) go into the output")
    classify.add_argument("--chart", metavar="OUT.png", help="write a bar chart of the scores")
    add_heatmap_option(classify)
    add_config_options(classify)
    classify.set_defaults(func=run_classify)

    evaluate = subparsers.add_parser("evaluate", help="metrics on labelled images (zeroshot) or reports (report)")
    evaluate.add_argument("--task", choices=("zeroshot", "report"), required=True)
    evaluate.add_argument("--data", required=True, metavar="CSV",
                          help="zeroshot: image,label (or one 0/1 column per label); report: image,report (generate,"
                               " then score) or report,generated (score as they are)."
                               " Relative image paths are relative to the CSV")
    evaluate.add_argument("--out", default="eval_results", help="output folder (default: eval_results)")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% intervals")
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    _add_label_options(evaluate)
    add_report_options(evaluate)
    add_config_options(evaluate)
    evaluate.set_defaults(func=run_evaluate)


def _classifier(config: Config, args: argparse.Namespace):
    from ..zeroshot.classifier import load_classifier  # deferred: torch import only for commands that need it

    classifier = load_classifier(config, args.model)
    if getattr(classifier, "kind", None) == "medklip" and (args.ensemble or args.template):
        raise BadInputError("MedKLIP scores one description per label: --ensemble and --template do not apply"
                            " (give custom findings' descriptions with --prompts FILE.yaml)")
    if args.ensemble:
        classifier.ensemble = args.ensemble
    if args.template:
        classifier.templates = list(args.template)
    return classifier


def _request(args: argparse.Namespace) -> dict:
    """The classify() keyword for the chosen label source (none: the configured preset)."""
    if args.labels:
        return {"labels": parse_labels(args.labels)}
    if args.prompts:
        return {"prompts": load_prompt_file(args.prompts)}
    return {"preset": args.preset}


def run_classify(args: argparse.Namespace) -> int:
    """Print a table (or JSON) of scores per image; optionally write the chart."""
    config = load_config(args.config, args.overrides)
    images = load_images(args.images, config)
    if args.heatmap:
        output_folder(args.heatmap)  # before the model loads
    classifier = _classifier(config, args)
    start = time.perf_counter()
    results = classifier.classify(images, **_request(args), **_grounding(args, classifier))
    log.info("classified %d images in %.2f s", len(images), time.perf_counter() - start)
    heatmaps = []
    if args.heatmap:  # after the scores, which the maps do not change
        heatmaps = write_zeroshot_maps(args.heatmap, classifier, args.images, images, _request(args),
                                       args.heatmap_method)
    if args.chart:
        from ..charts import score_chart

        try:
            score_chart(results, [Path(p).name for p in args.images], path=args.chart)
        except OSError as exc:
            raise BadInputError(f"cannot write the chart to {args.chart}: {exc.strerror or exc}") from None
    if args.json:
        payload = [{"image": path, "model": classifier.name, **r.to_dict()} for path, r in zip(args.images, results,
                                                                                                strict=True)]
        extra = {"heatmaps": [str(p) for p in heatmaps], "heatmap_meaning": _meaning(classifier, args)} \
            if args.heatmap else {}
        json.dump({"results": payload, **extra, "notice": NOTICE}, sys.stdout, indent=2)
        print()
        return 0
    for path, result in zip(args.images, results, strict=True):
        print(_table(path, result))
    if args.chart:
        from ..charts import MAX_PANELS

        shown = f" (the first {MAX_PANELS} of {len(results)} images)" if len(results) > MAX_PANELS else ""
        print(f"chart written to {args.chart}{shown}")
    if args.heatmap:
        print(f"{len(heatmaps)} heatmaps written to {args.heatmap}. {_meaning(classifier, args)}")
    print(NOTICE)
    return 0


def _meaning(classifier, args: argparse.Namespace) -> str:
    """What the written maps show: MedKLIP's own maps are attention, the others score sensitivity."""
    if getattr(classifier, "kind", None) == "medklip" and args.heatmap_method in (None, "attention"):
        from ..explain.medklip_maps import ATTENTION_MEANING

        return f"Heatmaps: {ATTENTION_MEANING}."
    return MEANING_LINE


def _grounding(args: argparse.Namespace, classifier) -> dict:
    """The ``grounding`` keyword for MedKLIP when --grounding is given."""
    if not args.grounding:
        return {}
    if getattr(classifier, "kind", None) != "medklip":
        raise BadInputError(f"--grounding needs a MedKLIP model; {classifier.name} has no grounding maps"
                            " (use --heatmap DIR for its Grad-CAM maps)")
    return {"grounding": parse_labels(args.grounding)}


def _table(path: str, result) -> str:
    width = max(len(label) for label in result.labels)
    lines = [f"{path}: predicted {result.predicted}",
             f"  {'label':<{width}}  {'logit':>8}  {'probability':>11}  {'score':>6}"]
    for label, logit, prob, score in zip(result.labels, result.logits, result.probabilities, result.scores,
                                         strict=True):
        mark = " <" if label == result.predicted else ""
        lines.append(f"  {label:<{width}}  {logit:8.3f}  {prob:11.3f}  {score:6.3f}{mark}")
    return "\n".join(lines)


def run_evaluate(args: argparse.Namespace) -> int:
    """Dispatch to the zero-shot or report evaluation; both write metrics.json into --out."""
    if args.bootstrap < 1:
        raise BadInputError("--bootstrap must be at least 1")
    if args.task == "zeroshot" and (args.compare_config or args.metrics != "bleu,rouge"):
        raise BadInputError("--metrics and --compare-config are options of --task report")
    config = load_config(args.config, args.overrides)
    out = Path(args.out)  # created only when there are results to write
    if args.task == "zeroshot":
        summary = evaluate_zeroshot(config, args, out)
    else:
        summary = evaluate_reports(config, args, out)
    print(summary)
    print(NOTICE)
    return 0


def _prompt_set_for(classifier, table, args: argparse.Namespace) -> PromptSet:
    """Prompts covering exactly the CSV's labels, in its order.

    With no --labels/--preset/--prompts: the configured preset's prompts when it holds every CSV
    label, else the CSV's label names with the model's templates.
    """
    request = _request(args)
    if not any(request.values()):
        preset = classifier.prompt_set(preset=None)
        request = {"prompts": preset} if set(table.labels) <= set(preset) else {"labels": table.labels}
    prompt_set = classifier.prompt_set(**request)
    absent = [label for label in table.labels if label not in prompt_set]
    if absent:
        raise BadInputError(f"the CSV has labels the prompts do not cover: {', '.join(absent)}")
    return {label: prompt_set[label] for label in table.labels}


def evaluate_zeroshot(config: Config, args: argparse.Namespace, out: Path) -> str:
    """Score every labelled image, write metrics.json, roc.png and auc_per_class.png; return a summary line."""
    from ..charts import auc_chart, roc_chart
    from ..evaluation.metrics import read_label_table, roc_curves, zeroshot_metrics

    csv_path = Path(args.data)
    table = read_label_table(csv_path)
    images = load_csv_images(csv_path, table.images, config)
    classifier = _classifier(config, args)
    prompt_set = _prompt_set_for(classifier, table, args)
    logits = classifier.logits(images, prompt_set).numpy().astype(np.float64)
    metrics = zeroshot_metrics(table, logits, args.bootstrap, args.seed)
    metrics["model"] = classifier.name
    metrics["ensemble"] = classifier.ensemble
    metrics["prompts_per_label"] = {label: len(p) for label, p in prompt_set.items()}
    make_folder(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    roc_chart(roc_curves(table, logits), path=out / "roc.png")
    auc_chart(metrics["per_class"], metrics["macro_auc"], path=out / "auc_per_class.png")
    macro = "n/a" if metrics["macro_auc"] is None else f"{metrics['macro_auc']:.3f}"
    return (f"{len(images)} images, {len(table.labels)} labels: accuracy {metrics['accuracy']:.3f}, "
            f"macro AUC {macro}; wrote {out / 'metrics.json'}, {out / 'roc.png'}, {out / 'auc_per_class.png'}")
