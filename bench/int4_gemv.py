"""What int4 language-model weights could give one decoding row: a measurement, not a route.

    python bench/int4_gemv.py [--threads 2]

Decoding one sequence reads every weight of the language model once per token, so its speed is the rate at which
the weights stream from memory. `torch._int_mm` on int8 weights (the int8-activations route at one row) reads them
near that rate (docs/speed.md). Weights in int4 are half the bytes. The torchao wheel on PyPI holds CUDA kernels
only, so this script compiles a small AVX512-VNNI kernel (PyTorch's C++ extension loader, about 30 s the first
time) and times it on blip2-opt-2.7b's fc1, fc2 and output head at one row, beside PyTorch's own int4 kernel for
CPUs (`_weight_int4pack_mm_for_cpu`, bf16 activations, the same groups), beside `torch._int_mm` on int8 weights of
the same shape, each reading the next of several weight copies that together exceed the caches, and beside the
time to read the same bytes without multiplying (an int64 sum). Then PyTorch's int4 kernel against the int8 route's
prepacked layer at 1, 4, 8 and 48 rows (fc1, fc2).

The kernel's arithmetic: int8 activations (one scale per row, as the int8-activations route quantizes them) times
int4 weights in [-8, 7] with one fp32 scale per 128 inputs of an output channel; each group's 128 products are
summed exactly in int32 (`vpdpbusd` on the weights as unsigned nibbles, then the activations' group sum times 8
taken off), then scaled and summed in fp32. It is checked against the same product in float64 before timing.

Needs a C++ compiler and a CPU with AVX512-VNNI; elsewhere it says so and exits. Result:
bench/results/int4_gemv.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys

import torch
from common import median_ms, turns, write_result

GROUP = 128
SHAPES = {"LM fc1 2560 -> 10240": (2560, 10240), "LM fc2 10240 -> 2560": (10240, 2560), "LM head": (2560, 50304)}

KERNEL = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// y[n] = x_scale * sum_g scale[n, g] * sum_{k in g} (u[n, k] - 8) * x[k], for one row x (int8, K) and weights u
// (int4 as unsigned nibbles) stored [N/16][K/8][16 outputs][4 bytes]: byte j of an output's 4 holds input k0 + j
// in its low nibble and k0 + 4 + j in its high one; scales stored [N/16][K/128][16].
torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor group_sums, torch::Tensor w, torch::Tensor scale,
                        int64_t n, int64_t k, double x_scale) {
  auto y = torch::empty({n}, torch::kFloat32);
  const int8_t* xp = x.data_ptr<int8_t>();
  const int32_t* gs = group_sums.data_ptr<int32_t>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t groups = k / 128;
  at::parallel_for(0, n / 16, 1, [&](int64_t b0, int64_t b1) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* wb = wp + b * (k / 8) * 64;
      const float* sb = sp + b * groups * 16;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        __m512i lo_sum = _mm512_setzero_si512(), hi_sum = _mm512_setzero_si512();
        const uint8_t* wg = wb + g * 16 * 64;
        const int8_t* xg = xp + g * 128;
        for (int c = 0; c < 16; ++c) {
          __m512i v = _mm512_loadu_si512(wg + c * 64);
          __m512i xl = _mm512_set1_epi32(*(const int32_t*)(xg + c * 8));
          __m512i xh = _mm512_set1_epi32(*(const int32_t*)(xg + c * 8 + 4));
          lo_sum = _mm512_dpbusd_epi32(lo_sum, _mm512_and_si512(v, low), xl);
          hi_sum = _mm512_dpbusd_epi32(hi_sum, _mm512_and_si512(_mm512_srli_epi16(v, 4), low), xh);
        }
        __m512i sums = _mm512_sub_epi32(_mm512_add_epi32(lo_sum, hi_sum), _mm512_set1_epi32(8 * gs[g]));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_loadu_ps(sb + g * 16), acc);
      }
      _mm512_storeu_ps(yp + b * 16, _mm512_mul_ps(acc, _mm512_set1_ps((float)x_scale)));
    }
  });
  return y;
}
"""


def compile_kernel():
    from torch.utils.cpp_extension import load_inline

    flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-mfma"]
    return load_inline("blip2_bench_int4_gemv", cpp_sources=KERNEL, functions=["gemv_int4"], extra_cflags=flags)


def pack(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers in [-8, 7] -> the kernel's nibble layout, N/16 * K/8 * 64 bytes."""
    n, k = q.shape
    u = (q + 8).to(torch.uint8).view(n // 16, 16, k // 8, 2, 4).permute(0, 2, 1, 4, 3)  # block, chunk, lane, 4, half
    return (u[..., 0] | (u[..., 1] << 4)).contiguous().view(-1)


def torch_int4_mm(scales_and_zeros: torch.Tensor):
    """PyTorch's int4 product (bf16 rows, weights from `_convert_weight_to_int4pack_for_cpu`) as a `turns` product."""
    return lambda x, w: torch._weight_int4pack_mm_for_cpu(x, w, GROUP, scales_and_zeros)


def measure(kernel, copies_bytes: int = 256 * 2**20) -> dict[str, dict[str, float]]:
    out = {}
    for name, (k, n) in SHAPES.items():
        out[name] = one_shape(kernel, k, n, copies_bytes)
        print(name, {key: round(v, 3) for key, v in out[name].items()}, flush=True)
    return out


def one_shape(kernel, k: int, n: int, copies_bytes: int) -> dict[str, float]:
    """The kernel checked against float64, then timed beside `_int_mm` and plain reads, for a (k -> n) layer."""
    q = torch.randint(-8, 8, (n, k), dtype=torch.int32)
    scales = torch.rand(n, k // GROUP) * 0.01
    scale = scales.view(n // 16, 16, k // GROUP).permute(0, 2, 1).contiguous().view(-1)
    w4 = pack(q)
    x = torch.randint(-127, 128, (k,), dtype=torch.int8)
    sums = x.view(-1, GROUP).int().sum(1).int()
    y = kernel.gemv_int4(x, sums, w4, scale, n, k, 0.5)
    exact = ((q.double().view(n, -1, GROUP) * x.double().view(1, -1, GROUP)).sum(-1) * scales.double()).sum(-1)
    torch.testing.assert_close(y.double(), exact * 0.5, rtol=1e-5, atol=1e-4)
    int4 = [w4.clone() for _ in range(max(2, copies_bytes // w4.numel()))]
    int8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(max(2, copies_bytes // (n * k)))]
    row = x.view(1, k)
    # PyTorch's own: the same nibbles (value - 8) times a scale per group, bf16 activations
    torch_int4 = [torch._convert_weight_to_int4pack_for_cpu(q + 8, 1) for _ in range(len(int4))]
    scales_and_zeros = torch.stack([scales.t(), torch.zeros_like(scales.t())], -1).to(torch.bfloat16)
    times = {
        "int4 kernel": median_ms(turns(x, int4, lambda x, w: kernel.gemv_int4(x, sums, w, scale, n, k, 0.5)), 21),
        "int4 torch._weight_int4pack_mm_for_cpu": median_ms(
            turns(row.bfloat16(), torch_int4, torch_int4_mm(scales_and_zeros)), 21
        ),
        "reading the int4 bytes alone": median_ms(turns(None, int4, lambda _, w: w.view(torch.int64).sum()), 21),
        "int8 torch._int_mm": median_ms(turns(row, int8, lambda x, w: torch._int_mm(x, w.t())), 21),
        "reading the int8 bytes alone": median_ms(turns(None, int8, lambda _, w: w.view(torch.int64).sum()), 21),
    }
    return {
        **times,
        "speedup over int8": times["int8 torch._int_mm"] / times["int4 kernel"],
        "int4 share of the read rate": times["reading the int4 bytes alone"] / times["int4 kernel"],
    }


@torch.no_grad()
def rows_scaling(copies_bytes: int = 256 * 2**20) -> dict[str, dict[int, dict[str, float]]]:
    """PyTorch's int4 kernel against a prepacked int8-activations layer (`quant.PackedInt8Linear`, the int8 route's
    layer on this CPU) from one row (decoding one sequence) to a prefill's 48."""
    from blip2.quant import Int8Linear, PackedInt8Linear

    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, (k, n) in list(SHAPES.items())[:2]:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32)
        int4 = [torch._convert_weight_to_int4pack_for_cpu(q, 1) for _ in range(max(2, copies_bytes // (n * k // 2)))]
        scales_and_zeros = torch.stack([torch.full((k // GROUP, n), 0.01), torch.zeros(k // GROUP, n)], -1).bfloat16()
        layer = Int8Linear(torch.nn.Linear(k, n), activations=True)
        layer.set_weight(torch.randn(n, k))
        int8 = [PackedInt8Linear(layer) for _ in range(max(2, copies_bytes // (n * k)))]
        out[name] = {}
        for m in (1, 4, 8, 48):
            x = torch.randn(m, k)
            out[name][m] = {
                "int4 torch._weight_int4pack_mm_for_cpu": median_ms(
                    turns(x.bfloat16(), int4, torch_int4_mm(scales_and_zeros)), 21
                ),
                "int8 prepacked layer": median_ms(turns(x, int8, lambda x, layer: layer(x)), 21),
            }
            print(name, m, {key: round(v, 3) for key, v in out[name][m].items()}, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from blip2.machine import cpu_flags, cpu_name

    if "avx512_vnni" not in cpu_flags() or shutil.which("c++") is None:
        sys.exit("this measurement needs a CPU with AVX512-VNNI and a C++ compiler")
    torch.set_num_threads(args.threads)
    result = {
        "command": f"python bench/int4_gemv.py --threads {args.threads}",
        "cpu": cpu_name(),
        "flags": cpu_flags(),
        "ms_one_row": measure(compile_kernel()),
        "ms_by_rows": rows_scaling(),
    }
    print(write_result("int4_gemv", result))


if __name__ == "__main__":
    main()
