"""Where one answer's time goes, alone and in a batch: vision encoder, prompt prefill, decoding.

    python bench/stages.py [--dtype int8] [--batch 8] [--tokens 16] [--repeat 2]

On the full-size random-weight blip2-opt-2.7b (bench/common.py), in one process, with a VQA prompt: for a batch of
1 and of `--batch` distinct images, the seconds of `image_prefix` (vision encoder, Q-Former, projection), of a
generation of one token (the prompt's prefill), and of `--tokens` tokens; per answer, and the best a server that
batches `--batch` requests could gain over one that serves them one by one ("batching_gain": one-by-one time
per answer over batched time per answer, every stage included). It is what bounds `bench/serve_load.py`, which
adds HTTP and waiting on top. Results in bench/results/stages_<dtype>.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import make_full_checkpoint, timed, write_result
from PIL import Image

import blip2
from blip2.pipeline import GenerationOptions

PROMPT = "Question: what color is the car? Answer:"


def measure(model: blip2.Blip2, images: list, tokens: int) -> dict[str, float]:
    model._cache.clear()  # every image is new to the encoder, as in a server
    prompts = [PROMPT] * len(images)
    vision, _, prefix = timed(lambda: model.image_prefix(images), repeat=1)
    one = GenerationOptions(max_new_tokens=1, min_new_tokens=1)
    prefill, _, _ = timed(lambda: model._generate(prefix, prompts, one), repeat=1)
    full = GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens)
    generate, _, _ = timed(lambda: model._generate(prefix, prompts, full), repeat=1)
    n = len(images)
    return {
        "vision_s": round(vision / n, 3),
        "prefill_s": round(prefill / n, 3),
        "decoding_s": round((generate - prefill) / n, 3),
        "answer_s": round((vision + generate) / n, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="int8")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2, help="rounds of (batch 1, batch N); the last round is kept")
    args = ap.parse_args()

    folder = make_full_checkpoint(Path(tempfile.gettempdir()) / "blip2-bench" / "opt-2.7b")
    model = blip2.load(folder, device="cpu", dtype=args.dtype)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(args.batch)]
    measure(model, images[:1], 2)  # warm-up: first-call allocations
    rounds = []
    for _ in range(args.repeat):
        alone = measure(model, images[:1], args.tokens)
        rounds.append({"alone": alone, "batched": measure(model, images, args.tokens)})
        print(rounds[-1], flush=True)
    last = rounds[-1]
    report = {
        "command": f"python bench/stages.py --dtype {args.dtype} --batch {args.batch} --tokens {args.tokens}",
        "model": "full-size random blip2-opt-2.7b",
        "dtype": args.dtype,
        "batch": args.batch,
        "tokens": args.tokens,
        "prompt": PROMPT,
        "seconds_per_answer": last,
        "batching_gain": round(last["alone"]["answer_s"] / last["batched"]["answer_s"], 2),
        "rounds": rounds,
    }
    print(write_result(f"stages_{args.dtype}", report))


if __name__ == "__main__":
    main()
