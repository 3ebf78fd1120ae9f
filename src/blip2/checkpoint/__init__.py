"""Find, read, map and load BLIP-2 checkpoints; save them in the Hugging Face layout.

    files.py     where a checkpoint is: a folder or a Hub id (offline misses say how to get it), its weight files
    reading.py   tensors from safetensors (memory-mapped, or plain reads) and .bin/.pth pickles; key names
    keymaps.py   how its keys map: HF and LAVIS key maps, pure functions
    lavis.py     LAVIS .pth files (trained weights only) over the base checkpoint with their frozen ViT and LM
    loading.py   how it loads: built on the meta device, each tensor cast once and assigned, strictly
    saving.py    how it is saved: sharded safetensors in the HF layout (huggingface_hub's writer)

Which dtype each parameter gets is `dtype_policy`'s decision; its names are re-exported here for older callers.
"""

from __future__ import annotations

from ..dtype_policy import CPU_BF16_ENV, FP32_MODULES, cpu_has_native_bf16, resolve_dtype, target_dtype
from .files import WEIGHT_PATTERNS, resolve, weight_files
from .keymaps import hf_keys, is_lavis, is_lavis_instruct, lavis_instruct_to_hf, lavis_to_hf, to_hf
from .loading import build_empty, freed_memory_returned, load_model, load_state, tie_groups
from .reading import iter_tensors, load_pickle, peek_keys
from .saving import save_model

__all__ = [
    "CPU_BF16_ENV",
    "FP32_MODULES",
    "WEIGHT_PATTERNS",
    "build_empty",
    "cpu_has_native_bf16",
    "hf_keys",
    "is_lavis",
    "is_lavis_instruct",
    "iter_tensors",
    "lavis_instruct_to_hf",
    "lavis_to_hf",
    "freed_memory_returned",
    "load_model",
    "load_pickle",
    "load_state",
    "peek_keys",
    "resolve",
    "resolve_dtype",
    "save_model",
    "target_dtype",
    "tie_groups",
    "to_hf",
    "weight_files",
]
