"""The LM head on the last position of a batch of prompts: a non-contiguous slice against contiguous rows.

    python bench/lm_head.py [--batch 8] [--length 45] [--hidden 2560] [--vocab 50272] [--repeat 5]

`generate` asks a causal LM for the last position's logits only, and transformers' OPT slices the prompt's hidden
states to `h[:, -1:]` (B, 1, D) before its head: a view with the prompt's stride, on which `F.linear` runs a batched
product over the head's weight expanded B times instead of one matrix product (language.head_takes_contiguous_rows,
quant._linear_rows). Two parts, fp32 and bf16, OPT-2.7B's head (2560 x 50272) by default:

* the product alone: `F.linear` on the slice, on its contiguous copy, through our head (nn.Linear with the pre-hook)
  and through quant.Int8Linear, each with the torch.profiler's view of which aten ops ran and the largest copy;
* transformers' `OPTForCausalLM` (one decoder layer of OPT-2.7B's width) running a prompt's prefill with
  `logits_to_keep=1`, as `generate` does: the head's time inside that call, with the weights requiring grad (as
  transformers loads them: `matmul` then folds the batch, to spare the backward pass), frozen (as blip2 loads
  them: the batched product), and frozen with the pre-hook.

Median of `--repeat` runs in milliseconds; bench/results/lm_head.json, with the CPU's model name and flags (lscpu).
Whether the batched product copies its expanded weight depends on the CPU's kernels: compare the flags.
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch
import torch.nn.functional as F
from common import write_result
from torch import nn
from torch.profiler import ProfilerActivity, profile

from blip2.language import head_takes_contiguous_rows
from blip2.quant import Int8Linear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm")


def lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    facts = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return {k: facts.get(k, "").strip() for k in ("Model name", "Flags")}


def round_robin(routes: dict, n: int) -> dict[str, dict]:
    """Each route once per round, `n` rounds after a warm-up round: a busy machine slows all routes alike. The
    minimum is the figure to compare (least disturbed); the median says how noisy the rounds were."""
    times: dict[str, list[float]] = {name: [] for name in routes}
    for r in range(n + 1):
        for name, f in routes.items():
            t = time.perf_counter()
            f()
            if r:
                times[name].append(time.perf_counter() - t)
    return {
        name: {"min_ms": round(min(ts) * 1e3, 2), "median_ms": round(sorted(ts)[len(ts) // 2] * 1e3, 2)}
        for name, ts in times.items()
    }


def ops(f) -> dict:
    """Which aten products ran, and the largest tensor an `aten::copy_` wrote (elements)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        f()
    names = [e.name for e in prof.events()]
    copies = [e.input_shapes[0] for e in prof.events() if e.name == "aten::copy_" and e.input_shapes]
    largest = max(copies, key=lambda s: torch.Size(s).numel(), default=[])
    return {
        "products": sorted({n for n in names if n in PRODUCTS}),
        "largest_copy_shape": list(largest),
    }


class _Head(nn.Module):
    """Just enough of an LM for `head_takes_contiguous_rows`."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head

    def get_output_embeddings(self) -> nn.Linear:
        return self.head


@torch.no_grad()
def product(args, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    plain = nn.Linear(args.hidden, args.vocab, bias=False).to(dtype).requires_grad_(False)
    hooked = nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(False)
    hooked.weight = plain.weight
    head_takes_contiguous_rows(_Head(hooked))
    h = torch.randn(args.batch, args.length, args.hidden, dtype=dtype)
    last = h[:, -1:]  # (B, 1, D), as transformers' `slice_logits_to_keep(h, 1)` leaves it
    routes = {
        "F.linear on the slice (before)": lambda: F.linear(last, plain.weight),
        "F.linear on a contiguous copy": lambda: F.linear(last.contiguous(), plain.weight),
        "our head, pre-hook (after)": lambda: hooked(last),
    }
    if dtype == torch.float32:  # dtype="int8" computes in fp32 on a CPU
        q = Int8Linear(nn.Linear(args.hidden, args.vocab, bias=False, device="meta"))
        q.set_weight(plain.weight)
        routes["int8 head (quant.Int8Linear) on the slice"] = lambda: q(last)
    want = F.linear(last.contiguous(), plain.weight).float()
    out = round_robin(routes, args.repeat)
    for name, f in routes.items():
        out[name].update(ops(f))
        if not name.startswith("int8"):
            out[name]["max_abs_diff_vs_contiguous"] = (f().float() - want).abs().max().item()
    return out


@torch.no_grad()
def opt_prefill(args, dtype: torch.dtype) -> dict:
    """transformers' OPT (one decoder layer) running a prefill with `logits_to_keep=1`, as `generate` calls it: the
    head's time is taken inside the real call (hooks), its products from a call on the very input OPT handed it."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(
        hidden_size=args.hidden,
        word_embed_proj_dim=args.hidden,
        ffn_dim=4 * args.hidden,
        num_hidden_layers=1,
        num_attention_heads=args.hidden // 80,
        vocab_size=args.vocab,
    )
    lm = OPTForCausalLM(cfg).to(dtype).eval()
    embeds = torch.randn(args.batch, args.length, args.hidden, dtype=dtype) * 0.02
    mask = torch.ones(args.batch, args.length, dtype=torch.long)
    head = lm.lm_head
    spent: dict[str, list[float]] = {}
    seen: dict = {}

    def started(module, inputs):
        seen["input"], seen["t0"] = inputs[0], time.perf_counter()

    def finished(module, inputs, output):
        spent.setdefault(seen["route"], []).append(time.perf_counter() - seen["t0"])

    head.register_forward_pre_hook(started)
    head.register_forward_hook(finished)
    head_takes_contiguous_rows(lm)  # registered after the timing hook: its copy is timed
    fix = next(k for k, h in head._forward_pre_hooks.items() if h is not started)
    fix_hook = head._forward_pre_hooks.pop(fix)

    def route(name: str, requires_grad: bool, fixed: bool):
        def run():
            seen["route"] = name
            lm.requires_grad_(requires_grad)
            head._forward_pre_hooks.pop(fix, None)
            if fixed:
                head._forward_pre_hooks[fix] = fix_hook
            return lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1, use_cache=False).logits

        return run

    routes = {
        "transformers' own model (weights require grad: matmul folds the batch)": route("own", True, False),
        "frozen weights, before": route("before", False, False),
        "frozen weights, after (head_takes_contiguous_rows)": route("after", False, True),
    }
    out = {}
    for (name, prefill), key in zip(round_robin(routes, args.repeat).items(), ("own", "before", "after")):
        heads = spent[key][1:]  # the warm-up round left out
        routes[name]()
        x = seen["input"]
        out[name] = {
            "prefill_min_ms": prefill["min_ms"],
            "head_min_ms": round(min(heads) * 1e3, 2),
            "head_median_ms": round(sorted(heads)[len(heads) // 2] * 1e3, 2),
            "input_from_opt_is_contiguous": x.is_contiguous(),
            **ops(lambda x=x: head(x)),
        }
    before = routes["frozen weights, before"]().float()
    after = routes["frozen weights, after (head_takes_contiguous_rows)"]().float()
    out["max_abs_diff_after_vs_before"] = (after - before).abs().max().item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=45, help="prompt positions: 32 queries + the prompt's tokens")
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--vocab", type=int, default=50272)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--name", default="lm_head")
    args = p.parse_args()
    results = {}
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        results[name] = {"product": product(args, dtype), "opt_prefill_one_layer": opt_prefill(args, dtype)}
        print(name, results[name], flush=True)
    shape = {k: getattr(args, k) for k in ("batch", "length", "hidden", "vocab", "repeat")}
    out = write_result(args.name, {"lscpu": lscpu(), "shape": shape, "results": results})
    print(out)


if __name__ == "__main__":
    main()
