"""A tiny llava-family model of the real architectures, written in the real file formats.

- the vision tower: an open_clip folder in BiomedCLIP's layout (``open_clip_config.json`` naming a
  timm ``vit_tiny_patch16_224`` trunk, 224 px, patch 16 -> 196 patch tokens of width 192, and a
  Hugging Face BERT text tower by its Hub id, plus ``open_clip_pytorch_model.bin``), made with
  open_clip's own ``create_model``; the text tower's config is the shared tiny BERT
  (``tower.text_config``), so nothing is downloaded;
- the LLM: a ``LlamaForCausalLM`` folder (safetensors) with the fixture's SentencePiece tokenizer and
  TinyLlama-1.1B-Chat-v1.0's chat template (``chat_template.jinja``, as ``save_pretrained`` writes it);
- the projector: LLaVA-1.5's ``mlp2x_gelu`` as safetensors under LLaVA's key names.

Random weights: answers are gibberish by design. ``python tests/tinyllava.py DIR`` writes a set
and ``DIR/llava_tiny.yaml`` (what ``eval_configs/llava_tiny.yaml`` expects in checkpoints/llava_tiny).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tinymodels  # noqa: E402

BERT_TINY = tinymodels.SHARED / "fixtures" / "medclip_tiny" / "bert_tiny"
PUBMEDBERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"  # what BiomedCLIP's config names
TOWER_WIDTH = 192  # vit_tiny_patch16_224
# Head size 32 (64 / 2 heads): the smallest vLLM's CPU build serves, so the tiny model runs with the vllm backend too.
LLM_DIMS = tinymodels.TinyDims(llm_hidden=64, llm_layers=2, llm_heads=2, llm_intermediate=128)
# TinyLlama-1.1B-Chat-v1.0's template (Zephyr style): the end of a turn is the EOS token </s>.
TINYLLAMA_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


@dataclass
class TinyLlava:
    root: Path
    config: Path
    tower_dir: Path
    text_dir: Path
    llm_dir: Path
    projector: Path
    reference_clip: torch.nn.Module  # the open_clip model that made the tower weights
    llm: torch.nn.Module


def open_clip_config(text_model: str, timm_model: str = "vit_tiny_patch16_224") -> dict:
    """BiomedCLIP's open_clip_config.json with a (tiny) timm ViT and a given text model name."""
    return {
        "model_cfg": {
            "embed_dim": 64,
            "vision_cfg": {"timm_model_name": timm_model, "timm_model_pretrained": False,
                           "timm_pool": "", "timm_proj": "linear", "image_size": 224},
            "text_cfg": {"hf_model_name": text_model, "hf_tokenizer_name": text_model, "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }


def write_tower(root: Path, seed: int = 0, timm_model: str = "vit_tiny_patch16_224"
                ) -> tuple[Path, Path, torch.nn.Module]:
    """(open_clip folder, local text config folder, the reference open_clip model); ``timm_model``
    ``vit_base_patch16_224`` gives BiomedCLIP's own tower architecture (random weights)."""
    text_dir = root / "bert_tiny"
    shutil.copytree(BERT_TINY, text_dir, dirs_exist_ok=True)
    build_dir = root / "_build"
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "open_clip_config.json").write_text(json.dumps(open_clip_config(str(text_dir), timm_model)))
    torch.manual_seed(seed)
    reference = open_clip.create_model(f"local-dir:{build_dir}", pretrained_text=False).eval()
    shutil.rmtree(build_dir)
    folder = root / "biomedclip_tiny"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(open_clip_config(PUBMEDBERT, timm_model)))
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(BERT_TINY / name, folder / name)
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder, text_dir, reference


def write_chat_llm(folder: Path, dims: tinymodels.TinyDims = LLM_DIMS, seed: int = 3) -> torch.nn.Module:
    """A LLaMA folder whose tokenizer carries TinyLlama's chat template."""
    model = tinymodels.llama(dims, seed=seed)
    tinymodels.save_llama_safetensors(model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TINYLLAMA_TEMPLATE
    tokenizer.save_pretrained(folder)
    return model


def write_projector(path: Path, tower_width: int, llm_hidden: int, seed: int = 4, kind: str = "mlp2x_gelu") -> Path:
    """Random projector weights under LLaVA's names (``mm_projector.0.weight`` ... or ``mm_projector.weight``)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "linear":
        shapes = {"weight": (llm_hidden, tower_width), "bias": (llm_hidden,)}
    else:
        shapes = {"0.weight": (llm_hidden, tower_width), "0.bias": (llm_hidden,),
                  "2.weight": (llm_hidden, llm_hidden), "2.bias": (llm_hidden,)}
    save_file({f"mm_projector.{k}": torch.randn(s, generator=generator) * 0.2 for k, s in shapes.items()}, str(path))
    return path


def config_dict(tower: str, text_dir: str, llm: str, projector: str, **sections) -> dict:
    """A project YAML config (as a mapping) of the llava family."""
    return {"model": {"family": "llava"}, "tower": {"text_config": text_dir},
            "generation": {"max_new_tokens": 12}, "runtime": {"mode": "fp32"},
            "weights": {"vision_tower": tower, "projector": projector, "llama_model": llm}, **sections}


def build_llava(root: Path) -> TinyLlava:
    """Write the tower, a chat LLM, a projector and ``llava_tiny.yaml`` (relative paths) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    tower_dir, text_dir, reference = write_tower(root)
    llm = write_chat_llm(root / "llm")
    projector = write_projector(root / "projector.safetensors", TOWER_WIDTH, LLM_DIMS.llm_hidden)
    config = root / "llava_tiny.yaml"
    config.write_text(yaml.safe_dump(config_dict(tower_dir.name, text_dir.name, "llm", projector.name),
                                     sort_keys=False))
    return TinyLlava(root, config, tower_dir, text_dir, root / "llm", projector, reference, llm)


if __name__ == "__main__":
    print(build_llava(Path(sys.argv[1] if len(sys.argv) > 1 else "checkpoints/llava_tiny")).config)
