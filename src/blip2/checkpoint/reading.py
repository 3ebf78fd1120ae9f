"""Reading tensors from weight files: safetensors memory-mapped (or read plainly), .bin/.pth pickles, key names."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError


def iter_tensors(files: list[Path], mmap: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) pairs; safetensors are memory-mapped, .bin/.pth loaded with mmap when possible.

    `mmap=False` reads each safetensors tensor into its own buffer instead, for a caller that converts and drops
    it (quantized loading): touched pages of a mapping stay in the resident set until the whole file is closed.
    """
    from safetensors import SafetensorError, safe_open

    for f in files:
        if f.suffix == ".safetensors":
            try:
                if not mmap:
                    yield from _read_safetensors(f)
                    continue
                with safe_open(f, framework="pt") as st:
                    for key in st.keys():
                        yield key, st.get_tensor(key)
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from e
        else:
            yield from load_pickle(f).items()


def peek_keys(files: list[Path]) -> list[str]:
    """Key names without reading tensors (safetensors headers / index)."""
    from safetensors import safe_open

    keys: list[str] = []
    for f in files:
        if f.suffix == ".safetensors":
            with contextlib.suppress(Exception), safe_open(f, framework="pt") as st:
                keys.extend(st.keys())
        else:
            keys.extend(load_pickle(f).keys())
    return keys


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(f: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The safetensors format read with plain reads: 8-byte little-endian header size, JSON header, data."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if not 0 < n <= size - 8:
            raise ValueError(f"header length {n} does not fit a {size}-byte file")
        header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        base = 8 + n
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(f"tensor {key} has dtype {info['dtype']}, which this reader does not know")
            buf = torch.empty(end - start, dtype=torch.uint8)
            fh.seek(base + start)
            if fh.readinto(buf.numpy()) != end - start:
                raise ValueError(f"tensor {key} is cut short (file truncated?)")
            yield key, buf.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def load_pickle(f: Path) -> Mapping[str, torch.Tensor]:
    """A .bin/.pth state dict (LAVIS' `{"model": ...}` wrapper removed), memory-mapped when the file allows."""
    return _state_of(f, _torch_load(f))


def load_lavis_file(f: Path) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]]:
    """A LAVIS `.pth` as its runner saves it, `{"model": state, "config": run config, "optimizer": ...}`: the state
    dict and the `config["model"]` section (`arch`, `model_type`, `image_size`...; {} when the file has none)."""
    raw = _torch_load(f)
    config = raw.get("config") if isinstance(raw, dict) else None
    model_config = config.get("model") if isinstance(config, dict) else None
    return _state_of(f, raw), model_config if isinstance(model_config, dict) else {}


def _torch_load(f: Path) -> Any:
    if not f.is_file():
        raise CheckpointError(f"{f}: no such file")
    try:
        try:
            return torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:  # old zip-less files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors have no common class
        raise CheckpointError(f"{f}: cannot read weights ({type(e).__name__}: {e})") from e


def _state_of(f: Path, sd: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # LAVIS checkpoints wrap the state dict
    if not isinstance(sd, dict):
        raise CheckpointError(f"{f}: expected a state dict, got {type(sd).__name__}")
    bad = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{f}: expected a state dict of tensors; {bad!r} is a {type(sd[bad]).__name__}")
    return sd
