"""The frozen language model: any `transformers` causal or seq2seq LM, built from the checkpoint's `text_config`.

BLIP-2 feeds the LM `inputs_embeds = [projected queries (B, Nq, d); token embeddings (B, T, d)]`. Decoder-only
models (OPT, LLaMA, ...) continue that sequence; encoder-decoder models (Flan-T5) encode it and decode from
`decoder_start_token_id`. This module only builds the LM and says which kind it is; `model.py` does the rest.
"""

from __future__ import annotations

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
        return auto.from_config(lm_cfg)
    except ValueError as e:
        raise ConfigError(f"transformers cannot build a {auto.__name__} for {lm_cfg.model_type!r}: {e}") from e


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
