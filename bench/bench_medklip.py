"""MedKLIP at its released size on this CPU (random weights): load, entity queries, scoring one image.

    python bench/bench_medklip.py [--threads 1] [--repeats 3]

The model is MedKLIP's released architecture (ResNet-50 to layer3, d_model 256, 4 decoder layers x 4
heads), written to a temporary ``checkpoint_final.pth`` in the released layout and loaded through
``build_medklip``; the text encoder is a random BERT-base (Bio_ClinicalBERT's shape: 12 layers, hidden
768) run on 75 descriptions of 64 tokens, as MedKLIP's book is. Prints seconds and peak memory.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from bench_explain import timed  # median of repeats after a warm-up (run from the repository root)
from transformers import BertConfig, BertModel

from xraygpt_app.zeroshot.medklip import MedKLIP, MedKLIPSizes, build_medklip
from xraygpt_app.zeroshot.medklip_text import MAX_TEXT_LENGTH

RELEASED = MedKLIPSizes("resnet50", d_model=256, layers=4, heads=4, text_dim=768, classes=2)
ENTITIES = 75


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checkpoint_final.pth"
        state = {f"module.{k}": v for k, v in MedKLIP(RELEASED).state_dict().items()}
        torch.save({"model": state, "config": {"H": RELEASED.heads, "res_base_model": RELEASED.backbone}}, path)
        print(f"checkpoint {path.stat().st_size / 2**20:.0f} MiB ({len(state)} tensors)")
        started = time.perf_counter()
        model = build_medklip(path)
        print(f"load (read + strict load): {time.perf_counter() - started:.2f} s")
    bert = BertModel(BertConfig(vocab_size=28996)).eval()  # Bio_ClinicalBERT's shape
    ids = torch.randint(1000, 28000, (ENTITIES, MAX_TEXT_LENGTH))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        queries = bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        book = timed(lambda: bert(input_ids=ids, attention_mask=mask), args.repeats)
        pixels = torch.randn(1, 3, 224, 224)
        one = timed(lambda: model(pixels, queries), args.repeats)
        eight = timed(lambda: model(pixels.expand(8, -1, -1, -1), queries), args.repeats)
    print(f"threads {args.threads}, median of {args.repeats}:")
    print(f"  75 entity queries through BERT-base (once per start; cached on disk): {book:.2f} s")
    print(f"  one image, 75 entities + attention maps: {one:.3f} s")
    print(f"  8 images in a batch: {eight:.3f} s ({eight / 8:.3f} s per image)")
    print(f"  peak resident memory of this process: {_peak_gib():.2f} GiB")


if __name__ == "__main__":
    main()
