"""Peak memory while loading (and after a first caption): ours vs transformers, each in a fresh process.

    python bench/memory.py [--dtype bf16|fp32|int8]     (int8: ours int8 against transformers bf16)

The checkpoint is the full-size blip2-opt-2.7b architecture with random weights (common.py), stored in bf16
with the Q-Former in fp32 (7.7 GB). Peak is the process's maximum resident set size (`ru_maxrss`), which counts
memory-mapped weight pages once they are touched.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import make_full_checkpoint, reference_dtype, write_result

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from PIL import Image
side, folder, name = sys.argv[1], sys.argv[2], sys.argv[3]
dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(name)
image = Image.fromarray(np.zeros((224, 224, 3), dtype=np.uint8))
t0 = time.perf_counter()
if side == "ours":
    import blip2
    m = blip2.load(folder, device="cpu", dtype=name)
    load_s = time.perf_counter() - t0
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    m.caption(image, max_new_tokens=2)
else:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    m = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    p = Blip2Processor.from_pretrained(folder)
    inputs = p(images=image, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        m.generate(**inputs, max_new_tokens=2)
run_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"load_s": load_s, "load_peak_bytes": load_peak, "run_peak_bytes": run_peak}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "blip2-bench" / "opt-2.7b"))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "int8"])
    args = ap.parse_args()
    folder = make_full_checkpoint(args.folder)
    weights = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    dtypes = {"ours": args.dtype, "transformers": reference_dtype(args.dtype)}
    result = {
        "command": f"python bench/memory.py --dtype {args.dtype}",
        "dtype": args.dtype,
        "transformers_dtype": dtypes["transformers"],
        "weights_bytes": weights,
    }
    src = str(Path(__file__).resolve().parent.parent / "src")
    for side in ("ours", "transformers"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, side, str(folder), dtypes[side]],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": src},
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["load_peak_over_weights"] = r["load_peak_bytes"] / weights
        r["run_peak_over_weights"] = r["run_peak_bytes"] / weights
        result[side] = r
        print(side, {k: round(v, 3) for k, v in r.items() if "over" in k or k == "load_s"})
    print(write_result(f"memory_{args.dtype}", result))


if __name__ == "__main__":
    main()
