"""The defaults that the Python API, the server and the `blip2` command share, each defined once.

Standard library only: the CLI reads its option defaults from here, so `blip2 --help` shows them without importing
torch. A module that needs one of these imports it rather than repeating the value; `tests/test_cli.py` checks that
the modules which still hold a copy agree with this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

# ---- models ----------------------------------------------------------------------------------------------------------
DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"  # caption, ask, chat, serve, eval caption/vqa
RETRIEVAL_MODEL = "Salesforce/blip2-itm-vit-g"  # index, search, eval retrieval: needs a Q-Former text side
MODEL_ENVVAR = "BLIP2_MODEL"
KV_CACHES = ("auto", "int8", "bf16", "fp16", "fp32")  # blip2.load(kv_cache=...), --kv-cache (dtype_policy)
KV_CACHE_ENVVAR = "BLIP2_KV_CACHE"  # the default kv_cache of blip2.load (the CLI's --kv-cache sets it)
DEVICE = "auto"  # CUDA if there is one, else the CPU
DTYPE = "auto"  # fp16 on CUDA, bf16 on CPUs with native bf16, else fp32

# ---- generation ------------------------------------------------------------------------------------------------------
MAX_NEW_TOKENS = 30  # captions, chat answers, generate()
VQA_MAX_NEW_TOKENS = 10  # short answers: Blip2.ask, the server's /v1/vqa
# `GenerationOptions`' fields and defaults: greedy, up to MAX_NEW_TOKENS new tokens (LAVIS uses 5 beams).
GENERATION: MappingProxyType[str, Any] = MappingProxyType(
    {
        "max_new_tokens": MAX_NEW_TOKENS,
        "min_new_tokens": 0,
        "num_beams": 1,
        "do_sample": False,
        "top_p": 1.0,
        "temperature": 1.0,
        "repetition_penalty": 1.0,
        "length_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "num_return_sequences": 1,
        "seed": None,
    }
)

# ---- prompts and context ---------------------------------------------------------------------------------------------
VQA_TEMPLATE = "Question: {} Answer:"  # the paper's; LAVIS's YAML uses "Question: {} Short answer:"
# InstructBLIP reads instructions (docs/instructblip.md); these are LAVIS' instructblip evaluation prompts
# (projects/instructblip/caption_coco_*_eval*.yaml, qa_okvqa_*_eval.yaml).
INSTRUCT_CAPTION_PROMPT = "A short image caption."
INSTRUCT_VQA_TEMPLATE = "Question: {} Short Answer:"
INSTRUCTION_TOKENS = 128  # the Q-Former reads the last this-many tokens of an instruction (LAVIS' max_txt_len)
CONTEXT_TOKENS = 512  # a chat's budget: BLIP-2's LM context, query tokens + prompt text

# ---- images and batches ----------------------------------------------------------------------------------------------
MAX_PIXELS = 100_000_000  # larger images are refused as decompression bombs
BATCH_SIZE = 8  # images per forward pass: Blip2.generate, `blip2 caption`, `blip2 index`
SIDECAR_EXT = "txt"  # photo.jpg -> photo.txt
# What to do with a caption file that already exists; the first is the default.
SIDECAR_EXISTING = ("skip", "overwrite", "append", "prepend")
SIDECAR_SEPARATOR = ", "  # between the old text and the caption for append / prepend
RAY_NUM_WORKERS = 1  # model actors
RAY_SHARD_SIZE = 1000  # images per output shard, the unit of resume
RAY_DECODE_THREADS = 4  # decoding threads per Ray model actor (PIL releases the GIL)
MAX_DECODE_WORKERS = 8  # decoding processes at most (cores - 1 below that): beyond it the model is the bottleneck
TOP_K = 10  # search results

# ---- evaluation ------------------------------------------------------------------------------------------------------
# LAVIS caption_coco_{opt2.7b,opt6.7b,flant5xl}_eval.yaml: num_beams 5, max_len 30, min_len 8.
EVAL_CAPTION: MappingProxyType[str, Any] = MappingProxyType({"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8})
# Paper §4.2 ("beam size 5, length-penalty -1") and LAVIS vqav2/okvqa/gqa zero-shot YAML: max_len 10, min_len 1.
EVAL_VQA: MappingProxyType[str, Any] = MappingProxyType(
    {"num_beams": 5, "max_new_tokens": VQA_MAX_NEW_TOKENS, "min_new_tokens": 1, "length_penalty": -1.0}
)
EVAL_BATCH_SIZE = 16  # caption and VQA inputs per pass
EVAL_RETRIEVAL_BATCH_SIZE = 32
EVAL_K_TEST = 128  # ITC candidates per query re-ranked by ITM (LAVIS retrieval config)
EVAL_OUT = "eval_results"

# ---- the miniature (train/miniature.py) ------------------------------------------------------------------------------
MINIATURE_WORK = "build/miniature"  # the build's data, towers, stages and results; finished phases are reused
MINIATURE_EXPORT = "examples/miniature"  # the exported models, sample images and results.json (committed)

# ---- server ----------------------------------------------------------------------------------------------------------
# With no --max-wait-ms, the oldest request waits this share of the last batch's time, within these bounds
# (server/batcher.py says why).
AUTO_WAIT_SHARE, AUTO_WAIT_MIN_S, AUTO_WAIT_MAX_S = 0.02, 0.025, 0.250
HOST = "127.0.0.1"  # loopback: 0.0.0.0 exposes the server (with --api-key then)
PORT = 8000


@dataclass
class ServerSettings:
    """Everything `blip2 serve` can set; its options take their defaults from these fields."""

    model: str
    device: str = DEVICE
    dtype: str = DTYPE
    served_name: str | None = None
    max_batch_size: int = 8
    max_wait_ms: float | None = None  # None: AUTO_WAIT_SHARE of the last batch's time (server/batcher.py)
    max_queue: int = 64
    api_key: str | None = None
    allow_remote_images: bool = False
    max_body_mb: float = 20.0
    max_image_mb: float = 20.0  # remote downloads
    remote_timeout_s: float = 10.0
    max_image_pixels: int = 50_000_000  # below MAX_PIXELS: several requests decode at once
    max_tokens_limit: int = 256
    max_history_turns: int = 20
    engine: str = "ours"  # ours: micro-batches (server/batcher.py); vllm: continuous batching (server/continuous.py)

    @property
    def name(self) -> str:
        if self.served_name:
            return self.served_name
        path = Path(self.model)
        return path.name if path.is_dir() else self.model
