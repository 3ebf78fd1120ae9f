"""The frozen language model: any `transformers` causal or seq2seq LM, built from the checkpoint's `text_config`.

BLIP-2 feeds the LM `inputs_embeds = [projected queries (B, Nq, d); token embeddings (B, T, d)]`. Decoder-only
models (OPT, LLaMA, ...) continue that sequence; encoder-decoder models (Flan-T5) encode it and decode from
`decoder_start_token_id`. This module only builds the LM and says which kind it is; `model.py` does the rest.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Blip2Config
from .errors import ConfigError


def build_language_model(cfg: Blip2Config, attn_implementation: str = "sdpa") -> nn.Module:
    """Build the LM of `cfg.text_config` with `transformers`, weights uninitialised (the caller loads them)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    lm_cfg = cfg.lm_config()
    lm_cfg._attn_implementation = attn_implementation
    auto = AutoModelForSeq2SeqLM if lm_cfg.is_encoder_decoder else AutoModelForCausalLM
    try:
        lm = auto.from_config(lm_cfg)
    except ValueError as e:
        raise ConfigError(f"transformers cannot build a {auto.__name__} for {lm_cfg.model_type!r}: {e}") from e
    head_takes_contiguous_rows(lm)
    return lm


def head_takes_contiguous_rows(lm: nn.Module) -> None:
    """Make the LM's output head copy a non-contiguous input before its product (a forward pre-hook; idempotent).

    `generate` asks a causal LM for the last position's logits only (`logits_to_keep=1`), and transformers' OPT,
    LLaMA, ... slice the prompt's hidden states to `h[:, -1:]`, a (B, 1, D) view with the prompt's stride. On it,
    with a frozen weight (as we load every model; `matmul` folds the batch into one product only for a weight that
    requires grad, as transformers' own models keep it), `F.linear` runs a batched product on the head's (D, V)
    weight expanded B times. Where the batched kernel copies that expansion, it is (8, 2560, 50272) for OPT-2.7B at
    8 prompts, most of a batch's time (`bench/lm_head.py` measures both products on the running CPU; figures in
    docs/speed.md). Copying the (B, 1, D) rows costs nothing by comparison; decoding steps' inputs are contiguous
    already. Quantized heads (quant.Int8Linear) take their input as rows themselves."""
    head = lm.get_output_embeddings()
    if isinstance(head, nn.Module) and _contiguous_input not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(_contiguous_input)


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def tied_weight_keys(lm: nn.Module) -> set[str]:
    """Parameter names of `lm` that share storage with another parameter (may be absent from checkpoints)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, p in lm.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied
