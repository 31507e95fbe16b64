"""Explainability maps: faithfulness figures and cost per map (prints figures, asserts nothing).

    python bench/bench_explain.py                 # tiny models + mid-size XrayGPT + real-size MedCLIP-ViT (random)
    python bench/bench_explain.py --skip-midsize  # tiny models only (faster)

1. **Deletion**: per image and label (or answer span), delete the top 10% most salient map cells
   (set to the mean intensity) and a random 10% (mean of 10 draws); report the mean drop of the
   explained score (ensemble logit / summed log-probability) and how often top > random.
2. **Model randomisation** (Adebayo et al. 2018): randomise layers from the output to the input,
   cumulatively; Spearman rank correlation of each map with the original (mean over images and labels).
3. **Cost per map** on this CPU (one torch thread by default): wall time of one label's Grad-CAM,
   of all labels at once, of occlusion, and of one report map, for tiny, mid-size and real-size towers.
4. **Maps off**: zero-shot and report latency before any map was computed (``explain`` not even
   imported) and again after maps were computed in the same process; scores and tokens compared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import midsize  # noqa: E402
import tinyzeroshot  # noqa: E402

from xraygpt_app.api import Assistant  # noqa: E402
from xraygpt_app.config import load_config  # noqa: E402
from xraygpt_app.imaging.loader import load_radiograph  # noqa: E402
from xraygpt_app.zeroshot.classifier import ZeroShotClassifier  # noqa: E402

TINY = REPO / "eval_configs" / "tiny_fixture.yaml"
SAMPLES = REPO.parent / "shared" / "xray-samples"
IMAGES = ["nih_cxr14_00000001_000_pa_512.png", "hannover_1479fa94_pa_640x755.png",
          "hannover_00870a9c_ap_bedside_640x524.png", "covidcxr_ARDSSevere_rgb_790x631.png"]
QUESTION = "Describe the findings."


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def zeroshot_classifiers(root: Path) -> dict[str, ZeroShotClassifier]:
    """The three tiny zero-shot kinds in their released layouts (see tests/tinyzeroshot.py, tests/tinyllava.py)."""
    loaded = load_config(tinyzeroshot.three_kinds_config(root, TINY))
    return {name: ZeroShotClassifier.from_config(loaded, name) for name in ("medclip-vit", "medclip-resnet",
                                                                             "biomedclip")}


def real_size_medclip() -> ZeroShotClassifier:
    """MedCLIP-ViT at its real dimensions (Swin-tiny, BERT-base, 512-d) with random weights."""
    from transformers import BertConfig, SwinConfig

    from xraygpt_app.zeroshot.medclip import MedCLIP, MedCLIPEncoder, MedCLIPTokenizer

    torch.manual_seed(0)
    model = MedCLIP("vit", BertConfig(vocab_size=28996), 512, SwinConfig()).eval()
    tokenizer = MedCLIPTokenizer(str(tinyzeroshot.BERT_TINY))
    return ZeroShotClassifier(MedCLIPEncoder(model, tokenizer), "medclip-vit (real size, random)")


def summary(drops: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(mean top-10% drop, mean random-10% drop, share of cases with top > random)."""
    array = np.array(drops)
    return float(array[:, 0].mean()), float(array[:, 1].mean()), float((array[:, 0] > array[:, 1]).mean())


def print_deletion(name: str, figures: tuple[float, float, float]) -> None:
    top, rand, share = figures
    print(f"  {name:<34} top-10% drop {top:8.4f}   random-10% drop {rand:8.4f}   top > random in {share:5.0%}")


def cascade_means(build: Callable[[], object], layers_of: Callable[[object], list], compute: Callable,
                  cases: list) -> list[tuple[str, float]]:
    """Mean rank correlation per cascade step over ``cases`` (each a fresh model copy is randomised)."""
    from xraygpt_app.explain.faithfulness import cascade_correlations

    per_case = []
    for case in cases:
        model = build()
        per_case.append(cascade_correlations(layers_of(model), lambda m=model, c=case: compute(m, c)))
    names = [name for name, _ in per_case[0]]
    return [(name, float(np.mean([steps[k][1] for steps in per_case]))) for k, name in enumerate(names)]


def print_cascade(name: str, steps: list[tuple[str, float]]) -> None:
    print(f"  {name}: " + ", ".join(f"{layer} {rho:+.2f}" for layer, rho in steps))


def section_faithfulness(classifiers: dict, images: list, xraygpt: Assistant, midsize_model: Assistant | None) -> None:
    from xraygpt_app.explain import zeroshot_heatmaps
    from xraygpt_app.explain.faithfulness import cascade_layers, report_deletion, zeroshot_deletion

    print("\n1. Deletion (mean over images x labels / spans; drop of the explained score)")
    for name, classifier in classifiers.items():
        print_deletion(f"zero-shot {name}", summary(zeroshot_deletion(classifier, images)))
    print_deletion("report map, XrayGPT tiny", summary(report_deletion(xraygpt.chat, images, QUESTION, 12)))
    if midsize_model is not None:
        print_deletion("report map, XrayGPT mid-size",
                       summary(report_deletion(midsize_model.chat, images[:2], QUESTION, 12)))

    print("\n2. Cascading randomisation: Spearman rho with the original map after each step (mean over cases)")
    cases = [(image, label) for image in images[:2] for label in ("Edema", "Cardiomegaly")]
    steps = cascade_means(lambda: ZeroShotClassifier.from_config(load_config(TINY)),
                          lambda c: cascade_layers(c.encoder),
                          lambda c, case: zeroshot_heatmaps(c, case[0], only=[case[1]])[0].grid, cases)
    print_cascade("zero-shot MedCLIP-ViT tiny (Grad-CAM)", steps)

    steps = cascade_means(lambda: Assistant.from_config(TINY), lambda m: cascade_layers(m.model),
                          lambda m, image: _fixed_turn_map(m, image), images[:2])
    print_cascade("report map XrayGPT tiny (gradient x input)", steps)


_TURNS: dict[int, tuple] = {}


def _fixed_turn_map(model: Assistant, image) -> np.ndarray:
    """The map of one recorded greedy turn per model copy: the tokens stay those of the original model."""
    from xraygpt_app.explain import report_heatmap

    key = id(model)
    if key not in _TURNS:
        session = model.chat(image)
        _TURNS[key] = (session, session.ask(QUESTION, do_sample=False, max_new_tokens=8))
    session, turn = _TURNS[key]
    return report_heatmap(session, image, turn=turn).raw_grid


def section_cost(classifiers: dict, images: list, xraygpt: Assistant, midsize_model: Assistant | None,
                 repeats: int) -> None:
    from xraygpt_app.explain import report_heatmap, zeroshot_heatmaps

    image = images[0]
    print(f"\n3. Cost per map on this CPU ({torch.get_num_threads()} torch thread(s); median of {repeats})")
    for name, classifier in classifiers.items():
        one = timed(lambda c=classifier: zeroshot_heatmaps(c, image, only=["Edema"]), repeats)
        every = timed(lambda c=classifier: zeroshot_heatmaps(c, image), repeats)
        occlusion = timed(lambda c=classifier: zeroshot_heatmaps(c, image, only=["Edema"], method="occlusion"), 1)
        score = timed(lambda c=classifier: c.classify([image]), repeats)
        print(f"  zero-shot {name:<33} classify {score:6.3f} s | Grad-CAM 1 label {one:6.3f} s, 5 labels "
              f"{every:6.3f} s | occlusion 7x7, 1 label {occlusion:6.3f} s")
    for name, model in (("XrayGPT tiny", xraygpt), ("XrayGPT mid-size", midsize_model)):
        if model is None:
            continue
        session = model.chat(image)
        ask = timed(lambda m=model: m.chat(image).ask(QUESTION, do_sample=False, max_new_tokens=32, min_length=32),
                    repeats)
        session.ask(QUESTION, do_sample=False, max_new_tokens=32, min_length=32)
        whole = timed(lambda s=session: report_heatmap(s, image), repeats)
        word = timed(lambda s=session: report_heatmap(s, image, span=s.turns[-1].answer.split()[0]), repeats)
        print(f"  report {name:<36} answer (32 tokens) {ask:6.3f} s | map of the whole answer {whole:6.3f} s,"
              f" of one word {word:6.3f} s")


def section_maps_off(classifier: ZeroShotClassifier, model: Assistant, images: list, repeats: int) -> None:
    """Latency with maps off before any map (explain not imported) and after maps were computed."""
    def measure() -> tuple[float, float, list, list]:
        score = timed(lambda: classifier.classify(images), repeats)
        answer = timed(lambda: model.chat(images[0]).ask(QUESTION, do_sample=False, max_new_tokens=32,
                                                          min_length=32), repeats)
        logits = [r.logits for r in classifier.classify(images)]
        tokens = model.chat(images[0]).ask(QUESTION, do_sample=False, max_new_tokens=32, min_length=32).token_ids
        return score, answer, logits, tokens

    imported = "xraygpt_app.explain" in sys.modules
    before = measure()
    from xraygpt_app.explain import report_heatmap, zeroshot_heatmaps

    for image in images:
        zeroshot_heatmaps(classifier, image)
    session = model.chat(images[0])
    session.ask(QUESTION, do_sample=False, max_new_tokens=32)
    report_heatmap(session, images[0])
    after = measure()
    state = "explain already imported" if imported else "explain not imported"
    print(f"\n4. Maps off: latency before any map ({state}) and after maps were computed in the same process")
    print(f"  zero-shot classify of {len(images)} images: {before[0]:.3f} s -> {after[0]:.3f} s;"
          f" logits identical: {before[2] == after[2]}")
    print(f"  report, 32 greedy tokens ({model.config.model.family}): {before[1]:.3f} s -> {after[1]:.3f} s;"
          f" tokens identical: {before[3] == after[3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-midsize", action="store_true", help="tiny models only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = [load_radiograph(SAMPLES / name).image for name in IMAGES]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        xraygpt = Assistant.from_config(TINY)
        classifier = ZeroShotClassifier.from_config(load_config(TINY))
        section_maps_off(classifier, xraygpt, images, args.repeats)  # first: explain is not imported yet
        classifiers = zeroshot_classifiers(root)
        midsize_model = None
        if not args.skip_midsize:
            midsize_model = Assistant.from_config(midsize.build_midsize(root / "midsize"))
            classifiers["medclip-vit real size (random)"] = real_size_medclip()
        print(f"torch {torch.__version__}; images: {', '.join(IMAGES)}")
        section_faithfulness({k: v for k, v in classifiers.items() if "real size" not in k}, images, xraygpt,
                             midsize_model)
        section_cost(classifiers, images, xraygpt, midsize_model, args.repeats)


if __name__ == "__main__":
    main()
