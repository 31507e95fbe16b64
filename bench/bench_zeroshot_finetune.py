"""Time per training step and peak memory of fine-tuning MedKLIP and MedCLIP at real size on this CPU.

    python bench/bench_zeroshot_finetune.py [--models medklip,medclip-vit,medclip-resnet] [--batch-size 8]
                                            [--steps 3] [--threads 2] [--json]

Each model runs in a fresh Python process: its real-size architecture with random weights (no
download), the project's own loss (``medklip_loss`` / ``medclip_loss``, what ``finetune --model``
runs), AdamW over every trainable parameter, float32. One step = forward, backward and the
optimiser update on a random batch of ``--batch-size`` 224x224 images. Reported: the median
seconds per step over ``--steps`` steps after one warm-up step, the resident set after building
the model, and the peak (``ru_maxrss``) with what training adds to it.

- MedKLIP: ResNet-50 to layer3 (the released model's backbone), d_model 256, 4 decoder layers x 4
  heads, FFN 1024, the 75 entity queries (768-wide, computed once by the frozen BERT: random here,
  the BERT's memory is not counted), every entity labelled 1 or 0.
- MedCLIP-ViT: Swin-tiny (microsoft/swin-tiny-patch4-window7-224's config) and a BERT-base
  (Bio_ClinicalBERT's architecture, vocabulary 28996), projections to 512; texts of 64 tokens,
  with CheXpert labels (its soft-label loss). MedCLIP-ResNet: torchvision's ResNet-50 instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("medklip", "medclip-vit", "medclip-resnet")


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _medklip(batch: int):
    import torch

    from xraygpt_app.train.medklip_objective import medklip_loss
    from xraygpt_app.zeroshot.medklip import MedKLIP, MedKLIPSizes

    model = MedKLIP(MedKLIPSizes("resnet50", d_model=256, layers=4, heads=4, text_dim=768, classes=2))
    queries = torch.randn(75, 768)
    pixels = torch.randn(batch, 3, 224, 224)
    labels = torch.randint(0, 2, (batch, 75))
    return model, lambda: medklip_loss(model(pixels, queries).logits, labels)[0]


def _medclip(batch: int, variant: str):
    import torch
    from transformers import BertConfig, SwinConfig

    from xraygpt_app.train.zeroshot_objectives import medclip_loss
    from xraygpt_app.zeroshot.medclip import MedCLIP

    swin = SwinConfig() if variant == "vit" else None  # its defaults are swin-tiny-patch4-window7-224
    model = MedCLIP(variant, BertConfig(vocab_size=28996), 512, swin)
    pixels = torch.randn(batch, 1, 224, 224)
    ids = torch.randint(1000, 28996, (batch, 64))
    mask = torch.ones_like(ids)
    labels = torch.randint(-1, 2, (batch, 14)).float()
    return model, lambda: medclip_loss(model, pixels, ids, mask, labels, labels.flip(0))


def measure(name: str, batch: int, steps: int) -> dict:
    """One model in this process: build, one warm-up step, ``steps`` timed steps."""
    import torch

    torch.manual_seed(0)
    model, loss_fn = _medklip(batch) if name == "medklip" else _medclip(batch, name.removeprefix("medclip-"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loaded = _rss_mib()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "batch_size": batch, "parameters_m": params / 1e6, "threads": torch.get_num_threads(),
            "s_per_step": statistics.median(times[1:]), "first_step_s": times[0], "rss_after_load_mib": loaded,
            "peak_rss_mib": peak, "training_adds_mib": peak - loaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process's model
    args = parser.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.one, args.batch_size, args.steps)))
        return
    results = []
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    for name in args.models.split(","):
        done = subprocess.run([sys.executable, __file__, "--one", name, "--batch-size", str(args.batch_size),
                               "--steps", str(args.steps), "--threads", str(args.threads)],
                              capture_output=True, text=True, env=env, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'model':<16}{'params':>9}{'batch':>7}{'s/step':>9}{'after load':>12}{'peak':>10}{'training adds':>15}")
    for r in results:
        print(f"{r['model']:<16}{r['parameters_m']:>8.1f}M{r['batch_size']:>7}{r['s_per_step']:>9.2f}"
              f"{r['rss_after_load_mib']:>9.0f} MiB{r['peak_rss_mib']:>6.0f} MiB{r['training_adds_mib']:>11.0f} MiB")
    print(f"({results[0]['threads']} threads, float32, random weights, AdamW; median of the timed steps)")


if __name__ == "__main__":
    main()
