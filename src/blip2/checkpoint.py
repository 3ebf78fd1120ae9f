"""Find, read, map and load BLIP-2 checkpoints; save them in the Hugging Face layout.

Loading builds the model with parameters on the meta device (no memory), reads safetensors memory-mapped, casts
each tensor once to its target dtype and assigns it: peak memory stays near one copy of the weights.
Key mapping is one pure function per source format (`hf_keys`, `lavis_to_hf`); loading is strict.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from .config import Blip2Config
from .errors import CheckpointError, ConfigError
from .model import Blip2Model

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]
# transformers keeps the Q-Former and its queries in fp32 when loading in fp16 (`_keep_in_fp32_modules`, which it
# applies to fp16 only: in bf16 they are bf16 like the rest)
FP32_MODULES = ("query_tokens", "qformer.")


# ---- where the files are -------------------------------------------------------------------------------------------
def resolve(model: str | os.PathLike) -> Path:
    """A local folder, or a Hub id fetched into (or found in) the Hugging Face cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: folder has no config.json; is it a BLIP-2 checkpoint folder?")
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint folder (with config.json), got a file")
    if str(model).count("/") != 1 or str(model).startswith((".", "/", "~")):
        raise CheckpointError(f"{model}: no such folder, and not a Hub id of the form 'owner/name'")
    return _from_hub(str(model))


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    how = f"download it where there is network (`hf download {repo_id}`) or pass a local folder"
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=WEIGHT_PATTERNS, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - hub errors come in many classes; all mean "not available"
        if offline or "offline" in str(e).lower() or isinstance(e, (OSError, HfHubHTTPError)):
            raise CheckpointError(
                f"model {repo_id!r} is not on disk and cannot be fetched ({type(e).__name__}); {how}"
            ) from e
        raise
    if not any(folder.glob("*.safetensors")):  # old repos ship only .bin
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.bin", "*.json"], local_files_only=offline))
    return folder


# ---- reading tensors -----------------------------------------------------------------------------------------------
def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder: sharded or single, safetensors preferred over .bin."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            try:
                shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
            missing = [n for n in shard_names if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
            return [folder / n for n in shard_names]
        if (folder / single).is_file():
            return [folder / single]
    for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise CheckpointError(f"{folder}: no weights found (*.safetensors, *.bin, *.pth)")


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
            yield from _load_pickle(f).items()


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


def _load_pickle(f: Path) -> Mapping[str, torch.Tensor]:
    try:
        sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # old zip-less files cannot be memory-mapped
        sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors have no common class
        raise CheckpointError(f"{f}: cannot read weights ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # LAVIS checkpoints wrap the state dict
    if not isinstance(sd, dict):
        raise CheckpointError(f"{f}: expected a state dict, got {type(sd).__name__}")
    return sd


# ---- key maps ------------------------------------------------------------------------------------------------------
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
# LAVIS keys with no counterpart in the HF layout: the ITC temperature, the stage-1 Q-Former LM head, a buffer.
_LAVIS_DROPPED = re.compile(r"^(temp|Qformer\.cls\..*|Qformer\.bert\.embeddings\.position_ids)$")


def is_lavis(keys: list[str]) -> bool:
    return any(k.startswith(("visual_encoder.", "Qformer.", "ln_vision.")) for k in keys)


def lavis_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a LAVIS `blip2`/`blip2_opt`/`blip2_t5` state dict to the HF layout (pure function).

    The ViT's separate `q_bias`/`v_bias` become the fused `qkv.bias = [q_bias, 0, v_bias]`.
    """
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
        for pattern, repl in _LAVIS_SWAPS:
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


# ---- building and loading ------------------------------------------------------------------------------------------
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


def target_dtype(key: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float16 and key.startswith(FP32_MODULES) else dtype


def build_empty(cfg: Blip2Config) -> Blip2Model:
    with _params_on_meta():
        return Blip2Model(cfg)


def load_state(
    model: Blip2Model, state: Iterator[tuple[str, torch.Tensor]] | Mapping, dtype: torch.dtype, source: str
) -> None:
    """Assign tensors to a model built by `build_empty`, strictly: any missing or unexpected key is an error."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    ties = _tie_groups(model)  # before assigning: assignment breaks the sharing
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


def _tie_groups(model: nn.Module) -> list[list[str]]:
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


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """ "auto": fp16 on CUDA, bf16 on a CPU with native bf16 matmuls (AVX512-BF16 / AMX), else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(names)}")
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


CPU_BF16_ENV = "BLIP2_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """True on a CPU with native bf16 matmuls (AVX512-BF16 or AMX).

    `BLIP2_CPU_BF16=1` or `=0` overrides the detection: the tests use it to run every CPU kind's choices on any
    machine, and a user can use it to try the other choice.
    """
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ConfigError(f"{CPU_BF16_ENV}={forced!r}: expected 0 or 1")
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def load_model(
    model: str | os.PathLike, dtype: torch.dtype = torch.float32, quantize: str | None = None
) -> tuple[Blip2Model, Path]:
    """Build and load a checkpoint (HF or LAVIS layout) on the CPU; returns the model in eval mode and its folder.
    `quantize` ("int8", see quant.py) converts the layers it names while loading; `dtype` is then the dtype of
    the arithmetic and of the layers it leaves alone."""
    with _freed_memory_returned():
        return _load_model(model, dtype, quantize)


def _load_model(model: str | os.PathLike, dtype: torch.dtype, quantize: str | None) -> tuple[Blip2Model, Path]:
    folder = resolve(model)
    cfg = Blip2Config.from_json_file(folder / "config.json")
    files = weight_files(folder)
    m = build_empty(cfg)
    if quantize:
        from .quant import prepare

        prepare(m, quantize, compute=dtype)
    tensors = iter_tensors(files, mmap=not quantize)
    first = list(_peek_keys(files))
    if is_lavis(first):
        tensors = iter(lavis_to_hf(dict(tensors)).items())
    elif any(k.endswith("self_attn.q_bias") for k in first):
        tensors = iter(hf_keys(dict(tensors)).items())
    load_state(m, tensors, dtype, str(folder))
    m.requires_grad_(False)
    return m.eval(), folder


@contextlib.contextmanager
def _freed_memory_returned() -> Iterator[None]:
    """Building on meta and quantizing leave transient buffers of a few MB among long-lived ones. glibc serves
    blocks under its adaptive mmap threshold (which climbs to 32 MB) from the heap, where such a mix fragments:
    the int8 2.7B model peaked at 8.5 GiB instead of 5.4. A fixed 1 MB threshold returns freed transients to
    the system at once; afterwards the threshold is set to 32 MB, where the adaptive one would settle."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        yield
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, 1 << 20)
    try:
        yield
    finally:
        mallopt(m_mmap_threshold, 32 << 20)


def _peek_keys(files: list[Path]) -> list[str]:
    """Key names without reading tensors (safetensors headers / index)."""
    from safetensors import safe_open

    keys: list[str] = []
    for f in files:
        if f.suffix == ".safetensors":
            with contextlib.suppress(Exception), safe_open(f, framework="pt") as st:
                keys.extend(st.keys())
        else:
            keys.extend(_load_pickle(f).keys())
    return keys


def save_model(model: Blip2Model, folder: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json and (sharded) model.safetensors in the HF layout; tied copies are written once."""
    from safetensors.torch import save_file

    if any(hasattr(m, "set_weight") for m in model.modules()):
        raise ConfigError("a model loaded with dtype='int8' cannot be saved in the HF layout; load it in fp32")

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder)
    tied = {k for g in _tie_groups(model) for k in g[1:]}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    state = {k: v for k, v in state.items() if k in dict(model.named_parameters(remove_duplicate=False))}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder
