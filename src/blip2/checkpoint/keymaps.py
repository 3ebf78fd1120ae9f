"""How a checkpoint's keys map to this model's parameter names: one pure function per source format.

HF checkpoints use our names already (`hf_keys` only fuses the ViT biases of older conversions); LAVIS ones are
renamed by `lavis_to_hf` (BLIP-2) or `lavis_instruct_to_hf` (InstructBLIP). Nothing here reads files or touches a
model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

import torch

_LAVIS_SWAPS = [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight$", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^ln_vision\.", "vision_model.post_layernorm."),
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (r"^Qformer\.bert\.embeddings\.(word|position)_embeddings\.", r"embeddings.\1_embeddings."),
    (
        r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.",
        r"qformer.encoder.layer.\1.\2.attention.",
    ),
    (r"^Qformer\.bert\.", "qformer."),
    (r"^vision_proj\.", "vision_projection."),
    (r"^text_proj\.", "text_projection."),
    (r"^(opt|t5|llm)_proj\.", "language_projection."),
    (r"^(opt|t5|llm)_model\.", "language_model."),
]
# InstructBLIP (`blip2_t5_instruct`, `blip2_vicuna_instruct`): the Q-Former keeps its BERT word/position embeddings
# for the instruction, and they sit with the input LayerNorm under `qformer.embeddings.`, as in HF's
# `InstructBlipQFormerModel`. Tried before `_LAVIS_SWAPS`, whose two embedding rules they replace.
_LAVIS_INSTRUCT_SWAPS = [
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.embeddings.layernorm."),
    (r"^Qformer\.bert\.embeddings\.(word|position)_embeddings\.", r"qformer.embeddings.\1_embeddings."),
]
# LAVIS keys with no counterpart in the HF layout: the ITC temperature, the stage-1 Q-Former LM head, a buffer.
_LAVIS_DROPPED = re.compile(r"^(temp|Qformer\.cls\..*|Qformer\.bert\.embeddings\.position_ids)$")


def is_lavis(keys: list[str]) -> bool:
    """True for the key names of a LAVIS checkpoint."""
    return any(k.startswith(("visual_encoder.", "Qformer.", "ln_vision.")) for k in keys)


def is_lavis_instruct(keys: list[str]) -> bool:
    """True for the keys of a LAVIS InstructBLIP checkpoint (whole or trainable-only): a Q-Former with word
    embeddings (for the instruction) and an LM projection. Stage-1 / retrieval checkpoints have the embeddings but no
    LM projection; `blip2_opt`/`blip2_t5` have the projection but dropped the embeddings."""
    return (
        is_lavis(keys)
        and any(k.startswith("Qformer.bert.embeddings.word_embeddings.") for k in keys)
        and any(re.match(r"^(opt|t5|llm)_proj\.", k) for k in keys)
    )


def lavis_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a LAVIS `blip2`/`blip2_opt`/`blip2_t5` state dict to the HF layout (pure function).

    The ViT's separate `q_bias`/`v_bias` become the fused `qkv.bias = [q_bias, 0, v_bias]`.
    """
    return _rename_lavis(state, _LAVIS_SWAPS)


def lavis_instruct_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a LAVIS `blip2_t5_instruct`/`blip2_vicuna_instruct` state dict to the HF layout of
    `InstructBlipForConditionalGeneration` (pure function): as `lavis_to_hf`, but the Q-Former's embeddings and input
    LayerNorm go to `qformer.embeddings.{word_embeddings,position_embeddings,layernorm}`."""
    return _rename_lavis(state, _LAVIS_INSTRUCT_SWAPS + _LAVIS_SWAPS)


def _rename_lavis(state: Mapping[str, torch.Tensor], swaps: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    biases: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if _LAVIS_DROPPED.match(key):
            continue
        m = re.match(r"^visual_encoder\.blocks\.(\d+)\.attn\.(q|v)_bias$", key)
        if m:
            biases.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        new = key
        for pattern, repl in swaps:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        out[new] = value
    for i, qv in biases.items():
        fused = torch.cat([qv["q"], torch.zeros_like(qv["q"]), qv["v"]])  # LAVIS has no k-bias
        out[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = fused
    return out


def hf_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise HF-layout keys: older conversions stored the ViT's `q_bias`/`v_bias` unfused."""
    out = dict(state)
    for key in [k for k in out if k.endswith("self_attn.q_bias")]:
        stem = key[: -len("q_bias")]
        q, v = out.pop(key), out.pop(stem + "v_bias")
        out[stem + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out


def to_hf(keys: list[str], tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The (key, tensor) pairs of a checkpoint whose key names are `keys`, in the HF layout. A checkpoint that needs
    no renaming streams through untouched; one that does is gathered first (the biases are fused across keys)."""
    if is_lavis_instruct(keys):
        return iter(lavis_instruct_to_hf(dict(tensors)).items())
    if is_lavis(keys):
        return iter(lavis_to_hf(dict(tensors)).items())
    if any(k.endswith("self_attn.q_bias") for k in keys):
        return iter(hf_keys(dict(tensors)).items())
    return iter(tensors)
