"""A mid-size random XrayGPT in the native file formats, small enough to run on a 2-core CPU.

Written with ``tests/tinymodels.py`` (timm ``Eva`` in LAVIS's ``eva_vit_g.pth`` layout, a LAVIS
BLIP-2 file, XrayGPT's checkpoint container, a LLaMA folder with the fixture's SentencePiece
tokenizer), then loaded by the benchmarks through ``XrayGPT.from_config`` like the real model.
Dimensions: EVA 224/14, embed 384, depth 6, 6 heads; Q-Former hidden 256, 4 layers, 32 queries;
LLaMA hidden 512, 8 layers, 8 heads, intermediate 1408 (a multiple of 64, so NF4 runs on the CPU),
vocabulary 1000.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import tinymodels  # noqa: E402  (tests/ holds the real-format writers)

MID_DIMS = tinymodels.TinyDims(
    image_size=224, patch_size=14, embed_dim=384, depth=6, vision_heads=6,
    q_hidden=256, q_layers=4, q_heads=4, q_intermediate=1024, q_queries=32, q_vocab=64, q_positions=64,
    llm_hidden=512, llm_layers=8, llm_heads=8, llm_intermediate=1408, llm_vocab=1000, t5_width=64,
)
SAMPLE_IMAGE = REPO / "examples" / "nih_cxr14_00000001_000_pa_512.png"


def build_midsize(root: Path) -> Path:
    """Write the mid-size model under ``root`` and return its YAML config (mode fp32)."""
    return tinymodels.build_all(root, MID_DIMS).config


def sample_image() -> Image.Image:
    """A real radiograph shipped with the repository, decoded by the project's loader."""
    from xraygpt_app.imaging.loader import load_radiograph

    return load_radiograph(SAMPLE_IMAGE).image
