"""Weight resolution: local paths, the Hugging Face cache, URL downloads, checksums, messages.

No network: URLs are served by an http.server on 127.0.0.1 in a thread, the Hub by a cache
folder laid out as huggingface_hub lays it out, with HF_HUB_OFFLINE on.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants as hf_constants

from xraygpt_app.config import WeightSpec
from xraygpt_app.errors import ConfigError, MissingWeightsError
from xraygpt_app.weights import (
    HubSource,
    download_url,
    parse_hub_source,
    resolve_weights,
    url_cache_path,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def server(tmp_path):
    """Serve tmp_path/www over http on 127.0.0.1; yields (base URL, folder, list of requested paths)."""
    root = tmp_path / "www"
    root.mkdir()
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):  # keep test output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, requested
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, offline; huggingface_hub reads these constants at call time."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def _put_in_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Lay out files as huggingface_hub's cache does: blobs by hash, snapshot symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    for name, data in files.items():
        blob = repo / "blobs" / _sha(data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (name.count("/") + 2)) / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_local_file_and_folder(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"abc")
    assert resolve_weights(WeightSpec(sources=[str(weights)]), "weights.x") == weights
    assert resolve_weights(WeightSpec(sources=[str(tmp_path)]), "weights.x") == tmp_path


def test_first_existing_source_wins(tmp_path):
    first, second = tmp_path / "a.pth", tmp_path / "b.pth"
    second.write_bytes(b"b")
    spec = WeightSpec(sources=[str(tmp_path / "none.pth"), str(second), str(first)])
    assert resolve_weights(spec, "weights.x") == second
    first.write_bytes(b"a")
    assert resolve_weights(WeightSpec(sources=[str(first), str(second)]), "weights.x") == first


def test_missing_message_names_weights_places_and_how_to_get(tmp_path):
    absent = tmp_path / "checkpoints" / "xraygpt_pretrained.pth"
    url = "https://example.org/models/eva_vit_g.pth"
    spec = WeightSpec(sources=[str(absent), "hf-hub:someorg/somerepo", url],
                      how_to_get="Download it from the XrayGPT README and save it as checkpoints/x.pth")
    with pytest.raises(MissingWeightsError) as info:
        resolve_weights(spec, "weights.ckpt", cache_dir=str(tmp_path / "cache"))
    message = str(info.value)
    assert "weights.ckpt" in message
    for place in (str(absent), "hf-hub:someorg/somerepo", url, "Download it from the XrayGPT README"):
        assert place in message
    assert "xraygpt fetch" in message  # remote sources that were not downloaded say how
    assert info.value.exit_code == 3


def test_missing_message_says_where_to_save(tmp_path):
    folder, archive = tmp_path / "medclip" / "pytorch_model.bin", tmp_path / "medclip.zip"
    with pytest.raises(MissingWeightsError) as info:
        resolve_weights(WeightSpec(sources=[str(folder), str(archive), "https://example.org/medclip.zip"]), "w")
    assert str(info.value).endswith(f"\nSave them as: {folder} (or {archive})")
    with pytest.raises(MissingWeightsError) as info:
        resolve_weights(WeightSpec(sources=["hf-hub:someorg/somerepo"]), "w")
    assert "Save them as" not in str(info.value)  # nowhere local to name


def test_sha256_checked_for_local_files(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"payload")
    good = WeightSpec(sources=[str(weights)], sha256=_sha(b"payload").upper())
    assert resolve_weights(good, "weights.x") == weights
    bad = WeightSpec(sources=[str(weights)], sha256=_sha(b"other"))
    with pytest.raises(MissingWeightsError, match="sha256 mismatch"):
        resolve_weights(bad, "weights.x")
    weights.write_bytes(b"other!")  # a changed file (new size) is hashed again, not served from memory
    with pytest.raises(MissingWeightsError, match="sha256 mismatch"):
        resolve_weights(good, "weights.x")


def test_mismatching_source_is_skipped_for_the_next(tmp_path):
    wrong, right = tmp_path / "wrong.pth", tmp_path / "right.pth"
    wrong.write_bytes(b"wrong")
    right.write_bytes(b"right")
    spec = WeightSpec(sources=[str(wrong), str(right)], sha256=_sha(b"right"))
    assert resolve_weights(spec, "weights.x") == right


def test_url_downloaded_into_cache_then_reused(server, tmp_path):
    base, root, requested = server
    data = bytes(range(256)) * 5000
    (root / "eva.pth").write_bytes(data)
    url, cache = f"{base}/eva.pth", tmp_path / "cache"
    spec = WeightSpec(sources=[str(tmp_path / "absent.pth"), url], sha256=_sha(data))
    with pytest.raises(MissingWeightsError, match="not in the cache"):
        resolve_weights(spec, "weights.eva_vit_g", cache_dir=str(cache))
    assert requested == []  # no download without download=True
    path = resolve_weights(spec, "weights.eva_vit_g", download=True, cache_dir=str(cache))
    assert path == url_cache_path(url, cache) and path.read_bytes() == data
    assert resolve_weights(spec, "weights.eva_vit_g", cache_dir=str(cache)) == path
    assert requested == ["/eva.pth"]
    assert [p.name for p in path.parent.iterdir()] == ["eva.pth"]  # no temp file left behind


def test_url_sha256_mismatch_deletes_temp_and_reports(server, tmp_path):
    base, root, _ = server
    (root / "eva.pth").write_bytes(b"tampered")
    url, cache = f"{base}/eva.pth", tmp_path / "cache"
    with pytest.raises(ValueError, match="sha256 mismatch"):
        download_url(url, url_cache_path(url, cache), _sha(b"genuine"))
    assert not url_cache_path(url, cache).parent.exists()  # no temp file, no empty folder left behind
    spec = WeightSpec(sources=[url], sha256=_sha(b"genuine"), how_to_get="ask the maintainers")
    with pytest.raises(MissingWeightsError) as info:
        resolve_weights(spec, "weights.eva_vit_g", download=True, cache_dir=str(cache))
    assert "download failed" in str(info.value) and "sha256 mismatch" in str(info.value)
    assert not url_cache_path(url, cache).exists()


def test_download_error_is_reported_and_next_source_tried(server, tmp_path):
    base, root, _ = server
    (root / "mirror.pth").write_bytes(b"weights")
    spec = WeightSpec(sources=[f"{base}/gone.pth", f"{base}/mirror.pth"])
    path = resolve_weights(spec, "weights.x", download=True, cache_dir=str(tmp_path / "c"))
    assert path.read_bytes() == b"weights"
    with pytest.raises(MissingWeightsError, match="download failed: HTTPError"):
        resolve_weights(WeightSpec(sources=[f"{base}/gone.pth"]), "weights.x", download=True,
                        cache_dir=str(tmp_path / "c"))


def test_plain_http_only_for_loopback(tmp_path):
    with pytest.raises(ConfigError, match="only https"):
        resolve_weights(WeightSpec(sources=["http://example.org/w.pth"]), "weights.x", cache_dir=str(tmp_path))
    assert url_cache_path("http://localhost:8000/w.pth", tmp_path).name == "w.pth"
    assert url_cache_path("https://example.org/a/w.pth", tmp_path).name == "w.pth"


def test_parse_hub_source_rule():
    assert parse_hub_source("hf-hub:org/repo") == HubSource("org/repo")
    assert parse_hub_source("hf-hub:org/repo@v1.0") == HubSource("org/repo", revision="v1.0")
    assert parse_hub_source("hf-hub:org/repo/sub/model.pth") == HubSource("org/repo", filename="sub/model.pth")
    assert parse_hub_source("hf-hub:org/repo/vicuna@abc") == HubSource("org/repo", subfolder="vicuna",
                                                                        revision="abc")
    for bad in ("hf-hub:onlyorg", "hf-hub:org/repo@"):
        with pytest.raises(ConfigError):
            parse_hub_source(bad)


def test_hub_file_and_snapshot_found_in_cache(hf_cache):
    data = b"blip2 weights"
    snapshot = _put_in_hub_cache(hf_cache, "org/blip2", {"blip2.pth": data, "vicuna/config.json": b"{}"})
    path = resolve_weights(WeightSpec(sources=["hf-hub:org/blip2/blip2.pth"], sha256=_sha(data)), "weights.b")
    assert path == snapshot / "blip2.pth" and path.read_bytes() == data
    assert resolve_weights(WeightSpec(sources=["hf-hub:org/blip2"]), "weights.b") == snapshot
    sub = resolve_weights(WeightSpec(sources=["hf-hub:org/blip2/vicuna"]), "weights.b")
    assert sub == snapshot / "vicuna" and (sub / "config.json").is_file()
    pinned = resolve_weights(WeightSpec(sources=[f"hf-hub:org/blip2/blip2.pth@{COMMIT}"]), "weights.b")
    assert pinned == path


def test_hub_not_cached_and_offline_download_reported(hf_cache):
    spec = WeightSpec(sources=["hf-hub:org/absent/model.pth", "hf-hub:org/absent"], how_to_get="run fetch")
    with pytest.raises(MissingWeightsError) as info:
        resolve_weights(spec, "weights.q", download=True)
    message = str(info.value)
    assert message.count("download failed") == 2 and "not in the Hugging Face cache" in message
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # the failures above came from offline mode, not the network
