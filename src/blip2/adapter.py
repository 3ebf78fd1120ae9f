"""LoRA adapters on a checkpoint's language model: found beside the weights, applied when the model loads.

A fine-tuning run with LoRA (`blip2.train`, `lora:`) writes its model folder in the HF layout with the LM's *base*
weights, and the adapter (a `peft` folder: `adapter_config.json` + `adapter_model.safetensors`) in `adapter/`
inside it. `blip2.load` applies that adapter (merged into the LM's weights: inference costs nothing extra);
`blip2 train merge` writes a plain checkpoint with it merged, for `transformers` and int8 loading.
The adapter's module names are the LM's own (`model.decoder.layers.0.self_attn.q_proj`): it never touches the
image encoder or the Q-Former.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError, ConfigError
from .model import Blip2Model

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"


def find_adapter(folder: str | os.PathLike) -> Path | None:
    """`folder/adapter` when it holds a `peft` adapter, else None."""
    candidate = Path(folder) / ADAPTER_DIR
    return candidate if (candidate / ADAPTER_CONFIG).is_file() else None


def apply_adapter(blip: Blip2Model, adapter: str | os.PathLike, merge: bool = True) -> None:
    """Put the LoRA adapter in `adapter` (a peft folder) on `blip`'s language model, in place.

    `merge`: fold the update into the LM's weights (plain `nn.Linear` layers again); otherwise the LoRA layers stay,
    computing `W x + (alpha / r) B A x` as in training.
    """
    adapter = Path(adapter)
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{adapter}: no {ADAPTER_CONFIG}, not a LoRA adapter folder (peft's save_pretrained)")
    if blip.language_model is None:
        raise ConfigError(f"{adapter}: an adapter for the language model, but the checkpoint has none")
    if any(hasattr(m, "set_weight") for m in blip.language_model.modules()):
        raise ConfigError(
            f"{adapter}: an adapter cannot be applied to an int8 model; merge it first (`blip2 train merge MODEL "
            "OUT`) and load the merged folder with dtype='int8'"
        )
    try:
        from peft import PeftModel
    except ImportError as e:
        raise ConfigError(
            f"{adapter}: applying a LoRA adapter needs peft (pip install 'blip2[train]'), or load a merged "
            "checkpoint (`blip2 train merge`)"
        ) from e
    try:
        with quiet_peft():
            wrapped = PeftModel.from_pretrained(blip.language_model, adapter)
    except (ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{adapter}: the adapter does not fit this language model ({e})") from e
    if merge:
        blip.language_model = wrapped.merge_and_unload()
    blip.language_model.requires_grad_(False)


@contextmanager
def quiet_peft() -> Iterator[None]:
    """peft asks transformers a deprecated question (`is_gradient_checkpointing`) while wrapping a model; the
    FutureWarning is about peft's code, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
