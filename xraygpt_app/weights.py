"""Resolve a weights spec to a local file or folder: local path > cache > download.

A source (one entry of ``WeightSpec.sources``) is one of:

- a local path to a file or folder (made absolute by ``load_config``);
- ``hf-hub:org/repo[@revision]``: a whole Hub repo snapshot (e.g. a Vicuna folder);
- ``hf-hub:org/repo/path/in/repo.ext[@revision]``: one file of a Hub repo. The rule: after
  ``org/repo``, a path whose last part has an extension (``.pth``, ``.bin``...) is a file;
  one without (``hf-hub:org/repo/subfolder``) is a folder of the repo, fetched as a snapshot
  restricted to that folder;
- an ``https://`` URL of one file, downloaded into the cache dir. Plain ``http://`` is accepted
  only for loopback hosts (127.0.0.1, ::1, localhost: local mirrors and tests): a weights file
  is a pickle, so it must not travel over a channel anyone can rewrite.

Order (``resolve_weights``): first, every source in order without network (a local path that
exists, a Hub file or snapshot already in the huggingface_hub cache, a URL file already in our
cache); then, only with ``download=True``, every remote source in order is downloaded (Hub
through huggingface_hub, which has its own cache and progress bars; URLs atomically with a
progress bar on stderr). When ``sha256`` is given it is checked for every file we return, local
or downloaded (the digest is memoised per path, size and mtime). A source whose file fails the
check is skipped like a missing one. If nothing is found, one ``MissingWeightsError`` says which
weights, every place looked (with download errors) and how to get them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .config import Config, WeightSpec, iter_weight_specs
from .errors import ConfigError, MissingWeightsError

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
CHUNK = 1 << 20
URL_TIMEOUT_S = 60
PROBE_TIMEOUT_S = 10  # asking a server for a size before downloading


@dataclass(frozen=True)
class HubSource:
    """A parsed ``hf-hub:`` source; ``filename`` set for a file, ``subfolder`` for a folder in the repo."""

    repo_id: str
    filename: str | None = None
    subfolder: str | None = None
    revision: str | None = None


@dataclass
class WeightStatus:
    """One weights entry of a config for ``xraygpt check``: its resolved path, or None and why."""

    name: str
    path: Path | None
    message: str


class _SourceUnusable(Exception):
    """A source exists but cannot be used (checksum mismatch); the message says why."""


def parse_hub_source(source: str) -> HubSource:
    """Split ``hf-hub:org/repo[/path][@revision]`` (see the module docstring for the file rule)."""
    body = source[len(HUB_PREFIX):].strip("/")
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2 or revision == "":
        raise ConfigError(f"weights source {source!r}: expected hf-hub:org/repo[/path/in/repo][@revision]")
    repo_id, rest = "/".join(parts[:2]), "/".join(parts[2:])
    if not rest:
        return HubSource(repo_id, revision=revision)
    if "." in parts[-1]:
        return HubSource(repo_id, filename=rest, revision=revision)
    return HubSource(repo_id, subfolder=rest, revision=revision)


def is_remote(source: str) -> bool:
    """True for a Hub id or a URL (something ``download=True`` can fetch)."""
    return source.startswith(HUB_PREFIX) or "://" in source


def default_cache_dir() -> Path:
    """Where URL downloads go when the config sets no ``weights.cache_dir``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xraygpt-app"


def url_cache_path(url: str, cache_dir: str | Path | None = None) -> Path:
    """The cache file of a URL: ``<cache>/<12 hex of sha256(url)>/<basename>`` (no collisions)."""
    _check_url(url)
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    return Path(cache_dir).expanduser() / key / name if cache_dir else default_cache_dir() / key / name


def resolve_weights(spec: WeightSpec, name: str, *, download: bool = False,
                    cache_dir: str | None = None) -> Path:
    """Return the local file or folder of ``spec``, trying its sources in the documented order.

    ``name`` (e.g. ``weights.eva_vit_g``) only labels the error. Raises MissingWeightsError with
    every place looked when no source yields the weights.
    """
    looked: dict[str, str] = {}  # source -> why it was not usable
    for source in spec.sources:
        try:
            found = _find_offline(source, spec, cache_dir)
        except _SourceUnusable as exc:
            looked[source] = str(exc)
            continue
        if found is not None:
            return found
        looked[source] = _why_absent(source, download, cache_dir)
    if download:
        for source in filter(is_remote, spec.sources):
            try:
                return _download(source, spec, cache_dir)
            except Exception as exc:  # noqa: BLE001 - any failure is reported, then the next source is tried
                log.info("download failed: %s", type(exc).__name__)
                looked[source] += f"; download failed: {_brief(exc)}"
    raise MissingWeightsError(_missing_message(spec, name, looked), name)


def weights_status(config: Config) -> list[WeightStatus]:
    """Which weights of ``config`` are present now (no download), for ``xraygpt check``."""
    statuses = []
    for name, spec in iter_weight_specs(config, evaluation=True).items():
        try:
            path = resolve_weights(spec, name, cache_dir=config.weights.cache_dir)
            statuses.append(WeightStatus(name, path, f"present: {path}"))
        except MissingWeightsError as exc:
            statuses.append(WeightStatus(name, None, str(exc)))
    return statuses


def _find_offline(source: str, spec: WeightSpec, cache_dir: str | None) -> Path | None:
    """The source's file/folder if available without network, else None."""
    if source.startswith(HUB_PREFIX):
        found = _hub_cached(parse_hub_source(source), spec.files)
    elif "://" in source:
        path = url_cache_path(source, cache_dir)
        found = path if path.is_file() else None
    else:
        path = Path(source).expanduser()
        found = path if path.exists() else None
    if found is not None:
        _verify(found, spec.sha256)
    return found


def _why_absent(source: str, download: bool, cache_dir: str | None) -> str:
    hint = "" if download or not is_remote(source) else "; `xraygpt fetch` downloads it"
    if source.startswith(HUB_PREFIX):
        return f"not in the Hugging Face cache{hint}"
    if "://" in source:
        return f"not in the cache {url_cache_path(source, cache_dir).parent.parent}{hint}"
    return "no such file or folder"


def _missing_message(spec: WeightSpec, name: str, looked: dict[str, str]) -> str:
    places = "\n".join(f"  - {source} ({why})" for source, why in looked.items()) or "  (no sources configured)"
    how = spec.how_to_get.strip() or f"set {name} in the config to a local path, hf-hub:org/repo or an https URL"
    local = [source for source in spec.sources if not is_remote(source)]
    where = f"\nSave them as: {local[0]}" if local else ""
    where += f" (or {', '.join(local[1:])})" if len(local) > 1 else ""
    return f"Missing weights for {name}. Looked in:\n{places}\nHow to get them: {how}{where}"


def _brief(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


# --- checksums ---------------------------------------------------------------------------------

def _verify(path: Path, sha256: str | None) -> None:
    """Raise _SourceUnusable when a file's digest differs from ``sha256`` (folders are not hashed)."""
    if not sha256 or not path.is_file():
        if sha256 and path.is_dir():
            log.warning("sha256 given for a folder; it applies to single files only and is not checked")
        return
    actual = file_sha256(path)
    if actual != sha256.lower():
        raise _SourceUnusable(f"sha256 mismatch: expected {sha256.lower()}, got {actual}")


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a file (memoised per path, size and mtime)."""
    stat = Path(path).stat()
    return _sha256_file(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_file(path: str, size: int, mtime_ns: int) -> str:
    """Digest of a file; size and mtime are part of the key so an edited file is hashed again."""
    start = time.perf_counter()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    log.info("sha256 of %d bytes in %.2f s", size, time.perf_counter() - start)
    return digest.hexdigest()


# --- Hugging Face Hub --------------------------------------------------------------------------

def _hub_cached(hub: HubSource, files: list[str]) -> Path | None:
    """A Hub file or snapshot already in huggingface_hub's cache, without touching the network."""
    import huggingface_hub  # deferred: not needed for local paths

    if hub.filename:
        found = huggingface_hub.try_to_load_from_cache(hub.repo_id, hub.filename, revision=hub.revision)
        return Path(found) if isinstance(found, str) else None
    try:
        folder = huggingface_hub.snapshot_download(hub.repo_id, revision=hub.revision, local_files_only=True,
                                                   allow_patterns=_allow(hub, files))
    except Exception:  # noqa: BLE001 - huggingface_hub raises several types for "not cached"
        return None
    path = Path(folder) / hub.subfolder if hub.subfolder else Path(folder)
    return path if path.exists() else None


def _allow(hub: HubSource, files: list[str]) -> list[str] | None:
    """snapshot_download's patterns: the spec's ``files`` (inside the subfolder, if any), or all of it."""
    prefix = f"{hub.subfolder}/" if hub.subfolder else ""
    if files:
        return [prefix + pattern for pattern in files]
    return [f"{prefix}*"] if prefix else None


def _download_hub(hub: HubSource, files: list[str]) -> Path:
    import huggingface_hub

    if hub.filename:
        return Path(huggingface_hub.hf_hub_download(hub.repo_id, hub.filename, revision=hub.revision))
    folder = Path(huggingface_hub.snapshot_download(hub.repo_id, revision=hub.revision,
                                                    allow_patterns=_allow(hub, files)))
    return folder / hub.subfolder if hub.subfolder else folder


# Config and tokenizer files only: what the zero-shot towers read from a Hub model repo whose
# weights come from elsewhere (MedCLIP's file, BiomedCLIP's checkpoint).
CONFIG_FILE_PATTERNS = ("*.json", "*.txt", "*.model")


def download_hub_configs(repo_id: str) -> Path:
    """Fetch a Hub repo's config/tokenizer files into the huggingface_hub cache; return its folder."""
    import huggingface_hub

    return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=list(CONFIG_FILE_PATTERNS)))


# --- downloads ---------------------------------------------------------------------------------

def download_size(source: str, files: list[str] | tuple[str, ...] = ()) -> int | None:
    """Bytes that downloading ``source`` would fetch (HTTP Content-Length, or the Hub's file sizes,
    only ``files`` of a folder when given); None when the server does not say or cannot be reached
    (the download then reports why)."""
    try:
        if source.startswith(HUB_PREFIX):
            return _hub_size(parse_hub_source(source), list(files))
        _check_url(source)
        request = urllib.request.Request(source, method="HEAD")
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
        return int(length) if length else None
    except Exception:  # noqa: BLE001 - a size is a courtesy; the download itself reports failures
        return None


def _hub_size(hub: HubSource, files: list[str]) -> int | None:
    import fnmatch

    import huggingface_hub

    info = huggingface_hub.HfApi().model_info(hub.repo_id, revision=hub.revision, files_metadata=True,
                                              timeout=PROBE_TIMEOUT_S)
    patterns = _allow(hub, files) or ["*"]
    sizes = [f.size for f in info.siblings or [] if f.size is not None
             and (f.rfilename == hub.filename if hub.filename
                  else any(fnmatch.fnmatch(f.rfilename, pattern) for pattern in patterns))]
    return sum(sizes) if sizes else None


def human_size(size: int | None) -> str:
    """``1.9 GiB``-style text, or "size unknown"."""
    if size is None:
        return "size unknown"
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _download(source: str, spec: WeightSpec, cache_dir: str | None) -> Path:
    """Download one remote source and return its local path (checksum verified)."""
    start = time.perf_counter()
    if source.startswith(HUB_PREFIX):
        path = _download_hub(parse_hub_source(source), spec.files)
        _verify_or_raise(path, spec.sha256)
    else:
        path = download_url(source, url_cache_path(source, cache_dir), spec.sha256)
    log.info("downloaded weights in %.1f s", time.perf_counter() - start)
    return path


def _verify_or_raise(path: Path, sha256: str | None) -> None:
    try:
        _verify(path, sha256)
    except _SourceUnusable as exc:
        raise ValueError(str(exc)) from None


def _check_url(url: str) -> None:
    """https anywhere; http only for loopback hosts (see the module docstring)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "https" and parsed.hostname:
        return
    if parsed.scheme == "http" and parsed.hostname in LOOPBACK_HOSTS:
        return
    raise ConfigError(f"weights source {url!r}: only https:// URLs (or http:// to 127.0.0.1/localhost) are allowed")


def download_url(url: str, target: Path, sha256: str | None = None) -> Path:
    """Download ``url`` to ``target`` atomically (temp file + rename), checking ``sha256`` if given.

    A progress bar goes to stderr. On a checksum mismatch or any error the temp file is deleted
    and the error raised; ``target`` is never left half-written.
    """
    from tqdm.auto import tqdm  # deferred: only downloads need it

    _check_url(url)
    new_folder = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
                      file=sys.stderr, leave=False) as bar:
                while block := response.read(CHUNK):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        actual = digest.hexdigest()
        if sha256 and actual != sha256.lower():
            raise ValueError(f"sha256 mismatch: expected {sha256.lower()}, got {actual}")
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        if new_folder:  # leave no empty <cache>/<hash>/ folder behind a failed download
            with contextlib.suppress(OSError):  # another process may have put a file there meanwhile
                target.parent.rmdir()
        raise
    return target
