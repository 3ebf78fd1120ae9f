"""Where a batch's time goes on each CPU route: the phases timed plainly against the machine's limits, then one
profiled batch per route with the heaviest operators and copies.

    python bench/profile_routes.py [--folder F] [--routes auto,int8] [--images 8] [--tokens 20]

On the full-size blip2-opt-2.7b architecture with random weights (`common.make_full_checkpoint`), each route in
its own process: load, one warm-up batch, then `--images` new 300x400 images:
- **phases**, unprofiled: the image prefix (vision encoder and Q-Former), the prompt's prefill with the first token,
  and each further decoding step; the vision encoder's linear products in GFLOP/s and the decoding steps' reading
  of the language model's weights in GB/s, each beside the machine's own limit (`blip2.machine`: bf16 GEMM on the
  vision encoder's shape, memory copy) as a share of it;
- **operators**, under `torch.profiler`: the batch's seconds unprofiled and profiled, the operators with the most
  self time (name, input shapes, calls, milliseconds, share), and the largest `aten::copy_` calls: a copy of a whole
  weight per call (as `F.linear` on a strided input once did to the LM head, 4 of 8 s) shows there first. The
  profiler's bookkeeping inflates ops that allocate (a profiled batch takes ~1.25x as long), so shares of small
  ops such as the KV cache's `aten::cat` overstate them: the phases are the measure, the operators the pointer.
The machine (CPU, flags) and the routes in use are recorded beside them.
Result: bench/results/profile_routes.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import make_full_checkpoint, write_result

PROMPT = "Question: what is it? Answer:"


def images(n: int, seed: int) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)) for _ in range(n)]


def phases(m, n: int, tokens: int) -> dict:
    """Seconds of each phase for `n` new images, unprofiled, and the rates they reach against the machine's."""
    import torch

    from blip2.machine import gemm, memory

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    with torch.no_grad():
        vision_s, prefix = timed(lambda: m.image_prefix(images(n, seed=4), [PROMPT] * n))
        ids, mask = m.tokenize([PROMPT] * n)
        first_s, _ = timed(lambda: m.model.generate(prefix, ids, mask, max_new_tokens=1, min_new_tokens=1))
        all_s, _ = timed(lambda: m.model.generate(prefix, ids, mask, max_new_tokens=tokens, min_new_tokens=tokens))
    step_s = (all_s - first_s) / (tokens - 1)
    vision = m.model.vision_model
    rows = n * vision.config.num_positions
    flop = sum(
        2 * rows * layer.in_features * layer.out_features
        for layer in vision.modules()
        if hasattr(layer, "out_features")
    )
    lm_bytes = step_bytes(m.model.language_model)
    limits = {"bf16_gemm_gflops": gemm(257, 1408, 6144)["bf16"], "copy_gbs": memory()["copy_gbs"]}
    return {
        "vision_and_qformer_s": round(vision_s, 3),
        "prefill_and_first_token_s": round(first_s, 3),
        "step_ms": round(step_s * 1e3, 1),
        "vision_linear_gflops": round(flop / vision_s / 1e9, 1),
        "vision_share_of_bf16_gemm": round(flop / vision_s / 1e9 / limits["bf16_gemm_gflops"], 3),
        "decoding_weight_gbs": round(lm_bytes / step_s / 1e9, 1),
        "decoding_share_of_copy": round(lm_bytes / step_s / 1e9 / limits["copy_gbs"], 3),
        "limits": limits,
    }


def step_bytes(lm) -> int:
    """Bytes of the weights a decoding step reads: a layer with an int4 copy for decoding (`dtype="int4"`) reads
    that instead of its int8 weight."""
    from blip2.quant import quantized_bytes

    total = quantized_bytes(lm)
    for layer in lm.modules():
        if getattr(layer, "decoding", None) is not None:
            int8 = layer.packed if hasattr(layer, "packed") else layer.weight
            total -= int8.numel() * int8.element_size()
    return total


def child(folder: str, route: str, n: int, tokens: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    import blip2
    from blip2.routes import cpu_routes

    m = blip2.load(folder, device="cpu", dtype=route)
    gen = dict(max_new_tokens=tokens, min_new_tokens=tokens, batch_size=n)
    m.generate(images(2, seed=1), [PROMPT] * 2, **gen)  # warm-up
    phase = phases(m, n, tokens)
    t = time.perf_counter()
    m.generate(images(n, seed=2), [PROMPT] * n, **gen)
    plain_s = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        m.generate(images(n, seed=3), [PROMPT] * n, **gen)
        profiled_s = time.perf_counter() - t
    rows = prof.key_averages(group_by_input_shape=True)
    total = sum(r.self_cpu_time_total for r in rows) or 1.0

    def row(r) -> dict:
        return {
            "op": r.key,
            "shapes": str(r.input_shapes)[:200],
            "calls": r.count,
            "self_ms": round(r.self_cpu_time_total / 1e3, 1),
            "share": round(r.self_cpu_time_total / total, 4),
        }

    heaviest = sorted(rows, key=lambda r: -r.self_cpu_time_total)[:top]
    copies = sorted((r for r in rows if r.key == "aten::copy_"), key=lambda r: -r.self_cpu_time_total / r.count)
    return {
        "route": route,
        "resolved_dtype": str(m.dtype).replace("torch.", ""),
        "kernels": cpu_routes().as_dict()["kernels"],
        "phases": phase,
        "batch_s": round(plain_s, 2),
        "batch_profiled_s": round(profiled_s, 2),
        "top_ops": [row(r) for r in heaviest],
        "largest_copies_per_call": [row(r) for r in copies[:5]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", default=None, help="a full-size checkpoint folder [made in the temp folder]")
    ap.add_argument("--routes", default="auto,int8", help="dtype routes, comma-separated")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)  # a child process profiles one route
    args = ap.parse_args()
    if args.side:
        print(json.dumps(child(args.folder, args.side, args.images, args.tokens, args.top)), flush=True)
        return
    from blip2.machine import cpu_flags, cpu_name

    args.folder = str(make_full_checkpoint(args.folder or Path(tempfile.gettempdir()) / "blip2-bench" / "opt-2.7b"))
    results = []
    for route in filter(None, args.routes.split(",")):
        cmd = [sys.executable, __file__, "--side", route, "--folder", args.folder]
        cmd += ["--images", str(args.images), "--tokens", str(args.tokens), "--top", str(args.top)]
        print(f"{route} ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        results.append(json.loads(lines[-1]) if lines else {"route": route, "error": done.stderr[-2000:]})
    path = write_result(
        "profile_routes",
        {
            "command": " ".join(["python bench/profile_routes.py", *sys.argv[1:]]),
            "cpu": cpu_name(),
            "flags": cpu_flags(),
            "checkpoint": "blip2-opt-2.7b architecture, random bf16 weights",
            "images": args.images,
            "new_tokens": args.tokens,
            "routes": results,
        },
    )
    print(path)


if __name__ == "__main__":
    main()
