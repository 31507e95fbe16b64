"""Load the LLaMA-family LLM and its tokenizer, and derive stop-token sequences."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import sentencepiece
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from .checkpoints import CheckpointKeyError
from .config import Config, LLMConfig
from .errors import ConfigError
from .placement import Placement

log = logging.getLogger(__name__)

# Old LLaMA checkpoints (transformers <= 4.30, like Vicuna_Radiology_fp16) store the rotary
# inv_freq buffer; current transformers recomputes it and reports it as unexpected.
IGNORED_LLM_KEYS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The folder's tokenizer; LLaMA's has no pad token, so pad = eos as XrayGPT sets it."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def make_decoder(folder: Path, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[int]], str]:
    """Ids -> text as XrayGPT's tokenizer (transformers 4.29's SentencePiece ``LlamaTokenizer``) decodes.

    Current tokenizers decode byte-fallback pieces differently: ``<0xD8><0x22>`` becomes two
    U+FFFD where SentencePiece gives U+FFFD and '"'. The text matters because the cleaned
    answer is re-tokenized into the next prompt, so with a SentencePiece model we decode with it.
    """
    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        return tokenizer.decode  # skips ids it does not know
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    pieces = processor.get_piece_size()
    special = dict(zip(tokenizer.all_special_ids, tokenizer.all_special_tokens, strict=True))
    # Tokens added beyond the SentencePiece model (e.g. a pad token) are spliced in like special ones.
    special |= {i: str(token) for i, token in tokenizer.added_tokens_decoder.items() if i >= pieces}

    def decode(ids: list[int]) -> str:
        text, run, previous_special = "", [], False
        for i, token_id in enumerate(ids):
            if token_id in special:  # the slow tokenizer splices special tokens in literally
                text += (" " if not previous_special and i else "") + processor.decode(run) + special[token_id]
                run, previous_special = [], True
            elif 0 <= token_id < pieces:
                run.append(token_id)
                previous_special = False
            else:  # generation masks these; never let one end the conversation with a traceback
                log.warning("dropped token id %d: the tokenizer has no piece for it", token_id)
        return text + processor.decode(run)

    return decode


def quantization_config(placement: Placement) -> BitsAndBytesConfig | None:
    if placement.llm_quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if placement.llm_quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=placement.llm_dtype)
    return None


def check_llm_config(folder: Path, config: LLMConfig) -> None:
    """The projection's width must match the LLM folder's hidden size."""
    hidden = AutoConfig.from_pretrained(folder).hidden_size
    if hidden != config.hidden_size:
        raise ConfigError(f"llm.hidden_size is {config.hidden_size} but the LLM in {folder} has hidden size"
                          f" {hidden}; set llm.hidden_size: {hidden}")


def check_vocabulary(folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer with more pieces than the LLM has embedding rows (its ids would index past them)."""
    rows = AutoConfig.from_pretrained(folder).vocab_size
    if len(tokenizer) > rows:
        raise CheckpointKeyError(
            f"The tokenizer in {folder} has {len(tokenizer)} tokens but the LLM's embedding has only {rows} rows:"
            " the tokenizer does not belong to these weights. Use the tokenizer files that came with the model.")


def undecodable_ids(tokenizer: PreTrainedTokenizerBase, rows: int) -> list[int]:
    """Ids the LLM can produce but the tokenizer cannot decode: the padding rows of a padded vocabulary.

    Real folders often have more embedding rows than tokens (Qwen2.5: 151936 rows, about 151665
    tokens; LLaMA variants padded to a multiple of 64); generation masks these ids.
    """
    if rows > len(tokenizer):
        log.info("the LLM has %d embedding rows for %d tokens: ids %d..%d are never generated",
                 rows, len(tokenizer), len(tokenizer), rows - 1)
    return list(range(len(tokenizer), rows))


def _quiet_int8_cast_warning(record: logging.LogRecord) -> bool:
    # 8-bit on the CPU computes in float32; bitsandbytes then casts each matmul input to float16
    # itself and logs it for every layer of every token. The cast is expected, so drop the line.
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def load_llm(folder: Path, config: LLMConfig, placement: Placement) -> torch.nn.Module:
    """Load a Hugging Face causal-LM folder (sharded .bin or safetensors) for ``placement``."""
    check_llm_config(folder, config)
    if placement.llm_quantization == "8bit":
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_quiet_int8_cast_warning)
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=placement.llm_dtype, device_map=placement.llm_device_map,
        quantization_config=quantization_config(placement), output_loading_info=True)
    unexpected = [k for k in info["unexpected_keys"] if not any(re.fullmatch(p, k) for p in IGNORED_LLM_KEYS)]
    if info["missing_keys"] or unexpected or info.get("mismatched_keys"):
        raise CheckpointKeyError(f"LLM in {folder}: missing {sorted(info['missing_keys'])[:8]},"
                                 f" unexpected {unexpected[:8]},"
                                 f" mismatched {sorted(info.get('mismatched_keys') or [])[:8]}")
    model.eval().requires_grad_(False)
    log.info("LLM loaded: %s layers, dtype %s, quantization %s", model.config.num_hidden_layers,
             placement.llm_dtype, placement.llm_quantization)
    return model


@contextlib.contextmanager
def peft_without_deprecation_notice() -> Iterator[None]:
    """Wrap a peft model around an LLM without transformers' "`is_gradient_checkpointing` is deprecated".

    peft reads that deprecated property on every adapter it wraps, and transformers 5 answers with a
    FutureWarning each time: nothing our code calls, nothing the user can change. Only that warning,
    raised in transformers.modeling_utils, is ignored, and only here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                                module=r"transformers\.modeling_utils")
        yield


def load_backend_llm(config: Config, folder: Path, llm_config: LLMConfig, placement: Placement) -> torch.nn.Module:
    """The LLM where ``runtime.llm_backend`` says: loaded here (transformers), or served by vLLM with only its token
    embeddings here (``remote_llm.RemoteLLM``; the server is reached or launched before this returns)."""
    if config.runtime.llm_backend == "vllm":
        from .serving.remote import load_remote_llm

        check_llm_config(folder, llm_config)
        return load_remote_llm(config, folder, placement.llm_dtype, placement.llm_device, llm_config.max_length)
    return load_llm(folder, llm_config, placement)


def apply_lora_adapter(llm: torch.nn.Module, folder: str | Path, placement: Placement) -> torch.nn.Module:
    """A peft LoRA adapter folder (from ``xraygpt finetune``) on the LLM: merged into the weights when they are
    not quantised (no per-token cost), else kept as peft layers."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"weights.lora: {folder} is not a peft adapter folder (no adapter_config.json)")
    with peft_without_deprecation_notice():
        model = PeftModel.from_pretrained(llm, str(folder), is_trainable=False)
    if placement.llm_quantization is None:
        model = model.merge_and_unload()
    log.info("LoRA adapter %s applied (%s)", folder.name, "merged" if placement.llm_quantization is None else "peft")
    return model.eval().requires_grad_(False)


@torch.inference_mode()
def embed_ids(llm: torch.nn.Module, ids: list[int], device: torch.device) -> torch.Tensor:
    """Token ids -> ``(1, n, hidden)`` input embeddings of ``llm`` on ``device``."""
    return llm.get_input_embeddings()(torch.tensor([ids], dtype=torch.long, device=device))


def stop_token_sequences(tokenizer: PreTrainedTokenizerBase, stop: str) -> list[list[int]]:
    """Every token sequence whose text is exactly ``stop`` (a word-start marker allowed first).

    For Vicuna and ``###`` this finds XrayGPT's hard-coded ``[835]`` and ``[2277, 29937]`` among
    the others, for any tokenizer, instead of hard-coding ids.
    """
    pieces: dict[str, list[tuple[int, bool]]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        text, leading_space = _piece_text(token)
        if text and text in stop:
            pieces.setdefault(text, []).append((token_id, leading_space))
    sequences: list[list[int]] = []

    def extend(done: str, ids: list[int]) -> None:
        if done == stop:
            sequences.append(ids)
            return
        rest = stop[len(done):]
        for text, options in pieces.items():
            if rest.startswith(text):
                for token_id, leading_space in options:
                    if not leading_space or not ids:  # a word-start marker only on the first piece
                        extend(done + text, ids + [token_id])

    extend("", [])
    return sorted(sequences, key=lambda s: (len(s), s))


def _piece_text(token: str) -> tuple[str, bool]:
    """A vocabulary piece as plain text, and whether it starts with a word-start marker."""
    if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token):  # SentencePiece byte fallback
        return chr(int(m.group(1), 16)), False
    for marker in ("\u2581", "\u0120"):  # SentencePiece '▁', byte-level BPE 'Ġ'
        if token.startswith(marker):
            return token[len(marker):], True
    return token, False
