"""How a checkpoint loads: the model built on the meta device, each tensor cast once and assigned, strictly.

Parameters are created on the meta device (no memory), safetensors are memory-mapped, and each tensor is cast to
its target dtype (`dtype_policy.target_dtype`) and assigned: peak memory stays near one copy of the weights. Any
missing or unexpected key, or wrong shape, is an error that lists them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from ..config import Blip2Config
from ..dtype_policy import target_dtype
from ..errors import CheckpointError
from ..model import Blip2Model
from .files import resolve, weight_files
from .keymaps import to_hf
from .lavis import check_trained_parts, is_lavis_file, load_lavis
from .reading import iter_tensors, peek_keys


def load_model(
    model: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
    base: str | os.PathLike | None = None,
    mmap: bool = True,
) -> tuple[Blip2Model, Path]:
    """Build and load a checkpoint (HF or LAVIS layout) on the CPU; returns the model in eval mode and its folder.
    `quantize` ("int8", see quant.py) converts the layers it names while loading; `dtype` is then the dtype of
    the arithmetic and of the layers it leaves alone.

    A LAVIS `.pth` file (trained weights only) loads over `base`, the checkpoint with its frozen ViT and LM (found
    from the file's LAVIS model type when not given; see lavis.py); the folder returned is then the base's.
    `mmap=False` reads every tensor into memory of its own (as `quantize` does) for a caller that replaces the
    weights after loading (`quant.pack_bf16`): a memory-mapped file stays mapped, and counted, while any of its
    tensors lives."""
    base = base if base is not None else getattr(model, "base", None)  # a `LavisCheckpoint` carries its base
    with freed_memory_returned():
        if is_lavis_file(model):
            lavis = load_lavis(model, base, mmap=mmap and not quantize)
            cfg, tensors, folder, source = lavis.config, lavis.tensors, lavis.folder, lavis.name
        elif base is not None:
            raise CheckpointError(f"{model}: a base (--base) completes a LAVIS .pth file; this is not a file")
        else:
            lavis = None
            folder = resolve(model)
            cfg = Blip2Config.from_json_file(folder / "config.json")
            files = weight_files(folder)
            tensors, source = to_hf(peek_keys(files), iter_tensors(files, mmap=mmap and not quantize)), str(folder)
        m = build_empty(cfg)
        if lavis is not None:
            check_trained_parts(lavis, (k for k, _ in m.named_parameters()))
        if quantize:
            from ..quant import prepare

            prepare(m, quantize, compute=dtype)
        load_state(m, tensors, dtype, source)
    m.requires_grad_(False)
    return m.eval(), folder


def build_empty(cfg: Blip2Config) -> Blip2Model:
    """The model of `cfg` with its parameters on the meta device, ready for `load_state`."""
    with _params_on_meta():
        return Blip2Model(cfg)


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory) while buffers stay real, as accelerate's
    `init_empty_weights(include_buffers=False)`: non-persistent buffers (rotary tables, position ids) are not in
    checkpoints and must exist after loading."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:  # a meta param is a tie to one already moved: keep it
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_state(
    model: Blip2Model, state: Iterator[tuple[str, torch.Tensor]] | Mapping, dtype: torch.dtype, source: str
) -> None:
    """Assign tensors to a model built by `build_empty`, strictly: any missing or unexpected key is an error."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    ties = tie_groups(model)  # before assigning: assignment breaks the sharing
    group_of = {k: g for g in ties for k in g}
    seen: set[str] = set()
    unexpected: list[str] = []
    shape_errors: list[str] = []
    for key, tensor in state.items() if isinstance(state, Mapping) else state:
        if key in buffers:  # persistent buffers some LMs save; copied, not assigned
            buffers[key].copy_(tensor)
            continue
        if key not in params:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(params[key].shape):
            shape_errors.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(params[key].shape)}")
            continue
        if not _converts_itself(model, key):
            tensor = tensor.to(target_dtype(key, dtype))
        # tied parameters (e.g. lm_head and embed_tokens) are stored once: every member gets the loaded one
        group = group_of.get(key, [key])
        shared = nn.Parameter(tensor, requires_grad=False)
        for k in group:
            _assign(model, k, shared)
        seen.update(group)
    missing = sorted(set(params) - seen)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
    if shape_errors:
        problems.append(f"{len(shape_errors)} shape mismatches: {_preview(shape_errors)}")
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the model in config.json; " + "; ".join(problems))


def _preview(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


def tie_groups(model: nn.Module) -> list[list[str]]:
    """The names of each parameter that is shared under several names (tied weights), in registration order."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module_name, _, attr = key.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def _converts_itself(model: nn.Module, key: str) -> bool:
    """A quantized layer (quant.py) takes its weight in the checkpoint's dtype and converts it at once."""
    module, attr = _owner(model, key)
    return attr == "weight" and hasattr(module, "set_weight")


def _assign(model: nn.Module, key: str, param: nn.Parameter) -> None:
    module, attr = _owner(model, key)
    if _converts_itself(model, key):
        module.set_weight(param.data)
    else:
        module._parameters[attr] = param


# glibc's mallopt parameters, and what they are set to once a model is loaded (`freed_memory_returned`)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
SERVING_MMAP_BYTES = 256 << 20
SERVING_TRIM_BYTES = 512 << 20


def glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt`, or None under another C library."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def freed_memory_returned() -> Iterator[None]:
    """Building on meta and quantizing leave transient buffers of a few MB among long-lived ones. glibc serves
    blocks under its adaptive mmap threshold (which climbs to 32 MB) from the heap, where such a mix fragments:
    the int8 2.7B model peaked at 8.5 GiB instead of 5.4. A fixed 1 MB threshold returns freed transients to
    the system at once.

    Afterwards, for inference, blocks up to 256 MB come from the heap and up to 512 MB of free heap stays mapped
    (setting one threshold stops glibc from adapting both, and its fixed trim threshold of 128 KB would hand back
    every freed activation, to be faulted in again at the next layer): an int8 batch of 8 images took 1.46 million
    page faults and 3.1 s of system time without this, 0.1 million and 0.3 s with it (AVX512-BF16 EPYC; 7% of the
    batch's time, 10% of one caption's). Memory freed stays reusable by the next batch; the peak is the same."""
    mallopt = glibc_mallopt()
    if mallopt is None:  # not glibc: nothing to tune
        yield
        return
    mallopt(M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, SERVING_MMAP_BYTES)
        mallopt(M_TRIM_THRESHOLD, SERVING_TRIM_BYTES)
