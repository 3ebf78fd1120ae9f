"""blip2 beside the engines a user would otherwise pick, on the same full-size checkpoint, in one run.

    python bench/peers.py [--images 8] [--more-images 32] [--tokens 20] [--ours auto,bf16,int8] [--transformers bf16]
                          [--vllm bfloat16] [--tiny]

The workload is vLLM's CPU anchor (`../shared/tools/vllm-cpu/anchor.py`, run with the vLLM venv that `env.sh` makes):
`--images` new 300x400 random images in one call, prompt "Question: what is it? Answer:", exactly `--tokens` new
tokens, greedy, after a warm-up call on 2 other images; then one more new image alone; then `--more-images` new
images in one call (vLLM: a second anchor run). Then, for ours and transformers, a chat follow-up turn: a second
question about the image of a first one (`FOLLOWUP`), `--tokens` new tokens; ours keeps the conversation's cache
(pipeline.Chat), transformers re-runs the image and the whole conversation, as its documentation shows.
Every engine runs in its own process, one after the other (two full-size models do not fit beside each other in
24 GB), on the blip2-opt-2.7b architecture with random weights (`common.make_full_checkpoint`, bf16; `--tiny`: the
tests' tiny OPT checkpoint, a check that the script runs). Reported per engine: images/s for each batch, seconds
for the single image and for the follow-up turn, peak resident memory (`peak_rss_gib_<images>`: loading, warm-up,
the batch and the single image; for ours, `--more-images` other images at the default batch size then, with their
images/s and the peak so far; `peak_rss_gib`: after the larger batch and the follow-up too; vLLM: its largest
process; `base_rss_gib`: the interpreter with torch, transformers (and for ours blip2) imported, before loading),
and for ours the bytes of the weights as stored for the route and the peaks over them; with the machine's CPU, flags
and measured memory bandwidth and GEMM rates (`blip2.machine`). An engine that cannot run here (vLLM's CPU build on
a CPU it does not support, say) is reported with its error, not left out.
Result: bench/results/peers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import HERE, make_full_checkpoint, write_result

PROMPT = "Question: what is it? Answer:"
FOLLOWUP = "what colour is it?"
VLLM_TOOL = HERE.parent.parent / "shared" / "tools" / "vllm-cpu"  # env.sh (its venv) and anchor.py; --vllm-tool


def images(n: int, seed: int) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)) for _ in range(n)]


def rss_gib() -> float:
    """This process's resident memory now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gib(who: int = resource.RUSAGE_SELF) -> float:
    """The largest resident memory so far of this process (RUSAGE_SELF) or of its largest finished descendant."""
    return resource.getrusage(who).ru_maxrss / 2**20


def measure(run, followup, n: int, more: int, run_default=None) -> dict:
    """Times of the anchor workload through `run(images)` (seconds of one call, all images in one batch) and of
    `followup(image)`; the peak resident memory before the `more` images (loading, warm-up, `n` images, one
    image) and at the end. With `run_default` (ours): `more` other new images at the default batch size first,
    their images/s and the peak so far (`peak_rss_gib_<more>_default_batch`)."""
    imgs = images(n + 3 + 2 * more + 1, seed=0)
    run(imgs[n : n + 2])  # warm-up, on images not timed below
    seconds = run(imgs[:n])
    out = {"seconds": seconds, "images_per_s": n / seconds, "single_s": run(imgs[n + 2 : n + 3])}
    out[f"peak_rss_gib_{n}"] = peak_rss_gib()
    if more and run_default is not None:
        out[f"images_per_s_{more}_default_batch"] = more / run_default(imgs[n + 3 + more : n + 3 + 2 * more])
        out[f"peak_rss_gib_{more}_default_batch"] = peak_rss_gib()
    if more:
        out[f"images_per_s_{more}"] = more / run(imgs[n + 3 : n + 3 + more])
    out["followup_s"] = followup(imgs[-1])
    return out


def side_ours(folder: str, dtype: str, n: int, tokens: int, more: int) -> dict:
    import transformers  # noqa: F401  (imported before the baseline, as transformers' side does)

    import blip2
    from blip2.defaults import BATCH_SIZE
    from blip2.quant import quantized_bytes

    base = rss_gib()
    t0 = time.perf_counter()
    m = blip2.load(folder, device="cpu", dtype=dtype)
    load_s = time.perf_counter() - t0
    gen = dict(max_new_tokens=tokens, min_new_tokens=tokens)

    def run(batch: list, batch_size: int | None = None) -> float:
        t = time.perf_counter()
        out = m.generate(batch, [PROMPT] * len(batch), batch_size=batch_size or len(batch), **gen)
        assert all(len(g.tokens) == tokens for g in out)
        return time.perf_counter() - t

    def followup(image) -> float:
        chat = m.chat(image)
        chat.ask(PROMPT.removeprefix("Question: ").removesuffix(" Answer:"), **gen)
        t = time.perf_counter()
        chat.ask(FOLLOWUP, **gen)
        return time.perf_counter() - t

    return {
        "route": dtype,
        "resolved_dtype": str(m.dtype).replace("torch.", ""),
        **measure(run, followup, n, more, run_default=lambda batch: run(batch, BATCH_SIZE)),
        "default_batch_size": BATCH_SIZE,
        "load_s": load_s,
        "weights_gib": quantized_bytes(m.model) / 2**30,
        "base_rss_gib": base,
    }


def side_transformers(folder: str, dtype: str, n: int, tokens: int, more: int) -> dict:
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    base = rss_gib()
    t0 = time.perf_counter()
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=dt).eval()
    proc = Blip2Processor.from_pretrained(folder)
    load_s = time.perf_counter() - t0

    def generate(batch: list, prompt: str) -> list:
        inputs = proc(images=batch, text=[prompt] * len(batch), return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(dt)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens)
        assert out.shape[1] - inputs["input_ids"].shape[1] == tokens
        return out[:, inputs["input_ids"].shape[1] :]

    def run(batch: list) -> float:
        t = time.perf_counter()
        generate(batch, PROMPT)
        return time.perf_counter() - t

    def followup(image) -> float:  # the whole conversation again, with the first answer in the prompt
        first = proc.tokenizer.decode(generate([image], PROMPT)[0], skip_special_tokens=True).strip()
        t = time.perf_counter()
        generate([image], f"{PROMPT} {first}. Question: {FOLLOWUP} Answer:")
        return time.perf_counter() - t

    return {"route": dtype, **measure(run, followup, n, more), "load_s": load_s, "base_rss_gib": base}


def side_vllm(folder: str, dtype: str, n: int, tokens: int, more: int, tool: Path = VLLM_TOOL) -> dict:
    """vLLM's anchor in vLLM's own venv (it pins its own torch and transformers); `more` images in a second run."""

    def anchor(count: int) -> dict:
        cmd = f'source "{tool}/env.sh" && "$VLLM_PY" "{tool}/anchor.py" "{folder}" {count} --dtype {dtype}'
        done = subprocess.run(["bash", "-c", f"{cmd} --tokens {tokens}"], capture_output=True, text=True, timeout=3600)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 or not lines:
            errors = [ln for ln in done.stderr.splitlines() if "Error" in ln or "error" in ln]
            return {"error": (errors[-1] if errors else done.stderr[-500:]).strip()[-500:]}
        return json.loads(lines[-1])

    out = anchor(n)
    out[f"peak_rss_gib_{n}"] = peak_rss_gib(resource.RUSAGE_CHILDREN)  # vLLM's largest process
    if more and "error" not in out:
        bigger = anchor(more)
        out[f"images_per_s_{more}"] = bigger.get("images_per_s", bigger.get("error"))
    out["route"] = dtype
    return out


def child(args: argparse.Namespace) -> None:
    if args.side == "vllm":
        result = side_vllm(args.folder, args.route, args.images, args.tokens, args.more_images, Path(args.vllm_tool))
    else:
        run = {"ours": side_ours, "transformers": side_transformers}[args.side]
        result = run(args.folder, args.route, args.images, args.tokens, args.more_images)
    result["peak_rss_gib"] = peak_rss_gib(resource.RUSAGE_CHILDREN if args.side == "vllm" else resource.RUSAGE_SELF)
    print(json.dumps(result), flush=True)


def spawn(side: str, route: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--route", route, "--folder", args.folder]
    cmd += ["--images", str(args.images), "--more-images", str(args.more_images), "--tokens", str(args.tokens)]
    cmd += ["--vllm-tool", args.vllm_tool]
    print(f"{side} {route} ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"route": route, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output"}
    result = json.loads(lines[-1])
    print(f"  {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", default=None, help="a full-size checkpoint folder [made in the temp folder]")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--more-images", type=int, default=32, help="a second, larger batch (0: none)")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny checkpoint: checks that the script runs")
    ap.add_argument("--ours", default="auto,bf16,int8", help="our routes (dtype names), comma-separated")
    ap.add_argument("--transformers", default="bf16", help="transformers' dtypes, comma-separated ('' for none)")
    ap.add_argument("--vllm", default="bfloat16", help="vLLM's dtypes, comma-separated ('' for none)")
    ap.add_argument("--vllm-tool", default=str(VLLM_TOOL), help="folder with vLLM's env.sh and anchor.py")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)  # a child process runs one engine
    ap.add_argument("--route", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        child(args)
        return
    import tempfile

    from blip2.machine import cpu_flags, cpu_name, gemm, memory

    if args.tiny:
        from fixtures import make_opt_checkpoint

        args.folder = str(make_opt_checkpoint(Path(tempfile.mkdtemp()) / "tiny_opt"))
    else:
        default = Path(tempfile.gettempdir()) / "blip2-bench" / "opt-2.7b"
        args.folder = str(make_full_checkpoint(args.folder or default))
    limits = {"memory": memory(), "gemm_gflops_257x1408x6144": gemm(257, 1408, 6144)}
    engines: dict[str, list[dict]] = {"vllm": [], "transformers": [], "ours": []}
    for side in ("vllm", "transformers", "ours"):
        for route in filter(None, getattr(args, side).split(",")):
            engines[side].append(spawn(side, route, args))
    vllm_ok = [r for r in engines["vllm"] if "error" not in r]
    ref_ok = [r for r in engines["transformers"] if "error" not in r]
    for r in engines["ours"]:
        if "error" in r:
            continue
        if vllm_ok:
            r["throughput_vs_vllm"] = r["images_per_s"] / vllm_ok[0]["images_per_s"]
            r["single_speedup_vs_vllm"] = vllm_ok[0]["single_s"] / r["single_s"]
        if ref_ok:
            r["throughput_vs_transformers"] = r["images_per_s"] / ref_ok[0]["images_per_s"]
            r["single_speedup_vs_transformers"] = ref_ok[0]["single_s"] / r["single_s"]
            r["followup_speedup_vs_transformers"] = ref_ok[0]["followup_s"] / r["followup_s"]
        w = r["weights_gib"]
        r["peak_over_weights"] = r["peak_rss_gib"] / w
        r[f"peak_over_weights_{args.images}"] = r[f"peak_rss_gib_{args.images}"] / w
        if f"peak_rss_gib_{args.more_images}_default_batch" in r:
            key = f"{args.more_images}_default_batch"
            r[f"peak_over_weights_{key}"] = r[f"peak_rss_gib_{key}"] / w
        # what the model costs the process: the peak above the interpreter with torch and transformers imported
        r[f"model_peak_over_weights_{args.images}"] = (r[f"peak_rss_gib_{args.images}"] - r["base_rss_gib"]) / w
        r["model_peak_over_weights"] = (r["peak_rss_gib"] - r["base_rss_gib"]) / w
    result = {
        "command": " ".join(["python bench/peers.py", *sys.argv[1:]]),
        "cpu": cpu_name(),
        "flags": cpu_flags(),
        "cores": os.cpu_count(),
        "limits": limits,
        "checkpoint": "tests' tiny OPT" if args.tiny else "blip2-opt-2.7b architecture, random bf16 weights",
        "workload": {
            "images": args.images,
            "more_images": args.more_images,
            "new_tokens": args.tokens,
            "prompt": PROMPT,
            "followup": FOLLOWUP,
            "image_size": [400, 300],
        },
        "engines": engines,
        "loadavg_after": os.getloadavg(),
    }
    print(json.dumps(result, indent=1))
    print(write_result("peers_tiny" if args.tiny else "peers", result), file=sys.stderr)


if __name__ == "__main__":
    main()
