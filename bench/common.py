"""Shared pieces of the benchmarks: full-size random-weight checkpoints, machine facts, JSON results.

Weights cannot be downloaded here, so the benchmarks build the real architectures (same shapes, same
configs as the Hub checkpoints) with random values: the cost of a matmul does not depend on the values.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the fixture tokenizer builders

# blip2-opt-2.7b's text_config (Hub config.json, transformers 4.47 update), minus its tokenizer-specific ids.
OPT_2_7B = dict(
    model_type="opt",
    hidden_size=2560,
    word_embed_proj_dim=2560,
    ffn_dim=10240,
    num_hidden_layers=32,
    num_attention_heads=32,
    vocab_size=50304,
    max_position_embeddings=2048,
    do_layer_norm_before=True,
    activation_function="relu",
    bos_token_id=2,
    pad_token_id=1,
    eos_token_id=50118,
    prefix="</s>",
    enable_bias=True,
    layer_norm_elementwise_affine=True,
    tie_word_embeddings=True,
)


def make_full_checkpoint(folder: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write a blip2-opt-2.7b-shaped checkpoint with random weights (3.8B parameters) and a stand-in tokenizer.

    The tokenizer is the tests' small byte-level BPE; its `<image>` id is used as `image_token_index` so that
    transformers' processor and model agree. Reuses the folder if it is complete.
    """
    from fixtures import make_opt_tokenizer
    from safetensors.torch import save_file
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    from blip2.checkpoint import FP32_MODULES

    folder = Path(folder)
    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_opt_tokenizer(folder)
    image_id = tok.convert_tokens_to_ids("<image>")
    text = dict(OPT_2_7B, eos_token_id=tok.convert_tokens_to_ids("Ċ"))
    cfg = Blip2Config(text_config=text, num_query_tokens=32, image_token_index=image_id)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in Blip2ForConditionalGeneration(cfg).state_dict().items()}
    shapes.pop("language_model.lm_head.weight", None)  # tied to the input embeddings
    where = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU draws 3.8B numbers in seconds, a CPU in minutes
    gen = torch.Generator(where).manual_seed(seed)
    shard, n, size, weight_map = {}, 1, 0, {}
    for key, (shape, _) in shapes.items():
        keep_fp32 = key.startswith(FP32_MODULES)
        t = torch.empty(shape, dtype=torch.float32, device=where)
        if key.endswith(
            (
                "norm.weight",
                "LayerNorm.weight",
                "layer_norm1.weight",
                "layer_norm2.weight",
                "final_layer_norm.weight",
                "post_layernorm.weight",
                "layernorm.weight",
            )
        ):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        shard[key] = t.to("cpu", torch.float32 if keep_fp32 else dtype)
        size += shard[key].numel() * shard[key].element_size()
        if size > 2 * 2**30:
            _flush(save_file, folder, shard, n, weight_map)
            shard, n, size = {}, n + 1, 0
    if shard:
        _flush(save_file, folder, shard, n, weight_map)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg.save_pretrained(folder)
    Blip2Processor(BlipImageProcessor(size={"height": 224, "width": 224}), tok, num_query_tokens=32).save_pretrained(
        folder
    )
    (folder / "done").write_text("ok\n")
    return folder


def _flush(save_file, folder: Path, shard: dict, n: int, weight_map: dict) -> None:
    name = f"model-{n:05d}.safetensors"
    save_file(shard, folder / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, name))


def machine() -> dict:
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "avx512_bf16": " avx512_bf16" in flags,
        "amx": " amx_bf16" in flags,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def median_ms(f, n: int = 7) -> float:
    """Milliseconds of the median of `n` calls of `f`, after one untimed call."""
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3


def turns(x, items: list, product):
    """A call of `product(x, item)` on the next of `items` each time: weight copies that together exceed the caches
    are read from memory, as a model's layers read theirs."""
    turn = itertools.cycle(items)
    return lambda: product(x, next(turn))


def timed(fn, repeat: int = 3) -> tuple[float, list[float], object]:
    """Median seconds over `repeat` runs (after the caller's warm-up), all runs, and the last result."""
    runs, out = [], None
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else lambda: None  # GPU work is asynchronous
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        runs.append(time.perf_counter() - t0)
    return sorted(runs)[len(runs) // 2], runs, out


def equal_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two generations share before their first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


REF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # transformers' side


def reference_dtype(ours: str, asked: str | None = None) -> str:
    """transformers' dtype beside ours: the one asked for, else ours; bf16 against our int8 (it has no CPU int8)."""
    return asked or ("bf16" if ours == "int8" else ours)


def write_result(name: str, data: dict) -> Path:
    out = HERE / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    os.replace(tmp, out)
    return out
