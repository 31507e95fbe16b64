"""Shared test helpers. ``../shared`` sits beside the repository clone (CI clones it there)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SAMPLES = SHARED / "xray-samples"


def sample_rows() -> list[dict[str, str]]:
    """The rows of ``xray-samples/manifest.csv`` (one per sample file); empty if it is absent."""
    manifest = SAMPLES / "manifest.csv"
    if not manifest.is_file():
        return []
    with manifest.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``shared`` folder beside the repository (fixtures, xray-samples, docs)."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is missing (clone the shared folder beside the repository)")
    return SHARED


@pytest.fixture(scope="session")
def samples_dir(shared_dir: Path) -> Path:
    """``shared/xray-samples``: real radiographs described by its manifest.csv."""
    return shared_dir / "xray-samples"


@pytest.fixture(scope="session")
def xraygpt_fixture_dir(shared_dir: Path) -> Path:
    """``shared/fixtures/xraygpt_tiny``: tiny XrayGPT checkpoints with the reference's outputs."""
    return shared_dir / "fixtures" / "xraygpt_tiny"


@pytest.fixture(scope="session")
def tiny_xraygpt(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny XrayGPT written by ``tests/tinymodels.py`` in the native formats, with ``tiny.yaml``."""
    import tinymodels  # the tests folder is on sys.path (pytest's rootdir conftest)

    return tinymodels.build_all(tmp_path_factory.mktemp("tiny_xraygpt"))
