"""Constants and small readers the test modules share (fixtures live in ``conftest.py``).

Paths here are only names: a test that reads ``../shared`` asks for conftest's ``shared_dir`` (or a fixture built
on it, such as ``samples_dir`` or ``tiny_config``), which skips the test when the folder is missing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # beside the repository clone (CI clones it there)
SAMPLES = SHARED / "xray-samples"
TINY_CONFIG = REPO / "eval_configs" / "tiny_fixture.yaml"  # points into ../shared/fixtures by relative paths
NIH_PNG = "nih_cxr14_00000001_000_pa_512.png"  # the sample most tests use (also in examples/)


def greedy(max_new_tokens: int = 12, **settings) -> dict:
    """Generation settings for a reproducible answer: greedy decoding, a few new tokens."""
    return {"do_sample": False, "max_new_tokens": max_new_tokens, **settings}


GREEDY = greedy()
# The web app's settings panel with sampling switched off (what the UI handlers receive).
UI_GREEDY = greedy(temperature=1.0, top_p=0.9, num_beams=1)


def sample_rows() -> list[dict[str, str]]:
    """The rows of ``xray-samples/manifest.csv`` (one per sample file); empty if it is absent.

    For parametrising at collection time; the tests themselves still take ``samples_dir``, so they skip
    with a clear reason when ``../shared`` is missing.
    """
    manifest = SAMPLES / "manifest.csv"
    if not manifest.is_file():
        return []
    with manifest.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def metric_records(folder: Path, kind: str = "train") -> list[dict]:
    """The records of one type (``train``, ``val``...) in a training run's ``metrics.jsonl``."""
    lines = (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [record for record in map(json.loads, lines) if record["type"] == kind]
