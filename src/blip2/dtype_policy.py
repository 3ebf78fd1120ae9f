"""Which device a model runs on and in which dtypes: the one place that decides.

* device "auto": CUDA if present, then Apple's MPS, else the CPU;
* dtype "auto": fp16 on CUDA; on a CPU the fastest route, by measurement on the running machine (routes.py),
  among those whose quality against fp32 is at least that of `transformers`' own bf16 (route_quality.py); fp32
  elsewhere. `BLIP2_ROUTES=flags` decides by CPU flags instead (bf16 where AVX512-BF16 or AMX is listed, else
  fp32), and `BLIP2_CPU_BF16=0|1` forces that flag (tests run every CPU kind's choices on any machine with it);
* under fp16 the Q-Former and its queries stay fp32, as `transformers` keeps them (`_keep_in_fp32_modules`, which
  it applies to fp16 only: in bf16 they are bf16 like the rest);
* dtype "int8" (weight-only quantization, quant.py): the arithmetic stays fp32 on a CPU, fp16 on a GPU; on a CPU
  the LM's key/value cache is kept in int8 during generation (`Placement.kv_storage`, kv_cache.py);
* `kv_cache` ("auto", "int8", "bf16", "fp16", "fp32"; `cache_storage`) overrides the route's cache dtype: int8 to
  fit larger batches on any route, or the arithmetic's own dtype (`transformers`' numbers) on the int8 routes;
* dtype "int4" (CPU only): "int8" with a second, int4 copy of the language model's layers (not its head) for the
  decoding steps (`int4.Int4Weight`): faster captions and chat turns one at a time, not a smaller model;
* dtype bf16 on a CPU: the bf16 layers sum in fp32 on widened weights where the measurement says that pays
  (`quant.bf16_sums_in_fp32`; without bf16 instructions PyTorch emulates bf16 GEMMs at a fifth of the fp32 speed);
  where no layer is widened, their weights are prepacked for oneDNN where that measures faster (`quant.pack_bf16`).
  The CPU kernels of every layer kind are installed before the model is built (`quant.use_kernels`).

`placement(device, dtype)` applies all of these to a user's two strings; the loaders, the pipeline and the trainer
ask it (or the functions below) rather than deciding again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .cpuinfo import cpu_flags
from .defaults import KV_CACHE_ENVVAR
from .errors import ConfigError
from .int4 import can_int4
from .quant import SCHEMES, use_kernels

CPU_BF16_ENV = "BLIP2_CPU_BF16"
FP32_MODULES = ("query_tokens", "qformer.")  # parameter-name prefixes kept in fp32 when the model is fp16
# a route_quality name that dtype="auto" may resolve to on a CPU: (arithmetic dtype, quantization, bf16 sums in fp32)
AUTO_ROUTES = {
    "fp32": (torch.float32, None, False),
    "bf16": (torch.bfloat16, None, False),
    "bf16-fp32-sums": (torch.bfloat16, None, True),
    "int8": (torch.float32, "int8", False),
    "int8-activations": (torch.float32, "int8", False),  # the kernels' int8_activations says which int8
}
KV_CACHE_DTYPES = {"int8": torch.int8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class Placement:
    """Where and how a loaded model runs."""

    device: torch.device
    dtype: torch.dtype  # of the arithmetic, and of every layer that `quantize` leaves alone
    quantize: str | None = None  # a quant.SCHEMES name: the layers it names are converted while loading
    bf16_sums_in_fp32: bool = False  # apply `quant.bf16_sums_in_fp32` after loading
    pack_bf16: bool = False  # apply `quant.pack_bf16` after loading (the kinds `quant.active_kernels()` names)
    pack_int8: bool = False  # apply `quant.pack_int8` after loading (int8 activations on prepacked weights)

    @property
    def kv_storage(self) -> torch.dtype | None:
        """The dtype of the LM's key/value cache during generation, where not the arithmetic's: int8 (a scale per
        position and head) where quantized layers compute in fp32 on a CPU: 0.26x the fp32 cache, which is most of
        what a batch's generation holds beyond the weights; those routes are not fp32-exact anyway, and
        bench/quality.py measures them with it. None elsewhere: fp32, bf16 and fp16 keep `transformers`' numbers."""
        quantized_fp32 = self.quantize is not None and self.dtype == torch.float32
        return torch.int8 if self.device.type == "cpu" and quantized_fp32 else None


def kv_cache_choice(kv_cache: str | None = None) -> str:
    """A user's `kv_cache`, or where none is given `BLIP2_KV_CACHE`, else "auto"."""
    return kv_cache or os.environ.get(KV_CACHE_ENVVAR, "").strip() or "auto"


def cache_storage(where: Placement, kv_cache: str = "auto") -> torch.dtype | None:
    """The storage dtype of the LM's key/value cache for a user's `kv_cache`: "auto" is the route's
    (`Placement.kv_storage`); a dtype name narrows the cache to it, or, where it is the arithmetic's own, keeps
    `transformers`' cache numbers (None). A cache wider than the arithmetic would hold nothing more: refused."""
    if kv_cache == "auto":
        return where.kv_storage
    storage = KV_CACHE_DTYPES.get(kv_cache)
    if storage is None:
        raise ConfigError(f"kv_cache {kv_cache!r}: use auto, {', '.join(KV_CACHE_DTYPES)}")
    if storage == where.dtype:
        return None
    if storage.itemsize > where.dtype.itemsize:
        arithmetic = str(where.dtype).removeprefix("torch.")
        raise ConfigError(
            f"kv_cache {kv_cache!r} is wider than this model's {arithmetic} arithmetic: it would hold "
            "nothing more; use auto or a narrower dtype"
        )
    return storage


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """A torch device from a name, or the best one present for "auto"."""
    if str(device) != "auto":
        try:
            return torch.device(device)
        except RuntimeError as e:
            raise ConfigError(f"device {device!r} is not a valid torch device ({e})") from e
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """A dtype name (fp32, fp16, bf16 and their long forms) or "auto" for `device`; see the module's docstring."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    if dtype != "auto":
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPE_NAMES)}")
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        from .routes import cpu_routes

        return AUTO_ROUTES[cpu_routes().auto][0]
    return torch.float32


def target_dtype(key: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of parameter `key` in a model loaded in `dtype`: the fp32-under-fp16 rule."""
    return torch.float32 if dtype == torch.float16 and key.startswith(FP32_MODULES) else dtype


def placement(device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> Placement:
    """The device, dtypes and kernels for a user's `device` and `dtype` (a dtype name, "auto", "int8" or "int4")."""
    dev = pick_device(device)
    named = dtype if isinstance(dtype, torch.dtype) else DTYPE_NAMES.get(dtype)
    routed = dev.type == "cpu" and (dtype == "auto" or dtype in SCHEMES or named == torch.bfloat16)
    if dtype == "int4" and (dev.type != "cpu" or not can_int4()):
        where = "this PyTorch build" if dev.type == "cpu" else dev.type.upper()
        raise ConfigError(f"dtype 'int4' uses PyTorch's int4 kernel for CPUs, which {where} lacks: use dtype='int8'")
    if not routed:  # nothing to choose: fp32 and fp16 on a CPU, any dtype elsewhere
        if isinstance(dtype, str) and dtype in SCHEMES:
            return Placement(dev, torch.float16, dtype)
        return Placement(dev, resolve_dtype(dtype, dev))
    from .routes import cpu_routes

    routes = cpu_routes()  # measured on this machine (cached), or decided by an environment override
    use_kernels(routes.kernels)
    k = routes.kernels
    packs = k.bf16_packed_lm or k.bf16_packed_vision
    packs_int8 = k.int8_activations and k.int8_packed
    if dtype == "auto":
        arithmetic, scheme, sums = AUTO_ROUTES[routes.auto]
        bf16_packs = packs and arithmetic == torch.bfloat16 and not sums
        return Placement(dev, arithmetic, scheme, sums, bf16_packs, packs_int8 and scheme == "int8")
    if dtype in SCHEMES:
        return Placement(dev, torch.float32, dtype, pack_int8=packs_int8)
    return Placement(dev, torch.bfloat16, None, k.widens_bf16, packs and not k.widens_bf16)
