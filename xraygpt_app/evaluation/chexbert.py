"""The CheXbert report labeler: 14 observations per radiology report, as f1chexbert 0.0.2 computes them.

CheXbert (Smit et al. 2020) is a BERT-base with one linear head per observation on the [CLS]
state: 13 heads of 4 classes (blank, positive, negative, uncertain) and "No Finding" with 2.
The released ``chexbert.pth`` is ``{'model_state_dict': ...}`` saved from ``nn.DataParallel``
(keys prefixed ``module.``); its BERT goes into transformers' ``BertModel`` through one pure
remap, the heads into ``nn.Linear``. Sizes come from the BERT folder's ``config.json`` and the
checkpoint's head shapes, so any size of the format loads.

Labeling runs in batches padded on the right with an attention mask; the reference labels one
report at a time with no padding, and the tests check that both give the same labels.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import CheckpointKeyError, StateDict, load_exact, read_state_dict
from ..errors import BadInputError

log = logging.getLogger(__name__)

# CheXbert's observation order: head i labels CONDITIONS[i] (f1chexbert's target_names).
CONDITIONS = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices", "No Finding",
)
# The five that CheXpert competition tables report (f1chexbert's target_names_5).
FIVE_CONDITIONS = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
BLANK, POSITIVE, NEGATIVE, UNCERTAIN = 0, 1, 2, 3  # a head's class index
# CheXbert's own labeler output per class index: blank "", positive 1, negative 0, uncertain -1.
CLASSIFICATION_VALUES = {BLANK: "", POSITIVE: 1, NEGATIVE: 0, UNCERTAIN: -1}
MAX_IDS = 512  # BERT's positions: longer reports keep their first 511 ids and [SEP]

CONTAINER_KEY = "model_state_dict"
DATA_PARALLEL_PREFIX = "module."
# transformers 4.x saved the position-id buffer; 5.x rebuilds it (non-persistent), so it is dropped by name.
DROPPED_KEYS = ("bert.embeddings.position_ids",)
HEAD_KEY = re.compile(r"linear_heads\.(\d+)\.(weight|bias)")


def clean_report(text: str) -> str:
    """f1chexbert's clean-up: strip, newlines to spaces, runs of whitespace to one space, strip."""
    return re.sub(r"\s+", " ", text.strip().replace("\n", " ")).strip()


def encode_report(text: str, tokenizer) -> list[int]:
    """Token ids as the reference builds them: ``[CLS] word pieces [SEP]``, cut to 512 ids keeping [SEP]."""
    pieces = tokenizer.tokenize(clean_report(text))
    ids = [tokenizer.cls_token_id, *tokenizer.convert_tokens_to_ids(pieces), tokenizer.sep_token_id]
    if len(ids) > MAX_IDS:
        ids = ids[: MAX_IDS - 1] + [tokenizer.sep_token_id]
    return ids  # an empty report is [CLS] [SEP]


def remap_chexbert(state_dict: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict]:
    """Split a CheXbert ``model_state_dict`` into (BertModel state dict, heads state dict).

    Pure: the input is not changed. ``module.`` (DataParallel) is removed where present; keys in
    ``DROPPED_KEYS`` are dropped; any other key outside ``bert.*`` and ``linear_heads.N.*`` raises,
    naming it. Heads keys become ``N.weight``/``N.bias`` (an ``nn.ModuleList``'s names).
    """
    bert, heads, unknown = {}, {}, []
    for key, tensor in state_dict.items():
        name = key.removeprefix(DATA_PARALLEL_PREFIX)
        if name in DROPPED_KEYS:
            continue
        if name.startswith("bert."):
            bert[name.removeprefix("bert.")] = tensor
        elif match := HEAD_KEY.fullmatch(name):
            heads[f"{match[1]}.{match[2]}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise CheckpointKeyError(f"Unknown key(s) in the CheXbert checkpoint: {shown}")
    return bert, heads


def head_shapes(heads: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
    """(classes, hidden) of each head, in head order, read from the checkpoint's weights."""
    count = len({key.split(".")[0] for key in heads})
    missing = [f"linear_heads.{i}.weight" for i in range(count) if f"{i}.weight" not in heads]
    if missing or count != len(CONDITIONS):
        raise CheckpointKeyError(f"the CheXbert checkpoint has {count} heads (CheXbert has {len(CONDITIONS)},"
                                 f" one per observation){'; missing ' + ', '.join(missing) if missing else ''}")
    return [tuple(heads[f"{i}.weight"].shape) for i in range(count)]


def load_tokenizer(folder: Path):
    """An uncased WordPiece tokenizer from the folder's ``vocab.txt`` (all that bert-base-uncased needs)."""
    from transformers import BertTokenizer

    vocab_file = folder / "vocab.txt"
    if not vocab_file.is_file():
        raise BadInputError(f"{folder}: no vocab.txt (the CheXbert BERT folder needs bert-base-uncased's vocab.txt)")
    lines = vocab_file.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline, not an empty token
    return BertTokenizer(vocab={token: index for index, token in enumerate(lines)}, do_lower_case=True)


def load_bert_config(folder: Path, bert_state: Mapping[str, torch.Tensor] | None = None):
    """The BERT's architecture from the folder's ``config.json`` (dropout is off in eval mode).

    A folder with only ``vocab.txt`` gets the sizes from the checkpoint's tensors instead
    (:func:`config_from_state`), with a warning: the number of attention heads is not in the weights.
    """
    from transformers import BertConfig

    path = folder / "config.json"
    if not path.is_file():
        if bert_state is None:
            raise BadInputError(f"{folder}: no config.json (the CheXbert BERT folder needs bert-base-uncased's config)")
        return config_from_state(bert_state, folder)
    try:
        return BertConfig(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise BadInputError(f"{path}: not a BERT config ({exc})") from None


def config_from_state(bert_state: Mapping[str, torch.Tensor], folder: Path):
    """A BertConfig sized by the checkpoint's tensors, for a folder without config.json.

    Vocabulary, width, depth, feed-forward width, positions and token types are read from the
    weights; the head count is not in them, so BERT's head size of 64 is assumed (bert-base: 12).
    """
    from transformers import BertConfig

    needed = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
              "embeddings.token_type_embeddings.weight", "encoder.layer.0.intermediate.dense.weight")
    absent = [f"bert.{key}" for key in needed if key not in bert_state]
    if absent:
        raise CheckpointKeyError(f"the CheXbert checkpoint lacks {', '.join(absent)}")
    words = bert_state["embeddings.word_embeddings.weight"]
    layers = {int(key.split(".")[2]) for key in bert_state if key.startswith("encoder.layer.")}
    hidden = words.shape[1]
    heads = max(hidden // 64, 1)
    log.warning("%s has no config.json: CheXbert's BERT sized from the checkpoint, assuming %d attention heads"
                " (head size 64, as bert-base); put bert-base-uncased's config.json there to be sure", folder, heads)
    return BertConfig(vocab_size=words.shape[0], hidden_size=hidden, num_hidden_layers=len(layers),
                      num_attention_heads=heads,
                      intermediate_size=bert_state["encoder.layer.0.intermediate.dense.weight"].shape[0],
                      max_position_embeddings=bert_state["embeddings.position_embeddings.weight"].shape[0],
                      type_vocab_size=bert_state["embeddings.token_type_embeddings.weight"].shape[0])


class CheXbertLabeler(nn.Module):
    """BertModel + 14 heads; ``label_classes(reports)`` gives each report's 14 class indices."""

    def __init__(self, bert_config, shapes: Sequence[tuple[int, int]], tokenizer) -> None:
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel(bert_config)  # with its pooler: the checkpoint has one (unused, as in CheXbert)
        self.heads = nn.ModuleList(nn.Linear(hidden, classes) for classes, hidden in shapes)
        self.tokenizer = tokenizer

    @classmethod
    def from_files(cls, weights: str | Path, bert_folder: str | Path) -> CheXbertLabeler:
        """Load ``chexbert.pth`` with the BERT config and vocabulary of ``bert_folder`` (strict)."""
        folder = Path(bert_folder)
        bert_state, head_state = remap_chexbert(read_state_dict(weights, CONTAINER_KEY))
        config = load_bert_config(folder, bert_state)
        model = cls(config, head_shapes(head_state), load_tokenizer(folder))
        load_exact(model.bert, bert_state, f"CheXbert BERT in {weights} (config {folder / 'config.json'})")
        load_exact(model.heads, head_state, f"CheXbert heads in {weights}")
        if len(model.tokenizer) != config.vocab_size:
            log.warning("vocab.txt has %d tokens, config.json says %d", len(model.tokenizer), config.vocab_size)
        return model.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, 14) argmax class per head from the [CLS] position of the last hidden state."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return torch.stack([head(hidden).argmax(dim=-1) for head in self.heads], dim=1)

    @torch.inference_mode()
    def label_classes(self, reports: Sequence[str], batch_size: int = 16) -> list[list[int]]:
        """Each report's 14 class indices (0 blank, 1 positive, 2 negative, 3 uncertain), in input order.

        Reports are sorted by length so a batch pads little; ``batch_size=1`` is the reference's way.
        """
        if batch_size < 1:
            raise BadInputError("the CheXbert batch size must be at least 1")
        encoded = [encode_report(text, self.tokenizer) for text in reports]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out: list[list[int] | None] = [None] * len(encoded)
        for first in range(0, len(order), batch_size):
            chunk = order[first:first + batch_size]
            ids, mask = self._pad([encoded[i] for i in chunk])
            for index, row in zip(chunk, self(ids, mask).tolist(), strict=True):
                out[index] = row
        return out  # type: ignore[return-value]

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right padding keeps every report's positions 0..n-1, as unpadded; the mask hides the pads."""
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        return ids, mask


def rrg_labels(classes: Sequence[Sequence[int]]) -> list[list[int]]:
    """f1chexbert's ``rrg`` convention, used for F1: positive or uncertain -> 1, blank or negative -> 0."""
    return [[int(c in (POSITIVE, UNCERTAIN)) for c in row] for row in classes]


def classification_labels(classes: Sequence[Sequence[int]]) -> list[list[int | str]]:
    """CheXbert's own labeler output: blank "", positive 1, negative 0, uncertain -1."""
    return [[CLASSIFICATION_VALUES[c] for c in row] for row in classes]


HOW_TO_GET = ("CheXbert's chexbert.pth is in the Hub repository StanfordAIMI/RRG_scorers and its BERT folder is"
              " bert-base-uncased (config.json and vocab.txt): set evaluation.chexbert.weights and"
              " evaluation.chexbert.bert (eval_configs/xraygpt_eval.yaml names both; `xraygpt fetch` downloads them)")


def chexbert_files(config, download: bool = False) -> tuple[Path, Path]:
    """(chexbert.pth, BERT folder) of a config, resolved as every weights entry is (MissingWeightsError if absent)."""
    from ..weights import resolve_weights

    found = []
    for name in ("weights", "bert"):
        spec = getattr(config.evaluation.chexbert, name)
        if not spec.how_to_get:
            spec = dataclasses.replace(spec, how_to_get=HOW_TO_GET)
        found.append(resolve_weights(spec, f"evaluation.chexbert.{name}", download=download,
                                     cache_dir=config.weights.cache_dir))
    return found[0], found[1]
