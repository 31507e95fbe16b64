"""Weights commands: ``xraygpt fetch`` (download what can be downloaded) and ``xraygpt check``.

Exit codes: 0 every weight present; 2 invalid config; 3 some weights missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from ..config import DEFAULT_CONFIG, Config, WeightSpec, iter_weight_specs, load_config
from ..errors import MissingWeightsError, XrayGPTError
from ..weights import (
    WeightStatus,
    download_hub_configs,
    download_size,
    human_size,
    is_remote,
    resolve_weights,
    weights_status,
)
from .options import add_config_options

EXIT_MISSING = MissingWeightsError.exit_code


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fetch`` and ``check``."""
    fetch = subparsers.add_parser(
        "fetch", help="download every weights file of a config that can be downloaded",
        description="Download the config's weights that have a Hub or https source; for the others "
                    "(manual downloads such as XrayGPT's checkpoint) print how to get them.")
    add_config_options(fetch)
    fetch.set_defaults(func=run_fetch)
    check = subparsers.add_parser(
        "check", help="validate a config, list present/missing weights, estimate peak memory",
        description="Validate the config, say which weights are present (and where) or missing, "
                    "and estimate peak memory per device for the config's runtime mode.")
    add_config_options(check)
    check.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    check.add_argument("--train", action="store_true",
                       help="also estimate GPU memory for fine-tuning (projection-only fp16, LoRA, QLoRA 4-bit)"
                            " with the config's train: settings")
    check.set_defaults(func=run_check)


def run_fetch(args: argparse.Namespace) -> int:
    """Resolve every spec, downloading remote sources; print where each one is or how to get it."""
    config = load_config(args.config, args.overrides)
    return _summary(fetch_weights(config, lambda message: print(message, flush=True), evaluation=True))


def fetch_weights(config: Config, say: Callable[[str], None], evaluation: bool = False) -> int:
    """Every weights entry of ``config``: present, downloaded (size and licence said first) or how to get
    it; then the towers' config files. Returns how many entries are still missing. ``serve`` runs
    this on start (unless --offline); a failed download is reported, never raised. ``evaluation``:
    also the report scorers' files (``xraygpt fetch``; serving does not need them)."""
    # zero-shot first: its files are the smallest, and with them the app is useful before XrayGPT's arrive
    specs = sorted(iter_weight_specs(config, evaluation).items(), key=lambda item: not item[0].startswith("zeroshot."))
    missing = sum(not _fetch_one(config, name, spec, say) for name, spec in specs)
    return missing + _fetch_tower_configs(config, say)


def _fetch_one(config: Config, name: str, spec: WeightSpec, say: Callable[[str], None]) -> bool:
    try:
        say(f"present     {name}: {resolve_weights(spec, name, cache_dir=config.weights.cache_dir)}")
        return True
    except MissingWeightsError as exc:
        offline_error = exc
    remote = [source for source in spec.sources if is_remote(source)]
    if not remote:
        say(f"manual      {name}: cannot be downloaded automatically\n{_indent(str(offline_error))}")
        return False
    licence = spec.licence or "see the source"
    size = human_size(download_size(remote[0], spec.files))
    say(f"downloading {name}: {size} from {remote[0]} (licence: {licence}) ...")
    try:
        path = resolve_weights(spec, name, download=True, cache_dir=config.weights.cache_dir)
    except MissingWeightsError as exc:
        say(f"failed      {name}\n{_indent(str(exc))}")
        return False
    say(f"downloaded  {name}: {path}")
    return True


def _fetch_tower_configs(config: Config, say: Callable[[str], None]) -> int:
    """Config/tokenizer files of the vision and zero-shot towers (after their weights); returns the failures."""
    from ..families.registry import family_spec
    from ..zeroshot.classifier import tower_config_repos

    spec = family_spec(config.model.family)
    family_repos = spec.load("config_repos")(config) if spec.config_repos else {}
    failed, fetched = 0, set()
    for name, repo in {**family_repos, **tower_config_repos(config)}.items():
        if repo in fetched:  # e.g. both MedCLIP variants read Bio_ClinicalBERT
            continue
        fetched.add(repo)
        try:
            say(f"configs     {name}: {download_hub_configs(repo)}")
        except Exception as exc:  # huggingface_hub raises many types for offline/unknown repos
            failed += 1
            say(f"failed      {name}: hf-hub:{repo} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    return failed


def run_check(args: argparse.Namespace) -> int:
    """Validate the config (ConfigError -> exit 2), report weights and the memory estimate."""
    config = load_config(args.config, args.overrides)
    statuses = weights_status(config)
    memory, memory_note = memory_estimate(config)
    fit = memory_fit(config, memory) if memory is not None else None
    training = training_estimates(args) if args.train else None
    if args.json:
        report = _check_json(config, statuses, memory, memory_note)
        report["memory_fit"] = None if fit is None else {
            "capacity_bytes": fit.capacity, "fits": fit.fits, "modes_that_fit": fit.alternatives}
        if training is not None:
            report["training_memory_gpu_estimate"] = {mode: {"peak_bytes": r.peak, "breakdown_bytes": r.breakdown,
                                                             "notes": r.notes} for mode, r in training.items()}
        print(json.dumps(report, indent=2))
    else:
        _print_check(config, statuses, memory, memory_note)
        if fit is not None:
            _print_fit(fit)
        _print_gpu_estimate(config)
        if training is not None:
            _print_training(training)
    return _summary(sum(status.path is None for status in statuses))


def training_estimates(args: argparse.Namespace) -> dict[str, Any]:
    """Training mode -> its GPU memory estimate, sized by the config's ``train:`` section."""
    from ..memory import TRAIN_MODES, TrainShape, estimate_training
    from ..train.config import load_train_config

    config, train = load_train_config(args.config or DEFAULT_CONFIG, args.overrides)
    shape = TrainShape(batch_size=train.batch_size, max_txt_len=train.max_txt_len, lora_rank=train.lora.rank,
                       lora_targets=tuple(train.lora.target_modules), train_qformer=train.train_qformer)
    return {mode: estimate_training(config, mode, shape) for mode in TRAIN_MODES}


def _print_training(training: dict[str, Any]) -> None:
    from ..memory import format_breakdown

    print("fine-tuning memory estimate on a CUDA GPU (an estimate, not a measurement), peak per step:")
    for mode, result in training.items():
        print(f"  {mode}: " + "; ".join(format_breakdown(result)))
    for note in next(iter(training.values())).notes:
        print(f"  note: {note}")


def memory_estimate(config: Config) -> tuple[dict[str, int] | None, str]:
    """Peak bytes per device on this machine, or (None, why not)."""
    from ..memory import estimate_peak_memory  # imports torch: only when check runs

    try:
        return dict(estimate_peak_memory(config)), ""
    except XrayGPTError as exc:  # e.g. runtime.mode fp16 on a machine without CUDA
        return None, f"not available ({str(exc).splitlines()[0]})"


def memory_fit(config: Config, peak: dict[str, int]) -> Any:
    """The estimate against this machine's memory (see ``memory.memory_fit``)."""
    from ..memory import memory_fit as fit

    return fit(config, peak)


def _print_fit(fit: Any) -> None:
    """Whether the estimate fits this machine, and if not, the runtime modes that would."""
    sizes = ", ".join(f"{device} {size / 2**30:.2f} GiB" for device, size in fit.capacity.items())
    if not sizes:
        print("  (this machine's memory size is unknown)")
    elif fit.fits:
        print(f"  fits: this machine has {sizes}")
    elif not fit.alternatives:
        print(f"  will NOT fit: this machine has {sizes}, and no runtime mode fits. Use a smaller LLM "
              "(weights.llama_model) or a machine with more memory.")
    else:
        print(f"  will NOT fit: this machine has {sizes}. Runtime modes that would fit (most precise first):")
        for mode, peak in fit.alternatives.items():
            print(f"    {mode}: " + ", ".join(f"{device} {size / 2**30:.2f} GiB" for device, size in peak.items()))
        print(f"  e.g. add --set runtime.mode={next(iter(fit.alternatives))}")


def gpu_memory_estimate(config: Config) -> Any:
    """The estimate for a CUDA GPU, even on a CPU-only machine; None if the config keeps everything on the CPU."""
    from ..memory import estimate

    try:
        result = estimate(config, assume_cuda=True)
    except XrayGPTError:
        return None
    return result if any(device.startswith("cuda") for device in result.breakdown) else None  # runtime.device: cpu


def _print_gpu_estimate(config: Config) -> None:
    result = gpu_memory_estimate(config)
    if result is None:
        return
    from ..memory import format_breakdown

    print(f"memory estimate on a CUDA GPU (mode {result.mode}; an estimate, not a measurement), peak per device:")
    for line in format_breakdown(result):
        print(f"  {line}")
    for note in result.notes:
        print(f"  note: {note}")


def _print_check(config: Config, statuses: list[WeightStatus], memory: dict[str, int] | None, note: str) -> None:
    print(f"config: {config.source} (valid)")
    print("weights:")
    for status in statuses:
        if status.path is not None:
            print(f"  present  {status.name}: {status.path}")
        else:
            print(f"  MISSING  {status.name}\n{_indent(status.message, 4)}")
    if memory is None:
        print(f"memory estimate: {note}")
    else:
        print(f"memory estimate on this machine (runtime.mode {config.runtime.mode}), peak per device:")
        for device, size in memory.items():
            print(f"  {device}: {size / 2**30:.2f} GiB")
    print(f"LLM backend: {config.runtime.llm_backend}: {_backend(config, statuses)['detail']}")


def _check_json(config: Config, statuses: list[WeightStatus], memory: dict[str, int] | None,
                note: str) -> dict[str, Any]:
    return {
        "config": config.source,
        "valid": True,
        "mode": config.runtime.mode,
        "weights": [{"name": s.name, "present": s.path is not None, "path": str(s.path) if s.path else None,
                     "message": s.message} for s in statuses],
        "memory_bytes": memory,
        "memory_note": note,
        "memory_gpu_estimate": _gpu_json(config),
        "llm_backend": _backend(config, statuses),
    }


def _backend(config: Config, statuses: list[WeightStatus]) -> dict[str, Any]:
    """The LLM backend and whether its server answers (or how it would be launched)."""
    from ..serving.server import backend_status

    llm = next((s.path for s in statuses if s.name == "weights.llama_model"), None)
    return backend_status(config, llm)


def _gpu_json(config: Config) -> dict[str, Any] | None:
    result = gpu_memory_estimate(config)
    if result is None:
        return None
    return {"mode": result.mode, "peak_bytes": result.peak, "breakdown_bytes": result.breakdown, "notes": result.notes}


def _summary(missing: int) -> int:
    if not missing:
        return 0
    print(f"xraygpt: {missing} weights entr{'y is' if missing == 1 else 'ies are'} missing (see above)",
          file=sys.stderr)
    return EXIT_MISSING


def _indent(text: str, width: int = 2) -> str:
    return textwrap.indent(text, " " * width)
