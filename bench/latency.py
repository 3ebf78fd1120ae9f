"""Latency of one caption and of a follow-up chat turn: ours vs transformers, same weights, same machine.

    python bench/latency.py [--dtype fp32|bf16|fp16|int8] [--ref-dtype bf16] [--tokens 20] [--repeat 3]
                            [--in-process] [--compile] [--device cuda]

Full-size blip2-opt-2.7b architecture with random weights (see common.py). By default each side runs in its own
process, one after the other (two fp32 copies of a 3.8B model do not fit in 24 GB together); `--in-process` loads
both (bf16 fits) and interleaves their runs, which is fairer on a machine whose load changes. Both generate exactly
`--tokens` new tokens greedily (min_new_tokens = max_new_tokens, so an early EOS cannot favour either side).
The reference's follow-up turn re-runs the image and the whole prompt, as its documentation shows; ours reuses
the image features and the key/value cache of the conversation so far. Each task's first call (warm-up, with
`--compile` the compilation) is timed apart as `*_warmup_s`.
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
from common import REF_DTYPES as DTYPES
from common import make_full_checkpoint, reference_dtype, timed, write_result
from PIL import Image

Q1, Q2 = "what is in the picture?", "what colour is it?"


def build_side(
    side: str, folder: str, dtype_name: str, tokens: int, compile: bool = False, device: str = "cpu"
) -> dict:
    """Load one side and return its timed callables: vision, caption, followup (plus the first chat answer)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    gen = dict(max_new_tokens=tokens, min_new_tokens=tokens)
    if side == "ours":
        import blip2

        m = blip2.load(folder, device=device, dtype=dtype_name, compile=compile)
        pixels = m.pixel_values([image])
        vision = lambda: m.model.vision_model(pixels)  # noqa: E731

        def caption():
            m._cache.clear()  # a new image each time: the image side is part of a caption's cost
            return m.generate([image], **gen)[0].tokens

        chat = m.chat(image)
        first = chat.ask(Q1, **gen)
        after_first = list(chat.history)

        def followup():
            chat.history = list(after_first)  # back to the state after turn 1; the KV cache keeps the prefix
            chat.ask(Q2, **gen)
            return chat.last.tokens
    else:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        dtype = DTYPES[dtype_name]
        ref = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
        proc = Blip2Processor.from_pretrained(folder)

        def generate(prompt: str | None):
            inputs = proc(images=image, text=prompt, return_tensors="pt").to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            out = ref.generate(**inputs, **gen)
            return out[0, -tokens:].tolist()  # exactly `tokens` new tokens

        pixels = proc(images=image, return_tensors="pt")["pixel_values"].to(device, dtype)
        vision = lambda: ref.vision_model(pixels)  # noqa: E731
        caption = lambda: generate(None)  # noqa: E731
        first = proc.tokenizer.decode(generate(f"Question: {Q1} Answer:"), skip_special_tokens=True).strip()
        followup = lambda: generate(f"Question: {Q1} Answer: {first}. Question: {Q2} Answer:")  # noqa: E731

    return {"vision": vision, "caption": caption, "followup": followup, "first_answer": first}


def measure(sides: dict[str, dict], repeat: int) -> dict[str, dict]:
    """Time every side's callables, interleaving the sides run by run so that load changes hit both alike."""
    out = {name: {"first_answer": s["first_answer"]} for name, s in sides.items()}
    with torch.no_grad():
        for task in ("vision", "caption", "followup"):
            for name, s in sides.items():
                out[name][f"{task}_warmup_s"] = timed(s[task], 1)[0]  # first call: allocation, compilation
                out[name][f"{task}_runs"] = []
            for _ in range(repeat):
                for name, s in sides.items():
                    t, _, result = timed(s[task], 1)
                    out[name][f"{task}_runs"].append(t)
                    out[name][f"{task}_tokens"] = result if isinstance(result, list) else None
            for name in sides:
                runs = sorted(out[name][f"{task}_runs"])
                out[name][f"{task}_s"] = runs[len(runs) // 2]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "blip2-bench" / "opt-2.7b"))
    ap.add_argument("--dtype", default="fp32", choices=[*sorted(DTYPES), "int8"], help="ours")
    ap.add_argument("--ref-dtype", choices=sorted(DTYPES), help="transformers' [--dtype; bf16 for int8]")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--in-process", action="store_true", help="load both sides in one process, interleave runs")
    ap.add_argument("--compile", action="store_true", help="ours with compile=True (static KV cache, compiled step)")
    ap.add_argument("--device", default="cpu", help="both sides' torch device (cuda: a GPU run)")
    ap.add_argument("--side", choices=["ours", "transformers"], help=argparse.SUPPRESS)  # child process mode
    args = ap.parse_args()
    dtypes = {"ours": args.dtype, "transformers": reference_dtype(args.dtype, args.ref_dtype)}
    if args.side:  # child process: one side only
        side = build_side(args.side, args.folder, dtypes[args.side], args.tokens, args.compile, args.device)
        print(json.dumps(measure({args.side: side}, args.repeat)[args.side]))
        return

    make_full_checkpoint(args.folder)
    if args.in_process:  # both models in one process, runs interleaved (bf16: 2 x 7.7 GB fits in memory)
        both = {
            n: build_side(n, args.folder, dtypes[n], args.tokens, args.compile, args.device)
            for n in ("transformers", "ours")
        }
        sides = measure(both, args.repeat)
    else:
        sides = {}
        for side in ("transformers", "ours"):
            cmd = [
                sys.executable,
                __file__,
                "--side",
                side,
                "--folder",
                args.folder,
                "--dtype",
                args.dtype,
                "--ref-dtype",
                dtypes["transformers"],
                "--tokens",
                str(args.tokens),
                "--repeat",
                str(args.repeat),
                "--device",
                args.device,
                *(["--compile"] if args.compile else []),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if out.returncode != 0:
                sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
            sides[side] = json.loads(out.stdout.strip().splitlines()[-1])
    for side, r in sides.items():
        print(side, {k: round(v, 2) for k, v in r.items() if k.endswith("_s")})
    ours, ref = sides["ours"], sides["transformers"]
    result = {
        "command": " ".join(["python bench/latency.py", *sys.argv[1:]]),
        "mode": "one process, interleaved" if args.in_process else "one process per side, sequential",
        "model": "blip2-opt-2.7b architecture, random weights",
        "dtype": args.dtype,
        "device": args.device,
        "compile": args.compile,
        "transformers_dtype": dtypes["transformers"],
        "new_tokens": args.tokens,
        "load_average": os.getloadavg(),
        "ours": ours,
        "transformers": ref,
        "caption_speedup": ref["caption_s"] / ours["caption_s"],
        "followup_speedup": ref["followup_s"] / ours["followup_s"],
        "same_caption_tokens": ours["caption_tokens"] == ref["caption_tokens"],
        "same_followup_tokens": ours["followup_tokens"] == ref["followup_tokens"],
    }
    name = "latency_" + ("" if args.device == "cpu" else f"{args.device.split(':')[0]}_") + args.dtype
    name += f"_vs_{dtypes['transformers']}" if args.ref_dtype else ""
    name += "_compiled" if args.compile else ""
    print(write_result(name + ("_inprocess" if args.in_process else ""), result))
    print({k: v for k, v in result.items() if "speedup" in k or k.startswith("same")})
    # The stand-in tokenizer knows 401 of the 50304 ids, so texts are mostly empty: compare token ids instead.


if __name__ == "__main__":
    main()
