"""The int4 kernels for decoding steps (`dtype="int4"`), at one row and at a few, beside int8 and the memory's rate.

    python bench/int4_gemv.py [--threads 2]

Decoding one sequence reads every weight of the language model once per token, so its speed is the rate at which
the weights stream from memory. Timed on blip2-opt-2.7b's fc1, fc2 and output head at one row, each product on the
next of several weight copies that together exceed the caches (as a model's layers are read): our int4 kernel
(`int4.Int4Bf16Weight`, csrc/int4_bf16.cpp: AVX512-BF16, built by `blip2.native`), PyTorch's own int4 kernel for
CPUs (`int4.Int4Weight`, `_weight_int4pack_mm_for_cpu`), both on the same levels and groups of 128, `torch._int_mm`
on int8 weights of the same shape, and the time to read the same int4 and int8 bytes without multiplying (an int64
sum). Then the two int4 kernels against the int8 route's prepacked layer (`quant.PackedInt8Linear`) at 1, 4, 8 and
48 rows (fc1, fc2). Each figure is the fastest median of 5 rounds that take the products in turn. The torchao
wheel on PyPI holds CUDA kernels only (its x86 int4 kernels come with PyTorch's own CPU index), so it is not among
them.

Needs a CPU with AVX512-BF16 and a C++ compiler for our kernel; elsewhere it says so and exits.
Result: bench/results/int4_gemv.json.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from common import median_ms, turns, write_result

SHAPES = {"LM fc1 2560 -> 10240": (2560, 10240), "LM fc2 10240 -> 2560": (10240, 2560), "LM head": (2560, 50304)}
COPIES_BYTES = 256 * 2**20
KERNELS = {"int4 ours (bf16)": "bf16", "int4 PyTorch": "torch"}


def copies(make, nbytes: int) -> list:
    return [make() for _ in range(max(2, COPIES_BYTES // nbytes))]


def nbytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def int4_copies(w: torch.Tensor) -> dict[str, list]:
    from blip2.int4 import Int4Weight

    out = {}
    for name, kernel in KERNELS.items():
        first = Int4Weight.quantize(w, kernel=kernel)
        out[name] = copies(lambda first=first: copy.deepcopy(first), nbytes(first))
    return out


def interleaved(products: dict, rounds: int = 5) -> dict[str, float]:
    """Each product's fastest median over `rounds` rounds that take the products in turn: the memory bus is shared
    with other jobs, and a slow moment should not fall on one product only."""
    best = dict.fromkeys(products, float("inf"))
    for _ in range(rounds):
        for name, product in products.items():
            best[name] = min(best[name], median_ms(product, 7))
    return best


def one_row(k: int, n: int) -> dict[str, float]:
    torch.manual_seed(0)
    w = torch.randn(n, k)
    layers = int4_copies(w)
    row = torch.randn(1, k).bfloat16()
    int8 = copies(lambda: torch.randint(-127, 128, (n, k), dtype=torch.int8), n * k)
    int4_bytes = copies(lambda: torch.randint(-127, 128, (n * k // 2,), dtype=torch.int8).view(torch.int64), n * k // 2)
    products = {name: turns(row, ms, lambda x, m: m(x)) for name, ms in layers.items()}
    products |= {
        "int8 torch._int_mm": turns(row.char(), int8, lambda x, w: torch._int_mm(x, w.t())),
        "reading the int4 bytes alone": turns(None, int4_bytes, lambda _, w: w.sum()),
        "reading the int8 bytes alone": turns(None, int8, lambda _, w: w.view(torch.int64).sum()),
    }
    times = interleaved(products)
    ours = times["int4 ours (bf16)"]
    return times | {
        "ours over PyTorch's int4": times["int4 PyTorch"] / ours,
        "ours, share of the int4 read rate": times["reading the int4 bytes alone"] / ours,
        "ours, GB/s of int4 weights": n * k / 2 / ours / 1e6,
    }


def by_rows(k: int, n: int) -> dict[int, dict[str, float]]:
    from blip2.quant import Int8Linear, PackedInt8Linear

    torch.manual_seed(0)
    w = torch.randn(n, k)
    layers = int4_copies(w)
    layer = Int8Linear(torch.nn.Linear(k, n, device="meta"), activations=True)
    layer.set_weight(w)
    layers["int8 prepacked layer"] = copies(lambda: PackedInt8Linear(layer), n * k)
    out = {}
    for m in (1, 4, 8, 48):
        x = torch.randn(m, k)
        out[m] = interleaved({name: turns(x, ms, lambda x, layer: layer(x)) for name, ms in layers.items()})
        print(k, n, m, {key: round(v, 3) for key, v in out[m].items()}, flush=True)
    return out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from blip2.int4 import can_int4
    from blip2.machine import cpu_flags, cpu_name, memory

    if not can_int4("bf16"):
        sys.exit("our int4 kernel needs a CPU with AVX512-BF16 and a C++ compiler (blip2.native)")
    torch.set_num_threads(args.threads)
    ms_one_row = {}
    for name, (k, n) in SHAPES.items():
        ms_one_row[name] = one_row(k, n)
        print(name, {key: round(v, 3) for key, v in ms_one_row[name].items()}, flush=True)
    result = {
        "command": f"python bench/int4_gemv.py --threads {args.threads}",
        "cpu": cpu_name(),
        "flags": cpu_flags(),
        "memory": memory(),
        "ms_one_row": ms_one_row,
        "ms_by_rows": {name: by_rows(k, n) for name, (k, n) in list(SHAPES.items())[:2]},
    }
    print(write_result("int4_gemv", result))


if __name__ == "__main__":
    main()
