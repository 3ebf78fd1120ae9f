"""Click options shared by every command that loads a model or generates text, the helpers that use them, and the
one-record-per-line output helpers (`one_line`, `json_line`).

    @click.command()
    @model_options
    @generation_options
    def caption(model, device, dtype, **gen): ...
        m = load_model(model, device, dtype)
        m.caption(image, **generation_kwargs(gen))

Generation options default to `None` ("not given"): only the ones the user gave reach the API, so each task keeps
its own defaults (VQA answers stop after 10 new tokens, captions after 30). Bounds that need no context
(`--num-beams 0`) are click usage errors (exit 2, naming the option); the rest is checked by `GenerationOptions`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..defaults import (
    DEFAULT_MODEL,
    DEVICE,
    DTYPE,
    GENERATION,
    KV_CACHE_ENVVAR,
    KV_CACHES,
    MAX_NEW_TOKENS,
    MODEL_ENVVAR,
    VQA_MAX_NEW_TOKENS,
)

if TYPE_CHECKING:
    from ..pipeline import Blip2

F = TypeVar("F", bound=Callable[..., Any])

DTYPES = ["auto", "fp32", "fp16", "bf16", "int8", "int4"]


def _default(name: str) -> str:
    """`GenerationOptions`' default for `name`, as the help texts show it: "[1]"."""
    return f"[{GENERATION[name]:g}]"


# (python name, click declaration, type, help): python names are `GenerationOptions` fields.
GENERATION_OPTIONS: list[tuple[str, str, click.ParamType | None, str]] = [
    (
        "max_new_tokens",
        "--max-new-tokens",
        click.IntRange(min=1),
        f"Most tokens to generate [{MAX_NEW_TOKENS}; answers to questions: {VQA_MAX_NEW_TOKENS}].",
    ),
    (
        "min_new_tokens",
        "--min-new-tokens",
        click.IntRange(min=0),
        f"Fewest tokens to generate {_default('min_new_tokens')}.",
    ),
    ("num_beams", "--num-beams", click.IntRange(min=1), f"Beam search width; 1 is greedy {_default('num_beams')}."),
    ("do_sample", "--do-sample/--greedy", None, "Sample tokens instead of taking the most likely [greedy]."),
    (
        "top_p",
        "--top-p",
        click.FloatRange(min=0.0, max=1.0, min_open=True),
        f"Nucleus sampling mass, in (0, 1] {_default('top_p')}.",
    ),
    (
        "temperature",
        "--temperature",
        click.FloatRange(min=0.0, min_open=True),
        f"Sampling temperature, > 0 {_default('temperature')}.",
    ),
    (
        "repetition_penalty",
        "--repetition-penalty",
        click.FloatRange(min=0.0, min_open=True),
        f"Penalty > 1 discourages repeated tokens {_default('repetition_penalty')}.",
    ),
    (
        "length_penalty",
        "--length-penalty",
        click.FLOAT,
        f"Beam search: > 1 favours longer outputs {_default('length_penalty')}.",
    ),
    (
        "no_repeat_ngram_size",
        "--no-repeat-ngram-size",
        click.IntRange(min=0),
        f"Never repeat an n-gram of this size; 0 is off {_default('no_repeat_ngram_size')}.",
    ),
    ("seed", "--seed", click.INT, "Random seed, for reproducible sampling."),
]
GENERATION_NAMES = [name for name, *_ in GENERATION_OPTIONS]


def model_options(f: F) -> F:
    """`--model/-m` (hub id, folder or LAVIS .pth; env BLIP2_MODEL), `--base`, `--device`, `--dtype`, `--kv-cache`
    (env BLIP2_KV_CACHE, which the command sets for every model it and its workers load).

    The command receives no `base`: with `--base`, its `model` is a `LavisCheckpoint` (a str, the file's path) that
    carries the base to `blip2.load`, through whatever settings the command passes it on in."""

    run = f

    @functools.wraps(run)
    def command(*args: Any, base: str | None = None, kv_cache: str = "auto", **kwargs: Any) -> Any:
        if base is not None:
            from ..checkpoint.lavis import LavisCheckpoint

            kwargs["model"] = LavisCheckpoint(kwargs["model"], base)
        before = os.environ.get(KV_CACHE_ENVVAR)
        os.environ[KV_CACHE_ENVVAR] = kv_cache  # every load of this command, its workers' included (Ray, processes)
        try:
            return run(*args, **kwargs)
        finally:
            if before is None:
                os.environ.pop(KV_CACHE_ENVVAR, None)
            else:
                os.environ[KV_CACHE_ENVVAR] = before

    f = click.option(
        "--base",
        default=None,
        envvar="BLIP2_BASE",
        show_envvar=True,
        help="For a LAVIS .pth --model (trained weights only): the Hub id or folder whose frozen ViT and LM complete "
        "it [found from the LAVIS model type in the file].",
    )(command)
    f = click.option(
        "--dtype",
        type=click.Choice(DTYPES),
        default=DTYPE,
        show_default=True,
        help="Weights dtype; auto is the fastest route measured on this machine within bf16's quality (fp16 on "
        "CUDA); int8 quantizes the language model (and the vision encoder where int8 products are fast): about 2x "
        "less memory than bf16, faster; int4 (CPU) adds int4 decoding weights: faster one-by-one captions and chat.",
    )(f)
    f = click.option(
        "--kv-cache",
        type=click.Choice(KV_CACHES),
        default="auto",
        show_default=True,
        envvar=KV_CACHE_ENVVAR,
        show_envvar=True,
        help="The dtype of the language model's key/value cache while generating; auto: the dtype's (int8 for int8 "
        "and int4 on a CPU, else the model's own, as transformers); int8 quarters an fp32 cache (larger batches).",
    )(f)
    f = click.option(
        "--device", default=DEVICE, show_default=True, help="torch device (cpu, cuda, cuda:1, mps) or auto."
    )(f)
    f = click.option(
        "--model",
        "-m",
        default=DEFAULT_MODEL,
        show_default=True,
        envvar=MODEL_ENVVAR,
        show_envvar=True,
        help="Hugging Face Hub id, local checkpoint folder, or LAVIS .pth file.",
    )(f)
    return f


def engine_option(f: F) -> F:
    """`--engine ours|vllm`: which engine generates (docs/engines.md)."""
    return click.option(
        "--engine",
        type=click.Choice(["ours", "vllm"]),
        default="ours",
        show_default=True,
        help="ours: exact against transformers; vllm: vLLM on the same checkpoint (docs/engines.md).",
    )(f)


def generation_options(f: F) -> F:
    """Every generation option of `GenerationOptions`, each defaulting to "not given" (None)."""
    for name, decl, type_, help_ in reversed(GENERATION_OPTIONS):
        f = click.option(decl, name, type=type_, default=None, help=help_)(f)
    return f


def generation_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    """The generation options the user gave, as keyword arguments for `Blip2.caption/ask/generate`, `Chat.ask`.

    Other keys in `values` (a command's own parameters) are ignored, so a command can pass its whole `**kwargs`.
    """
    kwargs = {name: values[name] for name in GENERATION_NAMES if values.get(name) is not None}
    check_generation(kwargs)
    return kwargs


def check_generation(kwargs: dict[str, Any]) -> None:
    """Validate the given options over the base defaults now, so a bad combination fails before the model loads.

    Only checks that hold for every task's defaults are raised here (e.g. `--min-new-tokens 40` alone is fine for a
    caption but not for VQA's 10-token default; the API reports that one when the task runs).
    """
    from ..errors import GenerationError
    from ..pipeline import GenerationOptions

    known = {f.name for f in fields(GenerationOptions)}
    unknown = set(kwargs) - known
    if unknown:  # a bug in this module, not a user error
        raise TypeError(f"not GenerationOptions fields: {sorted(unknown)}")
    base = {"max_new_tokens": max(kwargs.get("min_new_tokens", 1), 1)}  # min vs max only when both are given
    try:
        GenerationOptions(**{**base, **kwargs})
    except GenerationError as e:
        message = str(e).split(";")[0]
        for name, decl, *_ in GENERATION_OPTIONS:
            message = message.replace(name, decl.split("/")[0])
        raise click.UsageError(f"invalid generation options: {message}") from e


def load_model(model: str, device: str = "auto", dtype: str = "auto", engine: str = "ours") -> Blip2:
    """`blip2.load` with the CLI's values; a missing or offline model raises `CheckpointError` (one line, exit 2)."""
    from ..pipeline import load

    return load(model, device=device, dtype=dtype, engine=engine)


# Every character `str.splitlines` breaks on, and the tab: none may appear inside one record of the text output.
_BREAKS = re.compile(r"[\t\n\v\f\r\x1c\x1d\x1e\x85\u2028\u2029]+")


def one_line(text: str) -> str:
    """Tabs and line breaks become spaces, so `path<TAB>caption` stays one line per image (--json keeps them)."""
    return _BREAKS.sub(" ", text)


def json_line(record: dict[str, Any]) -> str:
    """One JSON line, readable (not ASCII-escaped) yet unbreakable: U+0085/2028/2029 are escaped as well."""
    text = json.dumps(record, ensure_ascii=False)
    return text.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
