"""What the running machine can do, measured: memory bandwidth, GEMM rates per dtype, and how fast each kernel that
the CPU routes choose between runs on BLIP-2's layer shapes. `blip2 doctor` prints it.

Figures come from short timed runs (a few seconds in all), never from CPU flags: two CPUs with the same flags differ
in cores, caches and memory channels. Each figure is the best of a few runs, after a warm-up.

- `copy_gbs`: bytes read plus bytes written per second by a large tensor copy; `read_gbs`: bytes read per second
  by a large sum. A memory-bound kernel (decoding: few rows times a big weight) can read its weights at most at
  about `read_gbs`.
- `gemm_gflops`: fp32, bf16 (native on AVX512-BF16/AMX CPUs, emulated elsewhere) and int8 x int8 (`torch._int_mm`)
  GEMMs at the vision encoder's size (257 rows, 1408 -> 6144).
- `kernels`: milliseconds of each product that `quant.py` can route a language-model layer (2560 -> 10240, OPT-2.7B's
  fc1) through, at 1 to 257 rows, with the weight bytes each reads per second.
- `measured` / `in_use`: the routes chosen from those timings (`routes.py`) and the ones loads use (the same unless
  `BLIP2_ROUTES` or `BLIP2_CPU_BF16` overrides them), with each route's estimated caption time.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .cpuinfo import cpu_flags, cpu_name
from .quant import NEVER

ROWS = (1, 4, 8, 24, 64, 257)  # decoding 1-8 sequences, the thresholds' region, a prompt's prefill, one image
LM_SHAPE = (2560, 10240)  # in, out: OPT-2.7B's fc1
VISION_GEMM = (257, 1408, 6144)  # rows, in, out: one image through EVA ViT-g's fc1
HOPELESS = 8  # times the fastest route's time: `kernels` stops timing a route of SKIPPABLE there
SKIPPABLE = ("int8 activations", "int8 activations packed")
COPIES_BYTES = 256 << 20  # `kernels` reads weight copies in turn, together larger than a CPU's last-level cache


def best_seconds(fn: Callable[[], Any], repeat: int = 3, budget_s: float = 2.0) -> float:
    """The fastest of `repeat` timed calls after one warm-up; fewer calls when one alone takes over `budget_s`."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    best = first
    for _ in range(repeat if first < budget_s else 0):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def memory(mib: int = 256) -> dict[str, float]:
    a = torch.ones(mib << 18)  # float32: mib MiB
    b = torch.empty_like(a)
    nbytes = a.numel() * 4
    return {
        "copy_gbs": 2 * nbytes / best_seconds(lambda: b.copy_(a)) / 1e9,
        "read_gbs": nbytes / best_seconds(lambda: a.sum()) / 1e9,
    }


@torch.no_grad()
def gemm(rows: int, k: int, n: int) -> dict[str, float]:
    flop = 2 * rows * k * n
    x, w = torch.randn(rows, k), torch.randn(n, k)
    xb, wb = x.bfloat16(), w.bfloat16()
    xi, wi = torch.randint(-127, 127, (rows, k), dtype=torch.int8), torch.randint(-127, 127, (k, n), dtype=torch.int8)
    return {
        "fp32": flop / best_seconds(lambda: F.linear(x, w)) / 1e9,
        "bf16": flop / best_seconds(lambda: F.linear(xb, wb)) / 1e9,
        "int8": flop / best_seconds(lambda: torch._int_mm(xi, wi)) / 1e9,
    }


@torch.no_grad()
def kernels(
    k: int, n: int, rows: tuple[int, ...] = ROWS, names: tuple[str, ...] | None = None, hopeless: set[str] | None = None
) -> dict[int, dict[str, float]]:
    """Milliseconds per product of each route (or of those in `names`) for an (n, k) weight at each row count.

    Each route's weight is stored as the route stores it, in copies read in turn that together exceed the CPU's
    caches (`COPIES_BYTES`): in a model every layer's weight comes from memory, and a single 26 MB int8 weight timed
    alone would sit in a 32 MB L3 and decode twice as fast as it ever does there.

    Int8 activations (`SKIPPABLE`, timed after the others) taking `HOPELESS` times the fastest route's time at some
    row count are not run at larger ones (nor at all if named in `hopeless`, which collects such routes): their
    time there is infinite. Without VNNI or AMX, PyTorch's int8 GEMM runs at about 1% of fp32's speed, and timing
    it at an image's rows would take seconds."""
    hopeless = set() if hopeless is None else hopeless
    from .int4 import Int4Weight, can_int4
    from .quant import _int8_activations_mm, _pack, _widened_mm, can_pack, can_pack_int8, int8_rows

    w = torch.randn(n, k)
    scale = w.abs().amax(1) / 127
    wq = (w / scale[:, None]).round().to(torch.int8)
    wb, sb = w.bfloat16(), scale.bfloat16()
    packs, packs_int8 = can_pack(), can_pack_int8()

    def int8_acts(x: torch.Tensor, xb: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _int8_activations_mm(x, v, scale)

    def int8_plain() -> torch.Tensor:  # laid out as `Int8Linear` stores it for int8 activations
        return int8_rows(n, k).copy_(wq)

    # name: (a new copy of the weight as the route stores it, the product of activations x (xb: in bf16) with it)
    routes: dict[str, tuple[Callable[[], torch.Tensor], Callable[..., torch.Tensor]]] = {
        "fp32": (w.clone, lambda x, xb, v: F.linear(x, v)),
        "bf16": (wb.clone, lambda x, xb, v: F.linear(xb, v)),
        # without oneDNN there is nothing to prepack: the plain product stands in (never faster, never chosen)
        "bf16 packed": (
            lambda: _pack(wb) if packs else wb.clone(),
            lambda x, xb, v: (
                torch.ops.mkldnn._linear_pointwise(xb, v, None, "none", [], "") if packs else F.linear(xb, v)
            ),
        ),
        "bf16 widened to fp32": (wb.clone, lambda x, xb, v: _widened_mm(x, v, None, None)),
        "int8": (wq.clone, lambda x, xb, v: torch._weight_int8pack_mm(xb, v, sb)),
        "int8 widened to fp32": (wq.clone, lambda x, xb, v: _widened_mm(x, v, scale, None)),
        "int8 activations": (int8_plain, int8_acts),
        # as `PackedInt8Linear` stores it; without oneDNN's int8 matmul the plain layout stands in (`pack_int8` then
        # leaves the model as it is, whichever wins)
        "int8 activations packed": (
            lambda: torch.ops.onednn.qlinear_prepack(wq, None) if packs_int8 else int8_plain(),
            int8_acts,
        ),
        "int4": (lambda: copy.deepcopy(w4["int4"]), lambda x, xb, v: v(xb)),
        "int4 bf16": (lambda: copy.deepcopy(w4["int4 bf16"]), lambda x, xb, v: v(xb)),
    }
    w4 = {  # ours only where it is built: `quantize` would stand PyTorch's in for it
        name: Int4Weight.quantize(w, kernel=kernel) if can_int4(kernel) else None
        for name, kernel in (("int4", "torch"), ("int4 bf16", "bf16"))
        if name in (names or routes)
    }
    hopeless.update(name for name, weight in w4.items() if weight is None)  # no such kernel here
    inputs = {m: (x, x.bfloat16()) for m in rows for x in (torch.randn(m, k),)}
    out: dict[int, dict[str, float]] = {m: {} for m in rows}
    for name in (r for r in routes if r in (names or routes)):
        make, product = routes[name]
        copies: list[torch.Tensor] = []
        for m in rows:
            if name in hopeless:
                out[m][name] = math.inf
                continue
            if not copies:
                copies = [make()]
                copies += [make() for _ in range(min(64, max(2, COPIES_BYTES // _nbytes(copies[0]))) - 1)]
            out[m][name] = _ms_in_turn(product, *inputs[m], copies)
            others = [ms for other, ms in out[m].items() if other not in SKIPPABLE]
            if name in SKIPPABLE and others and out[m][name] >= HOPELESS * min(others):
                hopeless.add(name)
    return out


def _nbytes(t: torch.Tensor | torch.nn.Module) -> int:
    if isinstance(t, torch.nn.Module):
        return sum(_nbytes(b) for b in t.buffers())
    return t.numel() * t.element_size()


def _ms_in_turn(product: Callable[..., torch.Tensor], x: torch.Tensor, xb: torch.Tensor, copies: list) -> float:
    """Milliseconds of `product(x, xb, weight)`, each call on the next of the weight's `copies`."""
    turn = itertools.cycle(copies)
    return best_seconds(lambda: product(x, xb, next(turn)), budget_s=0.3) * 1e3


def report(
    recalibrate: bool = False, vision: tuple[int, int, int] = VISION_GEMM, memory_mib: int = 256
) -> dict[str, Any]:
    """Everything `blip2 doctor` prints, as a dict (JSON-ready): the machine's limits, the measured routes
    (`routes.measured_routes`, from the cache unless `recalibrate`) and the routes loads use (`routes.cpu_routes`,
    which an environment variable may override)."""
    from .dtype_policy import cpu_has_native_bf16
    from .routes import LM_SHAPE as LM
    from .routes import cpu_routes, measured_routes

    measured = measured_routes(recalibrate)
    in_use = cpu_routes()
    k, n = LM
    weight_bytes = (
        dict.fromkeys(("int8", "int8 widened to fp32", "int8 activations", "int8 activations packed"), 1)
        | {"fp32": 4}
        | dict.fromkeys(("bf16", "bf16 packed", "bf16 widened to fp32"), 2)
        | {"int4": 0.5 + 4 / 128, "int4 bf16": 0.5 + 8 / 128}  # a scale and zero per 128 weights: bf16, fp32
    )
    times = measured.timings["lm"]
    read = {m: {r: weight_bytes[r] * k * n / (ms / 1e3) / 1e9 for r, ms in t.items()} for m, t in times.items()}
    return {
        "cpu": cpu_name(),
        "flags": cpu_flags(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "memory": memory(memory_mib),
        "gemm_gflops": gemm(*vision),
        "gemm_shape": list(vision),
        "native_bf16_flags": cpu_has_native_bf16(),
        "kernel_shape": [k, n],
        "weight_read_gbs": read,
        "measured": measured.as_dict(),
        "in_use": in_use.as_dict(),
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _int4(k: dict[str, Any]) -> str:
    if not k.get("int4_decoding", False):
        return "no"
    return "yes (our bf16 kernel)" if k.get("int4_kernel") == "bf16" else "yes (PyTorch's kernel)"


def _threshold(n: int) -> str:
    return "never" if n >= NEVER else "always" if n <= 1 else f"from {n} positions"


def format_report(r: dict[str, Any]) -> str:
    mem, g, routes = r["memory"], r["gemm_gflops"], r["measured"]
    lines = [
        f"cpu        {r['cpu']} ({r['cpu_count']} cores, torch {r['torch']} on {r['threads']} threads)",
        f"flags      {' '.join(r['flags']) or '(none of the SIMD flags PyTorch uses)'}",
        f"memory     copy {mem['copy_gbs']:.1f} GB/s (read + write), read {mem['read_gbs']:.1f} GB/s",
        f"GEMM       {'x'.join(map(str, r['gemm_shape']))}: fp32 {g['fp32']:.0f}, bf16 {g['bf16']:.0f}, "
        f"int8 {g['int8']:.0f} GFLOP/s",
        f"kernels    {r['kernel_shape'][0]} -> {r['kernel_shape'][1]}, ms per product (weight GB/s read):",
    ]
    times = routes["timings"]["lm"]
    names = list(next(iter(times.values())))
    lines.append("    rows  " + "".join(f"{n:>24}" for n in names))
    for m, t in times.items():
        cells = "".join(f"{t[n]:>12.2f} ({r['weight_read_gbs'][m][n]:>6.1f})    " for n in names)
        lines.append(f"    {m:>4}  {cells}")
    for m, t in routes["timings"]["vision"].items():
        lines.append(f"vision     1408 -> 6144, {m} rows, ms: " + ", ".join(f"{n} {v:.2f}" for n, v in t.items()))
    for title, rt in (("measured", routes), ("in use", r["in_use"])):
        k = rt["kernels"]
        lines.append(
            f"routes     {title} ({rt['source']}): widened to fp32: bf16 LM {_threshold(k['bf16_lm'])}, bf16 vision "
            f"{_threshold(k['bf16_vision'])}, int8 LM {_threshold(k['int8_lm'])}, int8 vision "
            f"{_threshold(k['int8_vision'])}; bf16 prepacked: LM {_yes(k['bf16_packed_lm'])}, vision "
            f"{_yes(k['bf16_packed_vision'])}; int8 activations: {_yes(k['int8_activations'])}"
            f"{' (prepacked)' if k['int8_activations'] and k.get('int8_packed') else ''}; "
            f"int4 decoding: {_int4(k)}; dtype auto = {rt['auto']}"
        )
    for name, ms in routes["caption_ms"].items():
        may = "may be picked by auto" if routes["allowed"][name] else "not for auto (route_quality)"
        lines.append(f"caption    {name}: about {ms / 1e3:.1f} s estimated; {may}")
    return "\n".join(lines)
