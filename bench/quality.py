"""What `--dtype int8` costs in quality: int8 against fp32 on the same weights, same images, same prompts.

    python bench/quality.py            # tiny random OPT and T5 (tests/fixtures.py) and the full-size opt-2.7b shape
    python bench/quality.py --tiny     # the tiny ones only (seconds)

    python bench/quality.py --routes int8,int8-activations   # full size: these routes (and fp32) only
    # src/blip2/route_quality.py's table (a later file's routes replace an earlier one's):
    python bench/quality.py --table-from bench/results/quality_bf16_int8.json \
        bench/results/quality_int8_int8_activations.json

Each route is named as src/blip2/route_quality.py names it and pinned by the environment of its process, so that
it runs the same arithmetic on every CPU: `bf16` on PyTorch's bf16 kernels (`BLIP2_CPU_BF16=1`, what the reference
runs: the yardstick `dtype="auto"` is held to), `bf16-fp32-sums` with products summed in fp32 on widened weights
(`BLIP2_CPU_BF16=0`, quant.bf16_sums_in_fp32), `int8` with its vision encoder in fp32 (`BLIP2_ROUTES=flags`),
`int8-activations` with the activations of every int8 layer, the vision encoder's included, quantized per
position (`BLIP2_INT8_ACTIVATIONS=1`, quant._int8_activations_mm; on a CPU without VNNI or AMX it is slow), `int4`
with that route's prepacked int8 layers for prompts and int4 weights for decoding steps on PyTorch's int4 kernel
(int4.Int4Weight), `int4-bf16` the same on ours (int4.Int4Bf16Weight, AVX512-BF16 CPUs: fp32 sums and output). On
random weights mere bf16 rounding already moves logits a lot (on the tiny random T5, rounding only its token
embeddings to bf16 moves the logits by 11% of their range: such networks amplify any perturbation). At full size
the bf16 routes run only with `--full-bf16` (the native kernels take minutes on a CPU that emulates bf16).
Files written before these names call `bf16-fp32-sums` "bf16" and `bf16` "bf16-native"; `--table-from` reads both.

Figures per model: the largest logit deviation (absolute, and relative to the largest fp32 logit) over every
position of a batch of image+prompt inputs; how often the fp32 model's next-token choice is also int8's (top-1)
or among int8's top 3, teacher-forced, at every position; the deviation and top-1 agreement over decoding steps
(decoder-only LMs: a fixed continuation fed one token per call after the prompt, `decoding_*`); and, for greedy
generation of 20 new tokens, the share of captions that are token-identical and the share of tokens equal before
the first divergence. Each dtype runs
in its own process (the full-size fp32 model alone needs 15 GB). Random weights give flat, near-tied logits,
which is the hard case for agreement: real checkpoints have peaked distributions.
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
from common import equal_prefix, make_full_checkpoint, write_result

ROUTE_ENV = {  # pins each route's kernels on any CPU (blip2.routes)
    "fp32": {},
    "bf16": {"BLIP2_CPU_BF16": "1"},
    "bf16-fp32-sums": {"BLIP2_CPU_BF16": "0"},
    "int8": {"BLIP2_ROUTES": "flags", "BLIP2_CPU_BF16": "", "BLIP2_INT8_ACTIVATIONS": "0"},
    "int8-activations": {"BLIP2_ROUTES": "flags", "BLIP2_CPU_BF16": "", "BLIP2_INT8_ACTIVATIONS": "1"},
    "int4": {
        "BLIP2_ROUTES": "flags",
        "BLIP2_CPU_BF16": "",
        "BLIP2_INT8_ACTIVATIONS": "packed",
        "BLIP2_INT4_KERNEL": "torch",
    },
    "int4-bf16": {
        "BLIP2_ROUTES": "flags",
        "BLIP2_CPU_BF16": "",
        "BLIP2_INT8_ACTIVATIONS": "packed",
        "BLIP2_INT4_KERNEL": "bf16",
    },
}
OLD_NAMES = {"bf16": "bf16-fp32-sums", "bf16-native": "bf16"}  # in files with a "bf16-native" entry
PROMPTS = ["", "a photo of", "Question: what is in the picture? Answer:", "Question: what colour is it? Answer:"]


def images(n: int = 4) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    out = []
    for i in range(n):
        base = np.stack([xx * (i + 1) % 256, yy * (i + 2) % 256, (xx + yy + 40 * i) % 256], axis=-1)
        out.append(Image.fromarray(np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)))
    return out


def run_side(folder: str, dtype: str, out: str, tokens: int) -> None:
    """Child process: logits of the batch and greedy tokens, saved to `out`."""
    import blip2

    torch.manual_seed(0)
    m = blip2.load(folder, device="cpu", dtype=dtype.split("-")[0])  # a route's dtype: bf16-fp32-sums is bf16
    ims = images(len(PROMPTS))
    ids, mask = m.tokenize(PROMPTS)
    extra = {}
    if m.model.is_encoder_decoder:
        start = torch.full((len(PROMPTS), 1), m.model.language_model.config.decoder_start_token_id)
        extra["decoder_input_ids"] = torch.cat([start, ids], dim=1)
    with torch.no_grad():
        prefix = m.model.image_prefix(m.pixel_values(ims))
        logits = m.model(ids, mask, prefix=prefix, **extra).logits.float()
        steps = None if m.model.is_encoder_decoder else decoding_logits(m, prefix, ids, mask)
    gens = m.generate(ims, PROMPTS, max_new_tokens=tokens, min_new_tokens=tokens, batch_size=len(PROMPTS))
    valid = mask if not m.model.is_encoder_decoder else torch.ones_like(extra["decoder_input_ids"])
    if not m.model.is_encoder_decoder:  # the query positions are always valid
        valid = torch.cat([torch.ones(len(PROMPTS), logits.shape[1] - mask.shape[1], dtype=mask.dtype), mask], 1)
    torch.save({"logits": logits, "valid": valid.bool(), "tokens": [g.tokens for g in gens], "steps": steps}, out)


CONTINUATION = " a small brown dog sitting on a wooden bench next to a red bicycle in the park"


def decoding_logits(m, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, S, V) logits of a decoder-only LM fed a fixed continuation one position per call after its prompt, as
    decoding steps run (the int4 route multiplies only these by its int4 weights): the same tokens on every route,
    so each step's logits compare teacher-forced. The key/value cache is the one the route's `generate` uses."""
    from transformers import DynamicCache

    lm = m.model.language_model
    follow = m.tokenizer(CONTINUATION, add_special_tokens=False, return_tensors="pt").input_ids[0]
    embeds, full_mask = m.model.lm_inputs(prefix, ids, mask)
    cache = m.model.new_cache(embeds.shape[1], {"max_new_tokens": len(follow)})
    cache = DynamicCache() if cache is None else cache  # not `or`: an empty cache has no layers yet, len 0
    out = [lm(inputs_embeds=embeds, attention_mask=full_mask, cache=cache, use_cache=True).logits[:, -1]]
    for token in follow[:-1]:
        full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], 1)
        step = torch.full((len(ids), 1), int(token))
        out.append(lm(input_ids=step, attention_mask=full_mask, cache=cache, use_cache=True).logits[:, -1])
    return torch.stack(out, 1).float()


def compare(a: dict, b: dict) -> dict:
    """a: fp32, b: the narrower dtype."""
    la, lb = a["logits"][a["valid"]], b["logits"][a["valid"]]  # (positions, V)
    top3 = lb.topk(3, dim=-1).indices
    ref = la.argmax(-1)
    identical = [x == y for x, y in zip(a["tokens"], b["tokens"])]
    prefix = []
    for x, y in zip(a["tokens"], b["tokens"]):
        prefix.append(equal_prefix(x, y) / max(len(x), 1))
    steps = {}
    if a.get("steps") is not None and b.get("steps") is not None:  # decoding steps, teacher-forced
        sa, sb = a["steps"].flatten(0, 1), b["steps"].flatten(0, 1)
        steps = {
            "decoding_positions": int(sa.shape[0]),
            "decoding_max_relative_deviation": float((sa - sb).abs().max() / sa.abs().max()),
            "decoding_top1_agreement": float((sb.argmax(-1) == sa.argmax(-1)).float().mean()),
        }
    return {
        **steps,
        "positions": int(la.shape[0]),
        "max_abs_logit_deviation": float((la - lb).abs().max()),
        "max_abs_logit_fp32": float(la.abs().max()),
        "max_relative_deviation": float((la - lb).abs().max() / la.abs().max()),
        "top1_agreement": float((lb.argmax(-1) == ref).float().mean()),
        "fp32_top1_in_its_top3": float((top3 == ref[:, None]).any(-1).float().mean()),
        "greedy_identical_share": sum(identical) / len(identical),
        "greedy_tokens_before_divergence_share": float(np.mean(prefix)),
    }


def measure(folder: Path, tokens: int, tmp: Path, dtypes=("fp32", "bf16", "bf16-fp32-sums", "int8")) -> dict:
    sides = {}
    for dtype in dtypes:
        out = tmp / f"{folder.name}_{dtype}.pt"
        cmd = [sys.executable, __file__, "--side", dtype, "--folder", str(folder), "--out", str(out)]
        env = {**os.environ, **ROUTE_ENV[dtype]}
        r = subprocess.run([*cmd, "--tokens", str(tokens)], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.exit(f"{folder} {dtype} failed:\n{r.stderr[-3000:]}")
        sides[dtype] = torch.load(out)
    result = {dtype: compare(sides["fp32"], sides[dtype]) for dtype in dtypes[1:]}
    if "bf16-fp32-sums" in sides:  # how far summing in fp32 moves bf16 from the native kernels' results
        result["bf16-fp32-sums against bf16"] = compare(sides["bf16"], sides["bf16-fp32-sums"])
    return result


def table_from(paths: list[str]) -> dict[str, dict[str, float]]:
    """route_quality.QUALITY from full-size result files; a route in a later file replaces an earlier file's."""
    keys = ("max_relative_deviation", "top1_agreement", "greedy_identical_share")
    table = {"fp32": {"max_relative_deviation": 0.0, "top1_agreement": 1.0, "greedy_identical_share": 1.0}}
    for path in paths:
        full = json.loads(Path(path).read_text())["full_opt_2.7b"]
        if "bf16-native" in full:
            full = {OLD_NAMES.get(k, k): v for k, v in full.items()}
        table |= {r: {k: round(full[r][k], 4) for k in keys} for r in ROUTE_ENV if r in full}
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="only the tiny random checkpoints")
    ap.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "blip2-bench" / "opt-2.7b"))
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--full-bf16", action="store_true", help="also bf16 at full size (slow without native bf16)")
    ap.add_argument("--routes", help="full size: these routes against fp32, comma-separated (else all or int8)")
    ap.add_argument("--table-from", nargs="+", help="print route_quality.QUALITY from these full-size result files")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        run_side(args.folder, args.side, args.out, args.tokens)
        return
    if args.table_from:
        print(json.dumps(table_from(args.table_from), indent=1))
        return
    from fixtures import make_opt_checkpoint, make_t5_checkpoint

    result: dict = {"command": " ".join(["python bench/quality.py", *sys.argv[1:]]), "prompts": PROMPTS}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        routes = ("fp32", *args.routes.split(",")) if args.routes else None
        tiny = routes or ("fp32", "bf16", "bf16-fp32-sums", "int8")
        result["tiny_opt"] = measure(make_opt_checkpoint(tmp / "tiny_opt"), args.tokens, tmp, tiny)
        result["tiny_t5"] = measure(make_t5_checkpoint(tmp / "tiny_t5"), args.tokens, tmp, tiny)
        if not args.tiny:
            dtypes = routes or (("fp32", "bf16", "bf16-fp32-sums", "int8") if args.full_bf16 else ("fp32", "int8"))
            result["full_opt_2.7b"] = measure(make_full_checkpoint(args.folder), args.tokens, tmp, dtypes)
    print(json.dumps(result, indent=1))
    name = "quality_int8_tiny" if args.tiny else ("quality_bf16_int8" if args.full_bf16 else "quality_int8")
    if args.routes:
        name = "quality_" + args.routes.replace(",", "_").replace("-", "_")
    print(write_result(name, result))


if __name__ == "__main__":
    main()
