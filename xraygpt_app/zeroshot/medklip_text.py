"""MedKLIP's entity queries: the [CLS] state of BERT (Bio_ClinicalBERT) on each entity's description.

MedKLIP tokenizes with ALBEF's copy of the slow ``BertTokenizer``, which starts a text with [CLS] but
ends it with **no** [SEP]; ``padding='max_length', truncation=True, max_length=64`` then keeps 63
word pieces. transformers' tokenizers add [SEP], which moves every query, so we build the ids here
from transformers' pure-Python ``BertTokenizerLegacy`` (the same algorithm as ALBEF's copy; it reads
``do_lower_case`` from the folder's tokenizer_config.json and lowercases when there is none).

The 75 queries of ``observation explanation.json`` are computed once per (BERT files, JSON) pair and
kept on disk, keyed by the files' sha256, under the weights cache folder: later loads skip BERT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import BadInputError, MissingWeightsError
from ..weights import HUB_PREFIX, file_sha256

log = logging.getLogger(__name__)

MAX_TEXT_LENGTH = 64  # MedKLIP's get_tokenizer: padding='max_length', truncation=True, max_length=64
# The files of a BERT folder that decide its [CLS] states (what the disk cache is keyed on).
BERT_FILES = ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "model.safetensors",
              "pytorch_model.bin")
CACHE_FOLDER = "medklip-queries"
CACHE_FORMAT = 1  # bump when the way queries are computed changes


def read_descriptions(path: str | Path) -> dict[str, str]:
    """Entity name -> description from MedKLIP's ``observation explanation.json`` (file order kept)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot read the MedKLIP entity descriptions {path}: {exc}") from None
    if not isinstance(data, dict) or not data or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                                         for k, v in data.items()):
        raise BadInputError(f"{path}: expected a JSON object of entity name -> description text")
    return data


def text_folder(text_config: str) -> Path:
    """The local BERT folder of ``text_config``: a folder, or an ``hf-hub:`` id already in the Hub cache."""
    if not text_config.startswith(HUB_PREFIX):
        folder = Path(text_config).expanduser()
        if not (folder / "config.json").is_file():
            raise MissingWeightsError(f"MedKLIP's text_config {folder} is not a BERT folder (no config.json with"
                                      " its weights): point it at Bio_ClinicalBERT's folder")
        return folder
    import huggingface_hub

    repo = text_config.removeprefix(HUB_PREFIX)
    try:
        return Path(huggingface_hub.snapshot_download(repo, local_files_only=True,
                                                      allow_patterns=[*BERT_FILES[:4], "pytorch_model.bin"]))
    except Exception:  # noqa: BLE001 - huggingface_hub raises several types for "not cached"
        raise MissingWeightsError(f"MedKLIP's text encoder {text_config} is not in the Hugging Face cache: run "
                                  f"`xraygpt fetch` (or `hf download {repo}`), or point text_config at a local "
                                  "BERT folder") from None


def load_tokenizer(folder: Path):
    """The slow (pure-Python) BERT tokenizer of ``folder``: vocab.txt plus its tokenizer_config.json if any."""
    from transformers import BertTokenizerLegacy

    return BertTokenizerLegacy.from_pretrained(str(folder))


def medklip_token_ids(tokenizer, texts: Sequence[str], max_length: int = MAX_TEXT_LENGTH
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (len(texts), max_length): [CLS] + word pieces, no [SEP], padded."""
    ids = torch.full((len(texts), max_length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), max_length), dtype=torch.long)
    for row, text in enumerate(texts):
        pieces = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))[:max_length - 1]
        tokens = [tokenizer.cls_token_id, *pieces]
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return ids, mask


class DescriptionEncoder:
    """BERT [CLS] states of descriptions; the tokenizer and BERT load on first use (a cache hit needs neither)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._tokenizer = self._bert = None

    def _load(self) -> None:
        from transformers import BertModel

        started = time.perf_counter()
        try:
            self._tokenizer = load_tokenizer(self.folder)
            self._bert = BertModel.from_pretrained(str(self.folder)).eval()
        except OSError as exc:  # no weights or vocabulary in the folder
            raise MissingWeightsError(f"MedKLIP's text encoder in {self.folder} cannot be loaded: "
                                      f"{str(exc).splitlines()[0][:200]}") from None
        log.info("MedKLIP text encoder loaded in %.1f s", time.perf_counter() - started)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), hidden) float32 [CLS] states, in one batch as MedKLIP encodes its book."""
        if self._bert is None:
            self._load()
        ids, mask = medklip_token_ids(self._tokenizer, texts)
        return self._bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0, :].float()


def cache_key(descriptions_path: Path, folder: Path) -> str:
    """sha256 over the descriptions file and the BERT folder's files (and how queries are computed)."""
    digest = hashlib.sha256(f"medklip-queries:{CACHE_FORMAT}:{MAX_TEXT_LENGTH}".encode())
    for name in ("descriptions", *BERT_FILES):
        path = descriptions_path if name == "descriptions" else folder / name
        if path.is_file():
            digest.update(f"{name}:{file_sha256(path)}".encode())
    return digest.hexdigest()


def entity_queries(descriptions: dict[str, str], encoder: DescriptionEncoder, key: str,
                   cache_dir: Path) -> torch.Tensor:
    """(E, hidden) queries of ``descriptions`` (in order): from the disk cache, or computed and stored."""
    path = cache_dir / CACHE_FOLDER / f"{key}.pt"
    names = list(descriptions)
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored["names"] == names:
                log.info("MedKLIP entity queries read from the cache")
                return stored["queries"]
        except Exception as exc:  # noqa: BLE001 - a damaged cache file is recomputed, never trusted
            log.warning("ignoring the unreadable MedKLIP query cache file (%s)", type(exc).__name__)
    started = time.perf_counter()
    queries = encoder(list(descriptions.values()))
    log.info("MedKLIP: %d entity queries computed in %.1f s", len(names), time.perf_counter() - started)
    _store(path, {"names": names, "queries": queries})
    return queries


def _store(path: Path, payload: dict) -> None:
    """Write atomically; a cache that cannot be written only costs time on the next load."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write the MedKLIP query cache in %s: %s", path.parent, exc.strerror or exc)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
