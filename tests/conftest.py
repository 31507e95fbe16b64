"""Shared fixtures (constants and readers are in ``helpers.py``).

``../shared`` (fixtures, xray-samples) sits beside the repository clone (CI clones it there). Every test that
reads it asks for ``shared_dir``, directly or through a fixture below, so that it skips with one clear reason when
the folder is missing. The tiny models are built once per test session (``tmp_path_factory``): a test that
changes one writes its own copy, never the shared one.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import threading
from pathlib import Path

import pytest
from helpers import SHARED, TINY_CONFIG

# One torch thread per test process (and per subprocess it starts), unless the caller sets another count. The
# tiny models' operations are too small to split, and on a busy 2-core machine OpenMP's waiting threads made a
# chat test 17x slower (27 s against 1.6 s). Set before any test module imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    """pyproject's addopts run the suite on 2 pytest-xdist workers; without xdist those options do nothing."""
    if importlib.util.find_spec("xdist") is None:  # e.g. an environment made before requirements-dev had it
        group = parser.getgroup("xdist stand-in")
        group.addoption("--numprocesses", default=None, help="ignored: pytest-xdist is not installed")
        group.addoption("--dist", default=None, help="ignored: pytest-xdist is not installed")


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
def medclip_fixture_dir(shared_dir: Path) -> Path:
    """``shared/fixtures/medclip_tiny``: the tiny MedCLIP (ViT) with the reference's outputs, and a tiny BERT."""
    return shared_dir / "fixtures" / "medclip_tiny"


@pytest.fixture(scope="session")
def tiny_config(shared_dir: Path) -> Path:
    """``eval_configs/tiny_fixture.yaml``: the tiny XrayGPT and MedCLIP-ViT of ``../shared/fixtures``."""
    return TINY_CONFIG


@pytest.fixture(scope="session")
def tiny_assistant(tiny_config: Path):
    """The tiny fixture XrayGPT loaded once for the session (read-only: make your own to change its weights)."""
    from xraygpt_app.api import Assistant

    return Assistant.from_config(tiny_config)


@pytest.fixture(scope="session")
def tiny_services(tiny_config: Path):
    """The web app's services on the tiny config (XrayGPT and MedCLIP-ViT), loaded once for the session."""
    from xraygpt_app.config import load_config
    from xraygpt_app.web.services import build_services

    return build_services(load_config(tiny_config))


@pytest.fixture(scope="session")
def tiny_xraygpt(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny XrayGPT written by ``tests/tinymodels.py`` in the native formats, with ``tiny.yaml``."""
    import tinymodels  # the tests folder is on sys.path (pytest's rootdir conftest)

    return tinymodels.build_all(tmp_path_factory.mktemp("tiny_xraygpt"))


@pytest.fixture(scope="session")
def quant_xraygpt(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny XrayGPT whose LLM dims are multiples of 64 (bitsandbytes' 4-bit block size)."""
    import tinymodels

    return tinymodels.build_all(tmp_path_factory.mktemp("tiny_quant"), dims=tinymodels.QUANT_DIMS)


@pytest.fixture(scope="session")
def tiny_llava(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny llava-family model (``tests/tinyllava.py``) with ``llava_tiny.yaml``, built once for the session."""
    import tinyllava

    return tinyllava.build_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="session")
def three_kinds_config(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config with one zero-shot model of each kind: the MedCLIP-ViT fixture, a MedCLIP-ResNet, a BiomedCLIP."""
    import tinyzeroshot

    return tinyzeroshot.three_kinds_config(tmp_path_factory.mktemp("zeroshot"), tiny_config)


@pytest.fixture()
def server(tmp_path):
    """Serve tmp_path/www over http on 127.0.0.1; yields (base URL, folder)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()
