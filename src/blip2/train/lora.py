"""LoRA on the frozen LM: which layers get adapters, adding them for training, saving them, merging them.

Fine-tuning BLIP-2 as LAVIS does trains the Q-Former, its queries and the language projection, with the image
encoder and the LM frozen. With `lora:` in the training config the LM also gets low-rank adapters (`peft`), so it
can learn a new caption style or answer format: each targeted linear layer computes `W x + (alpha / r) B A x`, with
W frozen, A (r, d_in) and B (d_out, r) trained, B starting at zero (the model is unchanged at step 0).

The adapters go on the LM alone, never on the whole BLIP-2 model: the Q-Former has `query`/`value` layers too, and a
`target_modules` list meant for the LM that also matched them would put adapters on a part already trained in
full. Module names are the LM's own, so the default list depends on its family (`TARGET_MODULES`, as `peft`'s own
defaults for these families); other families must say which layers to adapt.

Precision: the adapter weights are fp32 even when the frozen LM is bf16 or fp16 (`frozen_dtype`), as the Q-Former.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from ..adapter import ADAPTER_DIR, apply_adapter, find_adapter, quiet_peft
from ..checkpoint import load_model, save_model, weight_files
from ..errors import ConfigError
from .config import LoraSettings

# per `text_config.model_type`: the attention query and value projections, as the LoRA paper and peft's defaults
TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "opt": ("q_proj", "v_proj"),
    "t5": ("q", "v"),
    "llama": ("q_proj", "v_proj"),  # also Vicuna, InstructBLIP's LM
}


def linear_names(lm: nn.Module) -> list[str]:
    """The last name part of every linear layer of `lm` (what `target_modules` entries match), sorted."""
    return sorted({name.rpartition(".")[2] for name, m in lm.named_modules() if isinstance(m, nn.Linear)})


def target_modules(lm: nn.Module, requested: list[str] | None = None) -> list[str]:
    """The names of the LM layers to adapt: `requested` (checked against the LM) or its family's default."""
    names = linear_names(lm)
    model_type = getattr(lm.config, "model_type", None)
    if requested is None:
        if model_type not in TARGET_MODULES:
            raise ConfigError(
                f"LoRA has no default target modules for a {model_type!r} language model (known: "
                f"{', '.join(sorted(TARGET_MODULES))}); set lora.target_modules to some of its linear layers: "
                f"{', '.join(names)}"
            )
        return list(TARGET_MODULES[model_type])
    missing = [t for t in requested if t not in names]
    if not requested or missing:
        raise ConfigError(
            f"lora.target_modules {requested!r}: {missing or 'empty'} not among the {model_type!r} language "
            f"model's linear layers: {', '.join(names)}"
        )
    return list(requested)


def add_lora(model: nn.Module, settings: LoraSettings) -> None:
    """Put trainable LoRA adapters on `model.blip.language_model` (a `Stage2Model`), in place.

    The LM object stays where it is (its layers are replaced by LoRA layers inside it), so the model code calls it as
    before; the `peft` wrapper that saves the adapters is kept on `model.peft` (not a sub-module: its parameters
    are the LM's, already registered under `blip`).
    """
    from peft import LoraConfig, get_peft_model

    lm = model.blip.language_model
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules(lm, settings.target_modules),
    )
    with quiet_peft():
        wrapped = get_peft_model(lm, config, autocast_adapter_dtype=True)  # fp32 adapters over a half-precision LM
    object.__setattr__(model, "peft", wrapped)


def has_lora(model: nn.Module) -> bool:
    return getattr(model, "peft", None) is not None


def train_adapters_only(lm: nn.Module, mode: bool) -> None:
    """The LM's own dropout stays off (its weights are frozen: it runs as at inference, as every frozen tower
    here); only the adapters' dropout follows `mode`."""
    from peft.tuners.lora import LoraLayer

    lm.eval()
    for m in lm.modules():
        if isinstance(m, LoraLayer):
            m.lora_dropout.train(mode)


@contextmanager
def base_layers(lm: nn.Module) -> Iterator[None]:
    """Within the block, each LoRA layer of `lm` is replaced by the layer it wraps: the LM has its original
    parameter names (`...q_proj.weight`, not `...q_proj.base_layer.weight`) and no adapters, for saving its base
    weights in the HF layout. Put back afterwards."""
    from peft.tuners.lora import LoraLayer

    swapped = []
    for name, module in list(lm.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, attr = name.rpartition(".")
            parent = lm.get_submodule(parent_name)
            setattr(parent, attr, module.base_layer)
            swapped.append((parent, attr, module))
    try:
        yield
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)


def save_adapter(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write the adapters as a `peft` folder (`adapter_config.json`, `adapter_model.safetensors`)."""
    folder = Path(folder)
    model.peft.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    return folder


def merge(model: str | os.PathLike, dest: str | os.PathLike, adapter: str | os.PathLike | None = None) -> Path:
    """Write `model` with its adapter (`adapter`, default `model/adapter`) merged into the LM's weights: a plain
    checkpoint that `transformers`' `Blip2ForConditionalGeneration` and `blip2.load(..., dtype="int8")` load.

    The tokenizer, processor and generation files are copied; the weights are written in fp32.
    """
    blip, folder = load_model(model)
    dest = Path(dest)
    if dest.resolve() == folder.resolve():
        raise ConfigError(f"{dest}: merge into another folder than the model's own")
    adapter = Path(adapter) if adapter is not None else find_adapter(folder)
    if adapter is None:
        raise ConfigError(f"{folder}: no {ADAPTER_DIR}/ folder with a LoRA adapter; give the adapter's folder")
    apply_adapter(blip, adapter, merge=True)
    save_model(blip, dest)
    weights = {p.name for p in weight_files(folder)} | {"model.safetensors.index.json", "pytorch_model.bin.index.json"}
    for item in folder.iterdir():
        if item.is_file() and item.name not in weights and item.name != "config.json":
            shutil.copy2(item, dest / item.name)
    return dest
