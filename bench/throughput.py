"""Batch captioning throughput: our batch engine vs the best plain `transformers` recipe, same images, same run.

    python bench/throughput.py                       # tiny random checkpoint, 24 images, fp32
    python bench/throughput.py --full --dtype bf16   # blip2-opt-2.7b-shaped random weights (bench/common.py)
    python bench/throughput.py --full --dtype int8 --images 8 --repeat 1   # ours int8 vs transformers bf16
    python bench/throughput.py --model PATH --images 32 --workers 2
    python bench/throughput.py --full --device cuda --dtype fp16 --images 96   # on a GPU (bench/gpu.sh)
    python bench/throughput.py --engine vllm          # also: our batch engine on vLLM, and vLLM given all at once

Both sides caption the same JPEG files (640x480, decoded from disk: decoding is part of the job) with exactly
`--tokens` new tokens, greedy (min_new_tokens = max_new_tokens, so an early end cannot favour either side), in
batches of `--batch-size`, in the same dtype (or ours `--dtype int8` against transformers `--ref-dtype`, bf16 by
default: transformers has no CPU int8 path), with the models already loaded and warmed up:

(a) ours: `blip2.batch.caption_images` — decoding and preprocessing in worker processes, overlapped with the model;
(b) transformers: `Blip2ForConditionalGeneration.from_pretrained(folder)` + `Blip2Processor`, PIL open + convert,
    processor on the batch, `generate` under `torch.inference_mode`, decode the new tokens.

The captions of both sides are compared, then their token ids (the stand-in tokenizer of `--full` decodes many ids
to nothing), and ours batched against ours one image at a time; the JSON result goes to
bench/results/throughput.json. Each side runs
`--repeat` times, interleaved; the best run is the headline (other load on a shared machine only ever adds time),
the median and every run are kept too.

With `--engine vllm` two more sides run on vLLM (docs/engines.md), same images and options: (c) `ours+vllm`, our
batch engine (`caption_images`: workers, ledger-free run) generating with the vLLM engine, and (d) `vllm_direct`,
every image handed to vLLM at once (`VllmBlip2.generate` on the paths: vLLM's own continuous batching, nothing of
the batch product around it); `ours_vllm_over_direct` is what the product around the engine costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import REF_DTYPES, equal_prefix, machine, reference_dtype, write_result
from PIL import Image


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` distinct 640x480 JPEGs: smooth gradients plus noise, so they compress like photos, not like noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(n):
        base = np.stack([xx * (i + 1) % 256, yy * (i + 2) % 256, (xx + yy + 9 * i) % 256], axis=-1)
        arr = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{i:04d}.jpg"
        Image.fromarray(arr, "RGB").save(path, quality=90)
        paths.append(path)
    return paths


def run_ours(m, paths: list[Path], batch_size: int, workers: int, gen: dict) -> tuple[float, list[str]]:
    from blip2.batch import caption_images

    t0 = time.perf_counter()
    caps = [r.caption for r in caption_images(paths, model=m, batch_size=batch_size, workers=workers, **gen)]
    return time.perf_counter() - t0, caps


def run_transformers(
    model, proc, paths: list[Path], batch_size: int, dtype: torch.dtype, gen: dict
) -> tuple[float, list[str], list[list[int]]]:
    device = model.device
    t0 = time.perf_counter()
    caps: list[str] = []
    tokens: list[list[int]] = []
    for start in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[start : start + batch_size]]
        inputs = proc(images=images, text=[""] * len(images), return_tensors="pt").to(device)  # image tokens + BOS
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, **gen)
        new = out[:, inputs["input_ids"].shape[1] :]
        caps += [t.strip() for t in proc.tokenizer.batch_decode(new, skip_special_tokens=True)]
        tokens += new.tolist()
    return time.perf_counter() - t0, caps, tokens


def same_tokens(ours: list[list[int]], ref: list[list[int]], specials: set[int]) -> tuple[int, float]:
    """How many outputs have identical token ids, and the share of positions equal up to the first difference."""
    same, prefix, total = 0, 0, 0
    for a, b in zip(ours, ref):
        b = [t for t in b if t not in specials]
        same += a == b
        prefix += equal_prefix(a, b)
        total += max(len(a), len(b))
    return same, prefix / max(total, 1)


def checkpoint(args: argparse.Namespace, tmp: Path) -> Path:
    if args.model:
        return Path(args.model)
    if args.full:
        from common import make_full_checkpoint

        return make_full_checkpoint(args.folder)
    from fixtures import VLLM_OPT, make_opt_checkpoint  # common.py put tests/ on sys.path

    return make_opt_checkpoint(tmp / "tiny", text=VLLM_OPT if args.engine == "vllm" else None)


def run_vllm(folder: Path, paths: list[Path], warm: list[Path], workers: int, gen: dict, args) -> dict:
    """The two vLLM sides, interleaved `--repeat` times after a warm-up: seconds per run, and vLLM's token ids on
    `paths`. vLLM caches by image content (a seen image skips the vision encoder and the prompt's prefill), so each
    side of each run gets images of its own that vLLM has not seen, as many and as large as `paths`."""
    import blip2

    # on a GPU our engine's model stays resident: vLLM may take the rest (its default is 90% of the GPU)
    gpu = ["--gpu-memory-utilization", "0.75"] if args.device.startswith("cuda") else []
    vm = blip2.load(folder, engine="vllm", dtype=args.dtype, args=gpu)
    try:
        run_ours(vm, warm, args.batch_size, 0, gen)
        runs: dict[str, list[float]] = {"ours+vllm": [], "vllm_direct": []}
        for i in range(args.repeat):
            fresh = [make_images(paths[0].parent.parent / f"vllm-{i}-{side}", len(paths), seed=10 + 2 * i + side)
                     for side in (0, 1)]  # fmt: skip
            runs["ours+vllm"].append(run_ours(vm, fresh[0], args.batch_size, workers, gen)[0])
            t = time.perf_counter()
            vm.generate(fresh[1], **gen)
            runs["vllm_direct"].append(time.perf_counter() - t)
        return {"runs": runs, "tokens": [g.tokens for g in vm.generate(paths, **gen)]}
    finally:
        vm.close()


def main() -> None:
    from blip2.imagemap import default_workers

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder [a tiny random one]")
    ap.add_argument("--full", action="store_true", help="blip2-opt-2.7b-shaped random weights (slow on a CPU)")
    ap.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "blip2-bench" / "opt-2.7b"))
    ap.add_argument("--dtype", default="fp32", choices=[*sorted(REF_DTYPES), "int8"])
    ap.add_argument("--ref-dtype", default=None, choices=sorted(REF_DTYPES), help="transformers' [--dtype; bf16]")
    ap.add_argument("--device", default="cpu", help="both sides' torch device (cuda: a GPU run)")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None, help="our decoding workers [cores - 1]")
    ap.add_argument("--engine", choices=["ours", "vllm"], default="ours", help="vllm: also the two vLLM sides")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each side, interleaved; medians reported")
    ap.add_argument("--compile", action="store_true", help="ours with compile=True (static KV cache, compiled step)")
    args = ap.parse_args()
    ref_name = reference_dtype(args.dtype, args.ref_dtype)
    dtype = REF_DTYPES[ref_name]
    workers = default_workers() if args.workers is None else args.workers
    gen = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens}

    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    import blip2

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        folder = checkpoint(args, tmp)
        paths = make_images(tmp / "images", args.images)
        warm = make_images(tmp / "warm", 2, seed=1)
        ours = blip2.load(folder, device=args.device, dtype=args.dtype, compile=args.compile)
        ref = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(args.device).eval()
        proc = Blip2Processor.from_pretrained(folder)
        run_ours(ours, warm, args.batch_size, 0, gen)  # warm-up: first-call allocations, kernel selection
        run_transformers(ref, proc, warm, args.batch_size, dtype, gen)
        runs: dict[str, list[float]] = {"transformers": [], "ours": []}
        caps_ours0 = None
        if not args.full:  # the in-process variant: what the workers add (too slow to repeat at full size)
            runs["ours_workers_0"] = []
        load_before = os.getloadavg()[0]
        for _ in range(args.repeat):  # interleaved, so a busy moment of the machine hits all three alike
            t, caps_ref, tokens_ref = run_transformers(ref, proc, paths, args.batch_size, dtype, gen)
            runs["transformers"].append(t)
            t, caps_ours = run_ours(ours, paths, args.batch_size, workers, gen)
            runs["ours"].append(t)
            if "ours_workers_0" in runs:
                t, caps_ours0 = run_ours(ours, paths, args.batch_size, 0, gen)
                runs["ours_workers_0"].append(t)

        del ref  # a full-size transformers model, ours and vLLM do not fit in 24 GB together
        vllm_sides = run_vllm(folder, paths, warm, workers, gen, args) if args.engine == "vllm" else {}
        # token ids, not only texts: the stand-in tokenizer of --full decodes many ids to nothing
        tokens_ours = [g.tokens for g in ours.generate(paths, batch_size=args.batch_size, **gen)]
        one_by_one = [g.tokens for g in ours.generate(paths, batch_size=1, **gen)]  # batching must not change them
    same = sum(a == b for a, b in zip(caps_ours, caps_ref))
    same_ids, prefix_share = same_tokens(tokens_ours, tokens_ref, set(proc.tokenizer.all_special_ids))
    n = args.images
    median = {k: statistics.median(v) for k, v in runs.items()}
    best = {k: min(v) for k, v in runs.items()}  # least disturbed by other load on a shared machine, as timeit
    result = {
        "model": "full opt-2.7b shape" if args.full else (args.model or "tiny random opt"),
        "dtype": args.dtype,
        "device": args.device,
        "compiled": args.compile,
        "transformers_dtype": ref_name,
        "command": " ".join(["python bench/throughput.py", *sys.argv[1:]]),
        "images": n,
        "new_tokens": args.tokens,
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "ours_workers": workers,
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        **{
            k: {"best_s": best[k], "images_per_s": n / best[k], "median_s": median[k], "runs_s": v}
            for k, v in runs.items()
        },
        "speedup_best": best["transformers"] / best["ours"],
        "speedup_median": median["transformers"] / median["ours"],
        "identical_captions": same,
        "identical_all": same == n and caps_ours0 in (None, caps_ours),
        "ours_batched_equals_one_by_one": sum(a == b for a, b in zip(tokens_ours, one_by_one)),
        "identical_token_ids": same_ids,
        "equal_token_share_before_first_difference": prefix_share,
    }
    if vllm_sides:
        times = vllm_sides.pop("runs")
        for k, v in times.items():
            result[k] = {"best_s": min(v), "images_per_s": n / min(v), "median_s": statistics.median(v), "runs_s": v}
        result["ours_vllm_over_direct"] = min(times["vllm_direct"]) / min(times["ours+vllm"])
        result["vllm_identical_token_ids_to_ours"] = sum(a == b for a, b in zip(vllm_sides["tokens"], tokens_ours))
    name = "throughput" + (f"_full_{args.dtype}" if args.full else "") + ("_vllm" if vllm_sides else "")
    name += ("" if args.device == "cpu" else f"_{args.device.split(':')[0]}") + ("_compiled" if args.compile else "")
    out = write_result(name, result)
    print(json.dumps(result, indent=1), machine()["cpu_count"], "cores ->", out)


if __name__ == "__main__":
    main()
