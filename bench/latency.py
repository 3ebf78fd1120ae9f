"""Latency of one caption and of a follow-up chat turn: ours vs transformers, same weights, same run.

    python bench/latency.py [--dtype bf16] [--tokens 20] [--repeat 3]

Full-size blip2-opt-2.7b architecture with random weights (see common.py). Both sides generate exactly
`--tokens` new tokens greedily (min_new_tokens = max_new_tokens, so an early EOS cannot favour either side).
The reference's follow-up turn re-runs the image and the whole prompt, as its documentation shows; ours reuses
the image features and the key/value cache of the conversation so far.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import make_full_checkpoint, timed, write_result
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "blip2-bench" / "opt-2.7b"))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]

    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    import blip2

    folder = make_full_checkpoint(args.folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens)

    ours = blip2.load(folder, device="cpu", dtype=dtype)
    ref = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    proc = Blip2Processor.from_pretrained(folder)

    def ref_generate(prompt: str):
        inputs = proc(images=image, text=prompt or None, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            out = ref.generate(**inputs, **gen)
        return proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    def ours_caption():
        ours._cache.clear()  # a new image each time: the image side is part of a caption's cost
        return ours.caption(image, **gen)

    pixels = ours.pixel_values([image])
    with torch.no_grad():
        vision_ref = timed(lambda: ref.vision_model(pixels), args.repeat)[0]
        vision_ours = timed(lambda: ours.model.vision_model(pixels), args.repeat)[0]

    ref_generate("")
    ours_caption()  # warm-up
    cap_ref, cap_ref_runs, text_ref = timed(lambda: ref_generate(""), args.repeat)
    cap_ours, cap_ours_runs, text_ours = timed(ours_caption, args.repeat)

    q1, q2 = "what is in the picture?", "what colour is it?"
    chat = ours.chat(image)
    first = chat.ask(q1, **gen)
    history = list(chat.history)

    def ours_turn():
        chat.history = list(history)  # back to the state after turn 1; the KV cache keeps the shared prefix
        return chat.ask(q2, **gen)

    prompt2 = f"Question: {q1} Answer: {first}. Question: {q2} Answer:"
    ours_turn()
    turn_ours, turn_ours_runs, answer_ours = timed(ours_turn, args.repeat)
    turn_ref, turn_ref_runs, answer_ref = timed(lambda: ref_generate(prompt2), args.repeat)

    result = {
        "command": f"python bench/latency.py --dtype {args.dtype} --tokens {args.tokens} --repeat {args.repeat}",
        "model": "blip2-opt-2.7b architecture, random weights",
        "dtype": args.dtype,
        "new_tokens": args.tokens,
        "vision_encoder_s": {"ours": vision_ours, "transformers": vision_ref},
        "caption_s": {
            "ours": cap_ours,
            "transformers": cap_ref,
            "ours_runs": cap_ours_runs,
            "transformers_runs": cap_ref_runs,
            "speedup": cap_ref / cap_ours,
            "same_text": text_ours == text_ref,
        },
        "chat_followup_s": {
            "ours": turn_ours,
            "transformers": turn_ref,
            "ours_runs": turn_ours_runs,
            "transformers_runs": turn_ref_runs,
            "speedup": turn_ref / turn_ours,
            "same_text": answer_ours == answer_ref,
        },
    }
    print(write_result("latency", result))
    for k in ("vision_encoder_s", "caption_s", "chat_followup_s"):
        print(k, {a: round(b, 3) if isinstance(b, float) else b for a, b in result[k].items() if "runs" not in a})


if __name__ == "__main__":
    main()
