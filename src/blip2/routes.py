"""Which kernel each kind of linear layer takes on this CPU, and what `dtype="auto"` means here: measured, cached.

At the first load that needs a choice (`dtype="auto"`, `"bf16"`, `"int8"` or `"int4"` on a CPU) the products each
route can run are timed on BLIP-2's layer shapes (a few seconds): the vision encoder's fc1 (1408 -> 6144) at 257
rows (one image) and the language model's fc1 (2560 -> 10240, OPT-2.7B) at 1-8 rows (decoding), 16-32 and 48 rows (a
prompt's prefill), in fp32, on PyTorch's bf16 kernel, on bf16 weights prepacked for oneDNN (`quant.PackedLinear`),
on bf16 weights widened to fp32 (`quant._widened_mm`), on the int8-weight kernel (`_weight_int8pack_mm`), on int8
weights widened to fp32, and with the activations quantized to int8 as well (`quant._int8_activations_mm`, PyTorch's
int8 GEMM: fast where the CPU has VNNI or AMX, a fallback elsewhere), on plain int8 weights and on int8 weights
prepacked for oneDNN's int8 matmul (`quant.PackedInt8Linear`), and on int4 weights in groups of 128 with PyTorch's
int4 kernel for CPUs (`int4.Int4Weight`) and with ours on AVX512-BF16 CPUs (`int4.Int4Bf16Weight`, built at the
first measurement: `native.py`). From the timings:

- per kind of layer, the positions per sequence from which the widened route takes over (`quant.Kernels`): the
  fewest rows from which it is faster at every larger row count measured (never, if nowhere);
- per kind of layer that is never widened, whether its bf16 weights are prepacked: if that is faster than PyTorch's
  bf16 kernel over all the row counts measured together (the same arithmetic, bit for bit; one row count's noisy
  timing must not undo it: unpacked weights decode at half the speed);
- whether int8 activations take prepacked weights: if that is faster over all the row counts measured together
  and an image's (faster at a batch's 8-48 rows and an image's 257 on an AVX512-VNNI EPYC, slower at one row);
- whether `dtype="int8"` quantizes the activations too: if that makes the estimated caption (below) faster than
  int8 weights alone;
- whether `dtype="int4"` decodes on int4 copies of the language model's layers: if one row is faster on them
  (with the faster of the two int4 kernels) than on the layers of `dtype="int8"` (else `int4` is `int8`);
- `auto`: the estimated time of one caption (vision at 257 rows, a 48-position prefill, 20 decoding steps, scaled
  by the products of blip2-opt-2.7b) on each route that `route_quality.allowed` permits; the fastest wins.

The timings are cached per CPU model and SIMD flags, core count, torch thread count and torch version in
`$XDG_CACHE_HOME/blip2/routes-<hash>.json` (else `~/.cache/blip2/`), written atomically; a file that cannot be read
is measured again with a warning naming it. `blip2 doctor` prints them (`--recalibrate` measures again).
Overrides: `BLIP2_ROUTES=flags` skips the measurement and decides by CPU flags with the defaults of `quant.Kernels`;
`BLIP2_CPU_BF16=0|1` does the same with the bf16 capability forced (the tests use both);
`BLIP2_INT8_ACTIVATIONS=0|1|packed` forces whether `dtype="int8"` quantizes activations and how its weights are
stored (0: weights only, the more accurate int8 route; 1: int8 activations on plain weights; packed: on weights
prepacked for oneDNN); `BLIP2_INT4_KERNEL=torch|bf16` forces which int4 kernel `dtype="int4"` decodes on.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .dtype_policy import CPU_BF16_ENV, cpu_has_native_bf16
from .durable import atomic_write, settings_hash
from .errors import ConfigError
from .quant import NEVER, Kernels
from .route_quality import allowed

ROUTES_ENV = "BLIP2_ROUTES"
FORMAT = 8  # of the cache file; a new format is a new file name
LM_SHAPE = (2560, 10240)  # in, out: OPT-2.7B's fc1
VISION_SHAPE = (1408, 6144)  # EVA ViT-g's fc1
VISION_ROWS = 257  # one image
LM_ROWS = (1, 4, 8, 16, 32, 48)  # decoding 1-8 sequences, then up to a prompt's prefill (32 queries + 16 tokens)
PREFILL_ROWS, NEW_TOKENS = 48, 20
# blip2-opt-2.7b's linear products in units of the measured ones: 39 vision layers of qkv, proj, fc1, fc2
# (1408 x (3 + 1 + 4.36 + 4.36) x 1408) per fc1; 32 OPT layers of q, k, v, out, fc1, fc2 plus the head per fc1
VISION_PRODUCTS = 39 * (4 * 1408 + 2 * 6144) / 6144
LM_PRODUCTS = 32 * (4 * 2560 + 2 * 10240) / 10240 + 50272 / 10240
INT8_ACTIVATIONS_ENV = "BLIP2_INT8_ACTIVATIONS"
INT4_KERNEL_ENV = "BLIP2_INT4_KERNEL"
INT8_ACTS = ("int8 activations", "int8 activations packed")
LM_NAMES = (
    "fp32",
    "bf16",
    "bf16 packed",
    "bf16 widened to fp32",
    "int8",
    "int8 widened to fp32",
    *INT8_ACTS,
    "int4",
    "int4 bf16",
)
VISION_NAMES = ("fp32", "bf16", "bf16 packed", "bf16 widened to fp32", *INT8_ACTS)

Timings = dict[str, dict[int, dict[str, float]]]  # {"lm" | "vision": {rows: {route name: ms}}}


class RouteCacheWarning(UserWarning):
    """A route cache file could not be used; the routes are measured again."""


@dataclass(frozen=True)
class Routes:
    """The kernels of each kind of layer and the route `dtype="auto"` takes, with what they were decided from."""

    kernels: Kernels
    auto: str  # a route_quality name: fp32, bf16, bf16-fp32-sums, int8 or int8-activations
    source: str  # "measured", "cache <file>", or the environment variable that decided
    timings: Timings | None = None
    caption_ms: dict[str, float] = field(default_factory=dict)  # estimated, per route auto considered
    allowed: dict[str, bool] = field(default_factory=dict)  # per route: may auto pick it (route_quality)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def machine_key() -> dict[str, Any]:
    from .machine import cpu_flags, cpu_name

    return {
        "cpu": cpu_name(),
        "flags": cpu_flags(),  # one model name can cover CPUs with and without AVX-512 (cloud "AMD EPYC")
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "format": FORMAT,
    }


def cache_path(key: dict[str, Any]) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "blip2" / f"routes-{settings_hash(key)}.json"


def measure() -> Timings:
    """Milliseconds of each route's product at each kind's row counts (`machine.kernels`)."""
    from .machine import kernels

    hopeless: set[str] = set()  # a route hopeless for the LM's rows is not timed at an image's
    return {
        "lm": kernels(*LM_SHAPE, rows=LM_ROWS, names=LM_NAMES, hopeless=hopeless),
        "vision": kernels(*VISION_SHAPE, rows=(VISION_ROWS,), names=VISION_NAMES, hopeless=hopeless),
    }


def widen_from(times: dict[int, dict[str, float]], narrow: str, wide: str) -> int:
    """The fewest rows from which `wide` beats `narrow` at that and every larger row count measured; NEVER if none."""
    rows = sorted(times)
    for i, m in enumerate(rows):
        if all(times[r][wide] < times[r][narrow] for r in rows[i:]):
            return m
    return NEVER


def total(times: dict[int, dict[str, float]], route: str) -> float:
    """A route's milliseconds summed over the row counts measured: one noisy row count cannot outweigh the rest."""
    return sum(t[route] for t in times.values())


def split(narrow: str, wide: str, threshold: int) -> Callable[[int], str]:
    """The route at each row count for a kind of layer widened from `threshold` positions."""
    return lambda rows: wide if rows >= threshold else narrow


def choose(timings: Timings, source: str = "measured") -> Routes:
    """The kernels and the auto route that the timings make fastest (see the module's docstring)."""
    lm, vision = timings["lm"], timings["vision"][VISION_ROWS]
    vision_widens = vision["bf16 widened to fp32"] < vision["bf16"]
    bf16_lm = widen_from(lm, "bf16", "bf16 widened to fp32")
    int8_lm = widen_from(lm, "int8", "int8 widened to fp32")
    int8_weights_only = split("int8", "int8 widened to fp32", int8_lm)
    int8_vision = vision["bf16 widened to fp32"] if vision_widens else vision["bf16"]
    k = Kernels(
        bf16_lm=bf16_lm,
        bf16_vision=0 if vision_widens else NEVER,
        int8_lm=int8_lm,
        int8_vision=0 if vision_widens else NEVER,
        bf16_packed_lm=bf16_lm == NEVER and total(lm, "bf16 packed") < total(lm, "bf16"),
        bf16_packed_vision=not vision_widens and vision["bf16 packed"] < vision["bf16"],
        int8_packed=total(lm, INT8_ACTS[1]) + vision[INT8_ACTS[1]] < total(lm, INT8_ACTS[0]) + vision[INT8_ACTS[0]],
    )
    acts = INT8_ACTS[k.int8_packed]
    native_lm = "bf16 packed" if k.bf16_packed_lm else "bf16"
    native_vision = vision["bf16 packed" if k.bf16_packed_vision else "bf16"]

    def caption(v: float, lm_route: Callable[[int], str]) -> float:
        prefill, step = lm[PREFILL_ROWS][lm_route(PREFILL_ROWS)], lm[1][lm_route(1)]
        return VISION_PRODUCTS * v + LM_PRODUCTS * (prefill + NEW_TOKENS * step)

    weights_only = "int8" if vision_widens else "int8+bf16-vision"
    candidates = {
        "fp32": caption(vision["fp32"], lambda r: "fp32"),
        "bf16": caption(native_vision, lambda r: native_lm),
        weights_only: caption(int8_vision, int8_weights_only),
        "int8-activations": caption(vision[acts], lambda r: acts),
    }
    if k.widens_bf16:
        v = int8_vision  # a route that widens any layer packs none: the vision encoder's bf16 or widened product
        candidates["bf16-fp32-sums"] = caption(v, split("bf16", "bf16 widened to fp32", k.bf16_lm))
    ok = {name: allowed(name) for name in candidates}
    auto = min((name for name in candidates if ok[name]), key=candidates.__getitem__)
    # dtype="int8" is the faster int8 route; unless auto is an int8 route itself, which then decides
    activations = candidates["int8-activations"] < candidates[weights_only]
    k = replace(k, int8_activations={"int8-activations": True, weights_only: False}.get(auto, activations))
    # dtype="int4" is dtype="int8" with int4 decoding steps, where one row is faster on them
    int8_route = (lambda r: acts) if k.int8_activations else int8_weights_only
    # the int4 kernel that decodes 1-8 sequences faster, all three row counts together (one count's noise aside)
    int4 = min(("int4", "int4 bf16"), key=lambda name: sum(lm[r][name] for r in (1, 4, 8)))
    k = replace(
        k, int4_decoding=lm[1][int4] < lm[1][int8_route(1)], int4_kernel="bf16" if int4 == "int4 bf16" else "torch"
    )
    int4_route = lambda r: int4 if r == 1 and k.int4_decoding else int8_route(r)  # noqa: E731
    candidates["int4"] = caption(vision[acts] if k.int8_activations else int8_vision, int4_route)
    ok["int4"] = False  # never auto: its quality is below int8's (route_quality)
    return Routes(k, auto, source, timings, candidates, ok)


def _flags_routes(native_bf16: bool, source: str) -> Routes:
    """Routes without measuring: bf16 native where the flags say so, else the AVX2 defaults (quant.Kernels)."""
    if native_bf16:
        return Routes(Kernels(NEVER, NEVER, bf16_packed_lm=True, bf16_packed_vision=True), "bf16", source)
    return Routes(Kernels(), "fp32", source)


def _read_cache(path: Path, key: dict[str, Any]) -> Timings | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data["key"] != key:
            raise ValueError(f"made for {data['key']}, not this machine {key}")
        timings = {kind: {int(r): dict(t) for r, t in rows.items()} for kind, rows in data["timings_ms"].items()}
        needed = {"lm": (LM_ROWS, LM_NAMES), "vision": ((VISION_ROWS,), VISION_NAMES)}
        for kind, (rows, names) in needed.items():
            for r in rows:
                if not all(float(timings[kind][r][n]) > 0 for n in names):
                    raise ValueError(f"{kind} at {r} rows: a time that is not positive")
        return timings
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(f"{path}: unusable route cache ({e}); measuring the routes again", RouteCacheWarning, 2)
        return None


def measured_routes(recalibrate: bool = False) -> Routes:
    """The routes from this machine's cached timings, measuring (and caching) them if absent or unusable."""
    key = machine_key()
    path = cache_path(key)
    timings = None if recalibrate else _read_cache(path, key)
    if timings is not None:
        return choose(timings, f"cache {path}")
    timings = measure()
    record = {"key": key, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "timings_ms": timings}
    try:
        atomic_write(path, json.dumps(record, indent=1))
        source = f"measured, cached in {path}"
    except OSError as e:
        warnings.warn(f"{path}: route cache not written ({e}); the routes are measured at every start", stacklevel=2)
        source = "measured, not cached"
    return choose(timings, source)


_memo: dict[str, Routes] = {}


def cpu_routes() -> Routes:
    """The routes loads use on this CPU: the environment's override, else the measured ones (once per process)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    mode = os.environ.get(ROUTES_ENV, "").strip() or "measure"
    if forced:
        chosen = _flags_routes(cpu_has_native_bf16(), f"{CPU_BF16_ENV}={forced}")
    elif mode == "flags":
        chosen = _flags_routes(cpu_has_native_bf16(), f"{ROUTES_ENV}=flags")
    elif mode != "measure":
        raise ConfigError(f"{ROUTES_ENV}={mode!r}: expected measure or flags")
    else:
        key = settings_hash(machine_key())
        if key not in _memo:
            _memo[key] = measured_routes()
        chosen = _memo[key]
    return _int4_kernel_override(_int8_activations_override(chosen))


def _int4_kernel_override(chosen: Routes) -> Routes:
    """`chosen` with `BLIP2_INT4_KERNEL=torch|bf16` applied, if set (ours where it is not built: PyTorch's, with
    `native.int4_bf16`'s warning)."""
    forced = os.environ.get(INT4_KERNEL_ENV, "").strip()
    if not forced:
        return chosen
    if forced not in ("torch", "bf16"):
        raise ConfigError(f"{INT4_KERNEL_ENV}={forced!r}: expected torch or bf16")
    kernels = replace(chosen.kernels, int4_kernel=forced)
    return replace(chosen, kernels=kernels, source=f"{chosen.source}; {INT4_KERNEL_ENV}={forced}")


def _int8_activations_override(chosen: Routes) -> Routes:
    """`chosen` with `BLIP2_INT8_ACTIVATIONS=0|1|packed` applied, if set."""
    forced = os.environ.get(INT8_ACTIVATIONS_ENV, "").strip()
    if not forced:
        return chosen
    if forced not in ("0", "1", "packed"):
        raise ConfigError(f"{INT8_ACTIVATIONS_ENV}={forced!r}: expected 0, 1 or packed")
    on = forced != "0"
    packed = forced == "packed"
    auto = {"int8": "int8-activations", "int8-activations": "int8"}.get(chosen.auto, chosen.auto)
    return replace(
        chosen,
        kernels=replace(chosen.kernels, int8_activations=on, int8_packed=packed),
        auto=auto if chosen.kernels.int8_activations != on else chosen.auto,
        source=f"{chosen.source}; {INT8_ACTIVATIONS_ENV}={forced}",
    )
