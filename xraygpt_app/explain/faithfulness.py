"""Faithfulness checks of the maps: model-randomisation (Adebayo et al. 2018) and deletion.

- Cascading randomisation: re-draw the weights layer by layer from the output towards the input
  and compare each new map with the original by rank correlation. A map that does not depend on
  the model (an edge detector would pass a visual check) keeps a correlation near 1.
- Deletion: set the top 10% most salient cells to the mean intensity and compare the drop of the
  explained score with the drop for a random 10% of the cells.
Used by the tests and by ``bench/bench_explain.py``; they change the model they are given, so pass a copy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from .maps import delete_cells, random_cells, top_cells


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (ties share their mean rank); 0 when one map is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


@torch.no_grad()
def randomize(module: nn.Module, generator: torch.Generator) -> None:
    """Re-draw every parameter tensor from a normal distribution with its own mean and spread."""
    for param in module.parameters():
        if param.numel() > 1:
            spread = param.float().std().clamp_min(1e-3)
            noise = torch.randn(param.shape, generator=generator) * spread + param.float().mean()
            param.copy_(noise.to(param.dtype))


def cascade_layers(model) -> list[tuple[str, nn.Module]]:
    """The layers of a chat model (its own ``cascade_layers``) or of a zero-shot encoder's vision tower,
    from the output to the input."""
    if callable(getattr(model, "cascade_layers", None)):  # a families.ChatModel
        return model.cascade_layers()
    tower = model.model
    vision = getattr(tower, "vision_model", None)
    if vision is not None and vision.variant == "resnet":
        resnet = vision.model
        return [("fc", resnet.fc), ("layer4", resnet.layer4), ("layer3", resnet.layer3), ("layer2", resnet.layer2),
                ("layer1", resnet.layer1), ("stem", nn.ModuleList([resnet.conv1, resnet.bn1]))]
    if vision is not None:
        swin = vision.model
        stages = [(f"stage{i}", layer) for i, layer in enumerate(swin.encoder.layers)][::-1]
        return [("projection", vision.projection_head), ("layernorm", swin.layernorm), *stages,
                ("embeddings", swin.embeddings)]
    visual = tower.visual
    blocks = [(f"block{i}", block) for i, block in enumerate(visual.trunk.blocks)][::-1]
    return [("head", visual.head), *blocks, ("patch_embed", visual.trunk.patch_embed)]


def cascade_correlations(layers: list[tuple[str, nn.Module]], compute_map: Callable[[], np.ndarray],
                         seed: int = 0) -> list[tuple[str, float]]:
    """Rank correlation of the map with the original after randomising each layer in turn (cumulatively)."""
    generator = torch.Generator().manual_seed(seed)
    original = compute_map()
    results = []
    for name, module in layers:
        randomize(module, generator)
        results.append((name, rank_correlation(original, compute_map())))
    return results


@torch.no_grad()
def deletion_drops(score: Callable[[torch.Tensor], float], pixels: torch.Tensor, grid: np.ndarray,
                   fraction: float = 0.1, draws: int = 10, seed: int = 0) -> tuple[float, float]:
    """(score drop with the top ``fraction`` cells deleted, mean drop over ``draws`` random deletions)."""
    base = score(pixels)
    top = base - score(delete_cells(pixels, top_cells(grid, fraction)))
    rng = np.random.default_rng(seed)
    random = [base - score(delete_cells(pixels, random_cells(grid.shape, fraction, rng))) for _ in range(draws)]
    return float(top), float(np.mean(random))


def _logprob(model, turn, indices: list[int], pixels: torch.Tensor) -> float:
    from .report_maps import span_logprob

    return float(span_logprob(model, pixels, turn, indices))


def zeroshot_deletion(classifier, images: list, preset: str = "chexpert5") -> list[tuple[float, float]]:
    """(top-10% drop, random-10% drop) of each label's ensemble logit, for every image and label."""
    from .zeroshot_maps import LabelLogits, encoder_heatmaps

    scorer = LabelLogits(classifier, classifier.prompt_set(preset=preset))
    drops = []
    for image in images:
        pixels = classifier.encoder.pixel_values([image])
        for i, heatmap in enumerate(encoder_heatmaps(classifier, image, preset=preset)):
            drops.append(deletion_drops(lambda p, i=i: float(scorer(p)[0, i]), pixels, heatmap.grid))
    return drops


def report_deletion(session_of: Callable, images: list, question: str, max_new_tokens: int,
                    words: int = 2) -> list[tuple[float, float]]:
    """(top-10% drop, random-10% drop) of the words' log-probability, for every image and span.

    ``session_of(image)`` starts a conversation (e.g. ``XrayGPT.chat``); each image gets one greedy
    answer, explained whole and word by word for its first ``words`` words.
    """
    from .report_maps import image_path, report_heatmap, span_token_indices

    drops = []
    for image in images:
        session = session_of(image)
        turn = session.ask(question, do_sample=False, max_new_tokens=max_new_tokens)
        pixels = image_path(session.model).preprocess(image)
        for span in (None, *turn.answer.split()[:words]):
            indices, _ = span_token_indices(session.model, turn.token_ids, span)
            heatmap = report_heatmap(session, image, turn=turn, span=span)
            score = functools.partial(_logprob, session.model, turn, indices)
            drops.append(deletion_drops(score, pixels, heatmap.raw_grid))
    return drops
