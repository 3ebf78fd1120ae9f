"""The matmul kernels `dtype="int8"` and `dtype="bf16"` choose between, on blip2-opt-2.7b's layer shapes (quant.py).

    python bench/matmul.py [--threads 1]

For each shape (rows x in -> out): fp32 `F.linear`, bf16 `F.linear` (emulated on CPUs without AVX512-BF16), bf16
summed in fp32 (`quant.StoredLinear`: the weight widened to fp32 a block at a time, fp32 GEMM, result rounded),
PyTorch's int8-weight `_weight_int8pack_mm` (bf16 activations, as quant.Int8Linear calls it below
`INT8_FP32_MIN_POSITIONS` positions), int8 widened to fp32 a block at a time (`quant._widened_mm`, as Int8Linear
runs from there), and the whole int8 weight dequantized, then fp32. Median of 7 runs in milliseconds; results in
bench/results/matmul.json (`--threads 1`) or matmul_<N>threads.json. (Not named kernels.py: transformers imports
a package of that name when it can, and bench/ comes first on sys.path.)

    python bench/matmul.py --int8-row-pad [--threads 2]

PyTorch's int8 GEMM (`torch._int_mm`, the int8-activations route) on the int8 layers' shapes with the weight's rows
stored contiguously and `quant.ROW_PAD` bytes apart (`quant.int8_rows`, as `Int8Linear` stores them), at the row
counts of decoding, a prefill and an image; each product reads one of several weight copies in turn, together
larger than the CPU's caches, so that the weight comes from memory as in the model. Result:
bench/results/matmul_int8_row_pad.json.

    python bench/matmul.py --int8-packed [--threads 2]

A whole int8-activations layer (activations quantized, int8 product, scales, bias) with its weight as `Int8Linear`
stores it (padded rows, `torch._int_mm`) and prepacked for oneDNN's int8 matmul (`quant.PackedInt8Linear`), on the
same shapes and the LM head, weights again read in turn from copies larger than the caches; beside them the time to
read the same copies without multiplying (a sum), and the faster layer's share of that rate (1.0: the product
streams its weight as fast as the machine reads memory). Result: bench/results/matmul_int8_packed.json.

    python bench/matmul.py --fused-qkv [--threads 2]

OPT-2.7B's query, key and value projections on prepacked int8 weights as three layers and as one fused layer
(`quant.fuse_projections`), at the row counts of decoding, a prefill and 8 prompts, weights read in turn from copies
larger than the caches. Result: bench/results/matmul_fused_qkv.json.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import median_ms, turns, write_result

from blip2.quant import Int8Linear, PackedInt8Linear, StoredLinear, _widened_mm, fuse_projections, int8_rows

SHAPES = {  # (rows, in, out)
    "LM fc1, decoding 1 sequence": (1, 2560, 10240),
    "LM fc1, decoding 4 sequences": (4, 2560, 10240),
    "LM fc1, decoding 8 sequences": (8, 2560, 10240),
    "LM fc1, 16 rows": (16, 2560, 10240),
    "LM fc1, 32 rows": (32, 2560, 10240),
    "LM fc1, prefill of 64 tokens": (64, 2560, 10240),
    "LM fc1, prefill of 8 prompts (352 rows)": (352, 2560, 10240),
    "vision fc1, 8 rows": (8, 1408, 6144),
    "vision fc1, 16 rows": (16, 1408, 6144),
    "vision fc1, one image (257 tokens)": (257, 1408, 6144),
}


@torch.no_grad()
def time_shape(m: int, k: int, n: int) -> dict[str, float]:
    x, w = torch.randn(m, k), torch.randn(n, k)
    xb, wb = x.bfloat16(), w.bfloat16()
    fast = StoredLinear(torch.nn.Linear(k, n, bias=False), torch.bfloat16, min_positions=0)
    fast.set_weight(w)
    scale = w.abs().amax(1) / 127
    wq = (w / scale[:, None]).round().to(torch.int8)
    return {
        "fp32": median_ms(lambda: F.linear(x, w)),
        "bf16": median_ms(lambda: F.linear(xb, wb), 3),
        "bf16 summed in fp32": median_ms(lambda: fast(xb)),  # quant.StoredLinear, as dtype="bf16" runs here
        "int8 weights": median_ms(lambda: torch._weight_int8pack_mm(x.bfloat16(), wq, scale.bfloat16()).float()),
        "int8 widened to fp32": median_ms(lambda: _widened_mm(x, wq, scale, None)),
        "dequantize + fp32": median_ms(lambda: F.linear(x, wq.float() * scale[:, None])),
    }


INT8_SHAPES = {  # (in, out): rows
    "LM q/k/v/out (2560 -> 2560)": ((2560, 2560), (1, 8, 48, 168)),
    "LM fc1 (2560 -> 10240)": ((2560, 10240), (1, 8, 48, 168)),
    "LM fc2 (10240 -> 2560)": ((10240, 2560), (1, 8, 48, 168)),
    "vision fc1 (1408 -> 6144)": ((1408, 6144), (8, 257)),
    "vision fc2 (6144 -> 1408)": ((6144, 1408), (8, 257)),
}


@torch.no_grad()
def int8_row_pad(copies_bytes: int = 256 * 2**20) -> dict[str, dict[int, dict[str, float]]]:
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, ((k, n), rows) in INT8_SHAPES.items():
        dense = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(max(2, copies_bytes // (n * k)))]
        padded = [int8_rows(n, k).copy_(w) for w in dense]
        out[name] = {}
        for m in rows:
            x = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            assert torch.equal(torch._int_mm(x, dense[0].t()), torch._int_mm(x, padded[0].t()))
            times = {
                label: median_ms(turns(x, ws, lambda x, w: torch._int_mm(x, w.t())), 15)
                for label, ws in (("contiguous rows", dense), ("padded rows", padded))
            }
            out[name][m] = {**times, "speedup": times["contiguous rows"] / times["padded rows"]}
            print(name, m, {key: round(v, 2) for key, v in out[name][m].items()}, flush=True)
    return out


@torch.no_grad()
def int8_packed(copies_bytes: int = 256 * 2**20) -> dict[str, dict[int, dict[str, float]]]:
    shapes = {**INT8_SHAPES, "LM head (2560 -> 50272)": ((2560, 50272), (1, 8))}
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, ((k, n), rows) in shapes.items():
        plain = []
        for _ in range(max(2, copies_bytes // (n * k))):
            layer = Int8Linear(torch.nn.Linear(k, n), activations=True)
            layer.set_weight(torch.randn(n, k))
            plain.append(layer)
        packed = [PackedInt8Linear(layer) for layer in plain]
        # the machine's rate for the same bytes: each copy's whole buffer summed as int64 (no products), in the same
        # turns, scaled to the weight's own bytes (the buffer holds the row padding too)
        buffers = (layer.weight.untyped_storage() for layer in plain)
        flat = [torch.empty(0, dtype=torch.int8).set_(b).view(torch.int64) for b in buffers]
        read_ms = median_ms(turns(None, flat, lambda x, w: w.sum()), 15) * n * k / (8 * flat[0].numel())
        out[name] = {}
        for m in rows:
            x = torch.randn(m, k)
            assert torch.equal(plain[0](x), packed[0](x))
            times = {
                label: median_ms(turns(x, layers, lambda x, layer: layer(x)), 15)
                for label, layers in (("padded rows, torch._int_mm", plain), ("prepacked, oneDNN", packed))
            }
            out[name][m] = {
                **times,
                "speedup": times["padded rows, torch._int_mm"] / times["prepacked, oneDNN"],
                "reading the weight alone": read_ms,
                "share of the read rate": read_ms / min(times.values()),
            }
            print(name, m, {key: round(v, 2) for key, v in out[name][m].items()}, flush=True)
    return out


@torch.no_grad()
def fused_qkv(copies_bytes: int = 256 * 2**20) -> dict[int, dict[str, float]]:
    width = 2560
    separate, fused = [], []
    for _ in range(max(2, copies_bytes // (3 * width * width))):
        model, attn = torch.nn.Module(), torch.nn.Module()
        model.language_model = torch.nn.Module()
        model.language_model.config = type("Config", (), {"is_encoder_decoder": False})()
        model.language_model.attn = attn
        for name in ("q_proj", "k_proj", "v_proj"):
            layer = Int8Linear(torch.nn.Linear(width, width), activations=True)
            layer.set_weight(torch.randn(width, width))
            setattr(attn, name, layer)
        separate.append([PackedInt8Linear(getattr(attn, name)) for name in ("q_proj", "k_proj", "v_proj")])
        fuse_projections(model)
        fused.append([attn.q_proj, attn.k_proj, attn.v_proj])
    out: dict[int, dict[str, float]] = {}
    for m in (1, 8, 48, 336):
        x = torch.randn(m, width)
        assert all(torch.equal(a(x), b(x)) for a, b in zip(separate[0], fused[0]))
        times = {
            label: median_ms(turns(x, layers, lambda x, three: [layer(x) for layer in three]), 15)
            for label, layers in (("three layers", separate), ("fused", fused))
        }
        out[m] = {**times, "speedup": times["three layers"] / times["fused"]}
        print("q, k, v", m, {key: round(v, 3) for key, v in out[m].items()}, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--int8-row-pad", action="store_true", help="int8 GEMM on contiguous against padded weight rows")
    ap.add_argument("--int8-packed", action="store_true", help="int8-activations layers, plain against prepacked")
    ap.add_argument("--fused-qkv", action="store_true", help="q, k, v prepacked int8 layers, three against one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for flag, run in (("int8-row-pad", int8_row_pad), ("int8-packed", int8_packed), ("fused-qkv", fused_qkv)):
        if getattr(args, flag.replace("-", "_")):
            from blip2.machine import cpu_flags, cpu_name

            command = f"python bench/matmul.py --{flag} --threads {args.threads}"
            result = {"command": command, "cpu": cpu_name(), "flags": cpu_flags(), "ms": run()}
            print(write_result(f"matmul_{flag.replace('-', '_')}", result))
            return
    rows = {}
    for name, shape in SHAPES.items():
        rows[name] = time_shape(*shape)
        print(name, {k: round(v, 1) for k, v in rows[name].items()}, flush=True)
    name = "matmul" if args.threads == 1 else f"matmul_{args.threads}threads"
    print(write_result(name, {"command": f"python bench/matmul.py --threads {args.threads}", "ms": rows}))


if __name__ == "__main__":
    main()
