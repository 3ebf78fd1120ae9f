"""Latency of one caption and of a follow-up chat turn: ours vs transformers, same weights, same machine.

    python bench/latency.py [--dtype fp32|bf16] [--tokens 20] [--repeat 3]

Full-size blip2-opt-2.7b architecture with random weights (see common.py). Each side runs in its own process,
one after the other (two fp32 copies of a 3.8B model do not fit in 24 GB together). Both generate exactly
`--tokens` new tokens greedily (min_new_tokens = max_new_tokens, so an early EOS cannot favour either side).
The reference's follow-up turn re-runs the image and the whole prompt, as its documentation shows; ours reuses
the image features and the key/value cache of the conversation so far.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import make_full_checkpoint, timed, write_result
from PIL import Image

Q1, Q2 = "what is in the picture?", "what colour is it?"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def run_side(side: str, folder: str, dtype: torch.dtype, tokens: int, repeat: int) -> dict:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    gen = dict(max_new_tokens=tokens, min_new_tokens=tokens)
    if side == "ours":
        import blip2

        m = blip2.load(folder, device="cpu", dtype=dtype)
        pixels = m.pixel_values([image])
        vision = lambda: m.model.vision_model(pixels)  # noqa: E731

        def caption():
            m._cache.clear()  # a new image each time: the image side is part of a caption's cost
            return m.caption(image, **gen)

        chat = m.chat(image)
        first = chat.ask(Q1, **gen)
        after_first = list(chat.history)

        def followup():
            chat.history = list(after_first)  # back to the state after turn 1; the KV cache keeps the prefix
            return chat.ask(Q2, **gen)
    else:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        ref = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
        proc = Blip2Processor.from_pretrained(folder)

        def generate(prompt: str | None):
            inputs = proc(images=image, text=prompt, return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            out = ref.generate(**inputs, **gen)
            return proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

        pixels = proc(images=image, return_tensors="pt")["pixel_values"].to(dtype)
        vision = lambda: ref.vision_model(pixels)  # noqa: E731
        caption = lambda: generate(None)  # noqa: E731
        first = generate(f"Question: {Q1} Answer:")
        followup = lambda: generate(f"Question: {Q1} Answer: {first}. Question: {Q2} Answer:")  # noqa: E731

    with torch.no_grad():
        vision()
        v = timed(vision, repeat)
        caption()
        c = timed(caption, repeat)
        followup()
        f = timed(followup, repeat)
    return {
        "vision_s": v[0],
        "caption_s": c[0],
        "caption_runs": c[1],
        "caption_text": c[2],
        "followup_s": f[0],
        "followup_runs": f[1],
        "first_answer": first,
        "followup_text": f[2],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "blip2-bench" / "opt-2.7b"))
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--side", choices=["ours", "transformers"], help=argparse.SUPPRESS)  # child process mode
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.folder, DTYPES[args.dtype], args.tokens, args.repeat)))
        return

    make_full_checkpoint(args.folder)
    sides = {}
    for side in ("transformers", "ours"):
        cmd = [sys.executable, __file__, "--side", side, "--folder", args.folder, "--dtype", args.dtype,
               "--tokens", str(args.tokens), "--repeat", str(args.repeat)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if out.returncode != 0:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        sides[side] = json.loads(out.stdout.strip().splitlines()[-1])
        print(side, {k: v for k, v in sides[side].items() if k.endswith("_s")})
    ours, ref = sides["ours"], sides["transformers"]
    result = {
        "command": f"python bench/latency.py --dtype {args.dtype} --tokens {args.tokens} --repeat {args.repeat}",
        "model": "blip2-opt-2.7b architecture, random weights",
        "dtype": args.dtype,
        "new_tokens": args.tokens,
        "load_average": os.getloadavg(),
        "ours": ours,
        "transformers": ref,
        "caption_speedup": ref["caption_s"] / ours["caption_s"],
        "followup_speedup": ref["followup_s"] / ours["followup_s"],
        "same_caption": ours["caption_text"] == ref["caption_text"],
        "same_followup": ours["followup_text"] == ref["followup_text"],
    }
    print(write_result(f"latency_{args.dtype}", result))
    print({k: v for k, v in result.items() if "speedup" in k or k.startswith("same")})


if __name__ == "__main__":
    main()
