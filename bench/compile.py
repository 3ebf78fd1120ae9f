"""What `compile=True` buys: decoding with a static KV cache and a compiled step, against eager decoding.

    python bench/compile.py                          # tiny random OPT (tests/fixtures.py), fp32
    python bench/compile.py --full --dtype int8      # the blip2-opt-2.7b shape (bench/common.py)

Both models are ours, loaded from the same folder, one with `compile=True`. Each decodes exactly `--tokens` new
tokens greedily from the same image prefix (the image side is not what compile changes, so it is computed once
and shared) for two prompts of different lengths; the sides alternate run by run. Reported: the first call of
each prompt (compilation: the first length, then a recompile with dynamic shapes), the median of the later
calls, the time per new token, and whether the tokens are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import make_full_checkpoint, write_result
from PIL import Image

PROMPTS = ["", "Question: what is in the picture? Answer:"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="blip2-opt-2.7b-shaped random weights")
    ap.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "blip2-bench" / "opt-2.7b"))
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"])
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import blip2

    with tempfile.TemporaryDirectory() as tmp:
        if args.full:
            folder = make_full_checkpoint(args.folder)
        else:
            from fixtures import make_opt_checkpoint  # common.py put tests/ on sys.path

            folder = make_opt_checkpoint(Path(tmp) / "tiny")
        sides = {
            n: blip2.load(folder, device="cpu", dtype=args.dtype, compile=n == "compiled")
            for n in ("eager", "compiled")
        }
        measure(sides, args)


def measure(sides: dict, args: argparse.Namespace) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    with torch.no_grad():
        prefix = sides["eager"].image_prefix([image])
    gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens)

    def run(m, prompt: str) -> tuple[float, list[int]]:
        ids, mask = m.tokenize([prompt])
        t0 = time.perf_counter()
        tokens, _ = m.model.generate(prefix, ids, mask, **gen)
        return time.perf_counter() - t0, tokens[0].tolist()

    result: dict = {
        "command": " ".join(["python bench/compile.py", *sys.argv[1:]]),
        "model": "full opt-2.7b shape" if args.full else "tiny random opt",
        "dtype": args.dtype,
        "new_tokens": args.tokens,
        "load_average_before": os.getloadavg()[0],
    }
    for prompt in PROMPTS:
        row: dict = {}
        for name, m in sides.items():
            row[f"{name}_first_s"], row[f"{name}_tokens"] = run(m, prompt)
        runs: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.repeat):
            for name, m in sides.items():
                t, tokens = run(m, prompt)
                runs[name].append(t)
                row["same_tokens"] = tokens == row["eager_tokens"] and row.get("same_tokens", True)
        for name in sides:
            row[f"{name}_s"] = sorted(runs[name])[len(runs[name]) // 2]
            row[f"{name}_runs_s"] = runs[name]
            row[f"{name}_ms_per_token"] = 1e3 * row[f"{name}_s"] / args.tokens
        row["same_tokens"] = row["same_tokens"] and row["compiled_tokens"] == row["eager_tokens"]
        row["speedup"] = row["eager_s"] / row["compiled_s"]
        for name in sides:
            del row[f"{name}_tokens"]
        result[f"prompt {prompt!r}"] = row
        print(prompt, {k: v for k, v in row.items() if not k.endswith("runs_s")}, flush=True)
    result["load_average_after"] = os.getloadavg()[0]
    name = "compile_" + (f"full_{args.dtype}" if args.full else "tiny")
    print(json.dumps(result, indent=1))
    print(write_result(name, result))


if __name__ == "__main__":
    main()
