"""XrayGPT's foreign checkpoints -> our parts: LAVIS's EVA ViT-g and BLIP-2 files, XrayGPT's own checkpoint.

One pure function per format (see ``xraygpt_app.checkpoints`` for the shared rules); the reverse
name map (``export_bridge_key``) lets fine-tuning save in XrayGPT's own key names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ...checkpoints import CheckpointKeyError, StateDict, match_any, raise_unknown, rename_by_table

# --- EVA ViT-g (LAVIS eva_vit_g.pth) -> timm Eva ---------------------------------------------
# timm's Eva uses LAVIS's names verbatim (q_bias/v_bias included); only the final norm, which
# LAVIS comments out, is absent (we replace it with an identity).
EVA_KEYS = (
    r"cls_token", r"pos_embed", r"patch_embed\.proj\.(weight|bias)",
    r"blocks\.\d+\.norm[12]\.(weight|bias)", r"blocks\.\d+\.attn\.(q_bias|v_bias)",
    r"blocks\.\d+\.attn\.qkv\.weight", r"blocks\.\d+\.attn\.proj\.(weight|bias)",
    r"blocks\.\d+\.mlp\.fc[12]\.(weight|bias)",
)


def remap_eva_vit(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> StateDict:
    """LAVIS EVA ViT-g keys (optionally under ``prefix``) -> timm ``Eva`` keys."""
    out: StateDict = {}
    unknown = []
    for key, value in state_dict.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name is not None and match_any(name, EVA_KEYS):
            out[name] = value
        else:
            unknown.append(key)
    raise_unknown(unknown, "EVA ViT checkpoint")
    return out


# --- BLIP-2 (LAVIS blip2_pretrained_*.pth) -> transformers Blip2QFormerModel ----------------
QFORMER_RENAMES = (  # (LAVIS regex, transformers template)
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"layernorm.\1"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.((query|key|value)\.(weight|bias))",
     r"encoder.layer.\1.\2.attention.\3"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.((attention|crossattention)\.output|output_query)"
     r"\.((dense|LayerNorm)\.(weight|bias))", r"encoder.layer.\1.\2.\4"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.intermediate_query\.(dense\.(weight|bias))",
     r"encoder.layer.\1.intermediate_query.\2"),
)
# The same names the other way, for writing a trained Q-Former under XrayGPT's (LAVIS's) keys.
QFORMER_EXPORT = (  # (our regex, LAVIS template)
    (r"layernorm\.(weight|bias)", r"Qformer.bert.embeddings.LayerNorm.\1"),
    (r"encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.((query|key|value)\.(weight|bias))",
     r"Qformer.bert.encoder.layer.\1.\2.self.\3"),
    (r"encoder\.layer\.(\d+)\.((attention|crossattention)\.output|output_query)\.((dense|LayerNorm)\.(weight|bias))",
     r"Qformer.bert.encoder.layer.\1.\2.\4"),
    (r"encoder\.layer\.(\d+)\.intermediate_query\.(dense\.(weight|bias))",
     r"Qformer.bert.encoder.layer.\1.intermediate_query.\2"),
)
# Parts of the BLIP-2 file that XrayGPT deletes or never uses at inference.
BLIP2_DROPPED = (
    r"Qformer\.cls\..+",
    r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight",
    r"Qformer\.bert\.embeddings\.position_ids",
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)",
    r"(t5_proj|opt_proj|llm_proj|vision_proj|text_proj|itm_head)\.(weight|bias)",
    r"temp",
)


def remap_blip2(state_dict: Mapping[str, torch.Tensor]) -> dict[str, StateDict]:
    """Split a BLIP-2 state dict into ``qformer`` / ``query_tokens`` / ``ln_vision`` parts.

    Returns ``{"qformer": ..., "bridge": {"query_tokens": ...}, "ln_vision": {...}}`` with
    keys named as in our modules; every other key must be in ``BLIP2_DROPPED``.
    """
    out: dict[str, StateDict] = {"qformer": {}, "bridge": {}, "ln_vision": {}}
    unknown = []
    for key, value in state_dict.items():
        if key == "query_tokens":
            out["bridge"]["query_tokens"] = value
        elif key.startswith("ln_vision.") and key[len("ln_vision."):] in ("weight", "bias"):
            out["ln_vision"][key[len("ln_vision."):]] = value
        elif (renamed := rename_by_table(key, QFORMER_RENAMES)) is not None:
            out["qformer"][renamed] = value
        elif not match_any(key, BLIP2_DROPPED):
            unknown.append(key)
    raise_unknown(unknown, "BLIP-2 checkpoint")
    return out


# --- XrayGPT / MiniGPT-4 checkpoint ({'model': state_dict}) ----------------------------------
# The runner saves trainable parameters plus *every buffer*: the Q-Former's position_ids go
# through remap_blip2's drop list; the LLM's rotary inv_freq is recomputed by transformers, so
# the caller checks it against the loaded model instead of loading it.
ROTARY_INV_FREQ = r"llama_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"


def remap_xraygpt(state_dict: Mapping[str, torch.Tensor]) -> dict[str, StateDict]:
    """Route an XrayGPT checkpoint's keys to our parts, in the reference's override order.

    Returns ``{"vision", "ln_vision", "qformer", "bridge", "inv_freq"}`` dicts; whatever the
    checkpoint carries overrides the EVA/BLIP-2 values, as its ``strict=False`` load does.
    """
    blip2_part = {k: v for k, v in state_dict.items()
                  if k.startswith(("Qformer.", "ln_vision.")) or k == "query_tokens"}
    out = remap_blip2(blip2_part)
    vision_part = {k: v for k, v in state_dict.items() if k.startswith("visual_encoder.")}
    out["vision"] = remap_eva_vit(vision_part, prefix="visual_encoder.")
    out["inv_freq"] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in blip2_part or key in vision_part:
            continue
        if key in ("llama_proj.weight", "llama_proj.bias"):
            out["bridge"][key] = value
        elif re.fullmatch(ROTARY_INV_FREQ, key):
            out["inv_freq"][key] = value
        else:
            unknown.append(key)
    raise_unknown(unknown, "XrayGPT checkpoint")
    return out


def export_bridge_key(name: str) -> str:
    """A bridge parameter name (``qformer.*``, ``query_tokens``, ``llama_proj.*``) under XrayGPT's key."""
    if name.startswith("qformer."):
        exported = rename_by_table(name[len("qformer."):], QFORMER_EXPORT)
        if exported is None:
            raise CheckpointKeyError(f"No XrayGPT key for the Q-Former parameter {name}")
        return exported
    if name == "query_tokens" or re.fullmatch(r"llama_proj\.(weight|bias)", name):
        return name
    raise CheckpointKeyError(f"No XrayGPT key for the bridge parameter {name}")
