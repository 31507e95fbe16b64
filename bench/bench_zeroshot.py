"""Time to score 20 radiographs with uncached vs cached text embeddings (prints figures, asserts nothing).

    python bench/bench_zeroshot.py                          # the tiny fixture MedCLIP (eval_configs/tiny_fixture.yaml)
    python bench/bench_zeroshot.py --real-size              # real MedCLIP-ViT dimensions, random weights
    python bench/bench_zeroshot.py -c eval_configs/xraygpt_eval.yaml --model biomedclip   # real weights

"Uncached": the prompt set's text embeddings are computed in the call (every prompt through the
text tower); "cached": the same call again, text embeddings from the classifier's cache.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from xraygpt_app.config import load_config
from xraygpt_app.imaging.loader import load_radiograph
from xraygpt_app.zeroshot.classifier import ZeroShotClassifier

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLES = SHARED / "xray-samples"
SAMPLE_FILES = ["nih_cxr14_00000001_000_pa_512.png", "nih_cxr14_00000013_004_ap_1024.png",
                "hannover_00870a9c_ap_bedside_640x524.png", "hannover_1479fa94_pa_640x755.png",
                "covidcxr_2168a917_pa_2000.jpg", "covidcxr_ARDSSevere_rgb_790x631.png",
                "dx_nih_chest_mono2_8bit_implicit_vr.dcm", "cr_siim_chest_pa_mono2_jpeg_baseline.dcm"]


def real_size_classifier(args: argparse.Namespace) -> ZeroShotClassifier:
    """MedCLIP-ViT at its real dimensions (Swin-tiny, BERT-base, 512-d projections) with random weights."""
    from transformers import BertConfig, SwinConfig

    from xraygpt_app.zeroshot.medclip import MedCLIP, MedCLIPEncoder, MedCLIPTokenizer

    torch.manual_seed(0)
    # SwinConfig() defaults are swin-tiny-patch4-window7-224; Bio_ClinicalBERT is BERT-base (cased vocab 28996).
    model = MedCLIP("vit", BertConfig(vocab_size=28996), 512, SwinConfig()).eval()
    tokenizer = MedCLIPTokenizer(str(SHARED / "fixtures" / "medclip_tiny" / "bert_tiny"))  # same lengths roughly
    return ZeroShotClassifier(MedCLIPEncoder(model, tokenizer), "medclip-vit (real size, random)",
                              batch_size=args.batch_size)


def build(args: argparse.Namespace) -> ZeroShotClassifier:
    if args.real_size:
        return real_size_classifier(args)
    overrides = [f"zeroshot.batch_size={args.batch_size}"]
    config = load_config(args.config, overrides)
    return ZeroShotClassifier.from_config(config, args.model)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", default=str(REPO / "eval_configs" / "tiny_fixture.yaml"))
    parser.add_argument("--model", "-m", default=None)
    parser.add_argument("--real-size", action="store_true", help="random MedCLIP-ViT at real dimensions")
    parser.add_argument("--preset", default="chexpert5")
    parser.add_argument("--prompts-per-class", type=int, default=None, help="default: every combination")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    classifier = build(args)
    classifier.prompts_per_class = args.prompts_per_class
    sources = [load_radiograph(SAMPLES / SAMPLE_FILES[i % len(SAMPLE_FILES)]).image for i in range(args.images)]
    prompt_set = classifier.prompt_set(preset=args.preset)
    n_prompts = sum(len(p) for p in prompt_set.values())

    def score() -> None:
        classifier.classify(sources, prompts=prompt_set)

    score()  # warm-up (lazy inits, allocator)
    uncached, cached, text_only, image_only = [], [], [], []
    for _ in range(args.repeats):
        classifier.clear_cache()
        uncached.append(timed(score))
        cached.append(timed(score))
        classifier.clear_cache()
        text_only.append(timed(lambda: classifier.text_embeddings(prompt_set)))
        image_only.append(timed(lambda: classifier.image_embeddings(sources)))
    med = statistics.median
    print(f"model: {classifier.name}; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{args.images} images, preset {args.preset}: {len(prompt_set)} labels, {n_prompts} prompts; "
          f"batch size {classifier.batch_size}; median of {args.repeats}")
    print(f"  uncached text embeddings: {med(uncached):7.3f} s  ({med(uncached) / args.images * 1000:.1f} ms/image)")
    print(f"  cached text embeddings:   {med(cached):7.3f} s  ({med(cached) / args.images * 1000:.1f} ms/image)")
    print(f"  of which: text encoding {med(text_only):.3f} s, image encoding {med(image_only):.3f} s; "
          f"speed-up {med(uncached) / med(cached):.1f}x")


if __name__ == "__main__":
    main()
