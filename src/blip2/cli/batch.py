"""Batch captioning on the command line: the options and the branch `blip2 caption` takes for folders, lists, shards.

    blip2 caption photos/ -r --sidecar --ext caption          # photos/a/b.jpg -> photos/a/b.caption
    blip2 caption list.txt --out captions.jsonl --out captions.parquet --sidecar-dir captions/
    blip2 caption 'shards-{000..099}.tar' --out caps.parquet --engine ray --address auto --num-workers 8

Kill it at any time (Ctrl-C, SIGTERM, kill -9) and run the same command again: it goes on where it stopped.
Bad images are skipped and listed in `errors.jsonl` beside the output. Exit code 0 when the run finished, even with
some bad images; 2 when nothing could be captioned (no images found, or every one failed) or on bad options.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from ..defaults import (
    MAX_PIXELS,
    RAY_NUM_WORKERS,
    RAY_SHARD_SIZE,
    SIDECAR_EXISTING,
    SIDECAR_EXT,
    SIDECAR_SEPARATOR,
)

F = TypeVar("F", bound=Callable[..., Any])

RUNNERS, GENERATORS = ("local", "ray"), ("ours", "vllm")
ENGINES = [*RUNNERS, *GENERATORS]

# The batch options handed to the engine as they are; the rest are for the Ray pool or decided in `run_batch`.
ENGINE_NAMES = (
    "out",
    "sidecar",
    "sidecar_dir",
    "ext",
    "existing",
    "separator",
    "prefix",
    "suffix",
    "question",
    "recursive",
    "workers",
    "compile",
    "errors",
)
BATCH_NAMES = (*ENGINE_NAMES, "engine", "address", "num_workers", "shard_size", "max_pixels", "progress")

_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (
        ("--out", "-o"),
        {
            "multiple": True,
            "type": click.Path(dir_okay=True),
            "metavar": "FILE",
            "help": "Manifest: results.jsonl and/or results.parquet (repeat for both). "
            "With --engine ray, a folder of shards named like this.",
        },
    ),
    (("--sidecar",), {"is_flag": True, "help": "Write a caption file beside each image (photo.jpg -> photo.txt)."}),
    (
        ("--sidecar-dir",),
        {
            "type": click.Path(file_okay=False),
            "metavar": "DIR",
            "help": "Write the caption files under DIR instead, mirroring the input folders.",
        },
    ),
    (("--ext",), {"default": SIDECAR_EXT, "show_default": True, "help": "Caption file extension (txt, caption, ...)."}),
    (
        ("--existing",),
        {
            "type": click.Choice(SIDECAR_EXISTING),
            "default": SIDECAR_EXISTING[0],
            "show_default": True,
            "help": "What to do with a caption file that already exists.",
        },
    ),
    (
        ("--separator",),
        {
            "default": SIDECAR_SEPARATOR,
            "show_default": True,
            "help": "Between the old text and the caption for --existing append/prepend.",
        },
    ),
    (("--prefix",), {"default": "", "help": "Text put before every caption (e.g. a trigger word and ', ')."}),
    (("--suffix",), {"default": "", "help": "Text put after every caption."}),
    (
        ("--question", "-q"),
        {"default": None, "help": "Ask this question of every image (VQA) instead of captioning it."},
    ),
    (("--recursive", "-r"), {"is_flag": True, "help": "Go into subfolders of folder inputs."}),
    (
        ("--compile",),
        {
            "is_flag": True,
            "help": "Decode with a static KV cache and a compiled step: ~7% faster per caption at full size on a "
            "CPU after about 2.5 minutes of compiling, so for long runs only.",
        },
    ),
    (
        ("--workers",),
        {
            "type": click.IntRange(min=0),
            "default": None,
            "help": "Decoding worker processes; 0 decodes in the main process [cores - 1].",
        },
    ),
    (
        ("--engine",),
        {
            "type": click.Choice(ENGINES),
            "multiple": True,
            "help": "Where: local (this machine) or ray (an actor pool on a Ray cluster, pip install 'blip2[ray]'); "
            "what generates: ours or vllm (docs/engines.md). Give it twice for both: --engine ray --engine vllm "
            "[local, ours].",
        },
    ),
    (("--address",), {"default": None, "help": "Ray cluster address (e.g. auto or ray://host:10001) [a local one]."}),
    (
        ("--num-workers",),
        {
            "type": click.IntRange(min=1),
            "default": RAY_NUM_WORKERS,
            "show_default": True,
            "help": "Ray: model actors (one model, and one GPU if any, each).",
        },
    ),
    (
        ("--shard-size",),
        {
            "type": click.IntRange(min=1),
            "default": RAY_SHARD_SIZE,
            "show_default": True,
            "help": "Ray: images per output shard, the unit of resume.",
        },
    ),
    (
        ("--errors",),
        {
            "type": click.Path(dir_okay=False),
            "default": None,
            "metavar": "FILE",
            "help": "Error log [errors.jsonl beside the output].",
        },
    ),
    (
        ("--max-pixels",),
        {
            "type": click.IntRange(min=1),
            "default": None,
            "help": f"Refuse larger images as decompression bombs [{MAX_PIXELS}].",
        },
    ),
    (("--progress/--no-progress",), {"default": None, "help": "Progress bar on stderr [when stderr is a terminal]."}),
]


def batch_options(f: F) -> F:
    """The batch captioning options, for the `caption` command."""
    for decls, kwargs in reversed(_OPTIONS):
        f = click.option(*decls, **kwargs)(f)
    return f


def batch_requested(images: Sequence[str], values: dict[str, Any]) -> bool:
    """Batch mode: an output or sidecar was asked for, or an input is a folder, a list, a tar shard or a pattern."""
    from ..sources import LIST_SUFFIXES, TAR_SUFFIXES

    if values.get("out") or values.get("sidecar") or values.get("sidecar_dir") or _pick(values, RUNNERS) == "ray":
        return True
    if values.get("question"):
        return True
    for image in images:
        lower = image.lower()
        if os.path.isdir(image) or lower.endswith(TAR_SUFFIXES) or os.path.splitext(lower)[1] in LIST_SUFFIXES:
            return True
        if "{" in image and not os.path.exists(image):
            return True
    return False


def _pick(values: dict[str, Any], kinds: tuple[str, ...]) -> str:
    """The one `--engine` of `kinds` given (the first of `kinds` when none); two of one kind are a usage error."""
    given = [e for e in values.get("engine") or () if e in kinds]
    if len(set(given)) > 1:
        raise click.UsageError(f"--engine: give one of {' or '.join(kinds)}, not {' and '.join(sorted(set(given)))}")
    return given[0] if given else kinds[0]


def generator_engine(engines: Sequence[str] | None) -> str:
    """ours or vllm, from the `--engine` values of `caption`."""
    return _pick({"engine": engines}, GENERATORS)


def run_batch(
    images: Sequence[str],
    model: str,
    device: str,
    dtype: str,
    prompt: str | None,
    batch_size: int | None,
    gen_kwargs: dict[str, Any],
    values: dict[str, Any],
    as_json: bool = False,
) -> None:
    """Run the batch, print the summary on stderr, exit 0 (finished) or 2 (nothing could be captioned)."""
    from ..batch.engine import split_options

    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.get_parameter_source("batch_size") == click.core.ParameterSource.DEFAULT:
        batch_size = None  # let the engine pick by device (a GPU wants more than a CPU)
    v = {k: values.get(k) for k in BATCH_NAMES}
    progress = sys.stderr.isatty() if v["progress"] is None else v["progress"]
    options = {k: v[k] for k in ENGINE_NAMES}
    if v["max_pixels"] is not None:
        options["max_pixels"] = v["max_pixels"]
    opts = split_options(
        {
            **options,
            "prompt": prompt,
            "batch_size": batch_size,
            "device": device,
            "dtype": dtype,
            "engine": _pick(v, GENERATORS),
            "progress": progress,
            **gen_kwargs,
        }
    )
    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C: worker processes stop, the ledger stays consistent.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if _pick(v, RUNNERS) == "ray":
        summary = _run_ray(images, model, opts, v)
    else:
        summary = _run_local(images, model, opts, as_json)
    if summary.failed and summary.done + summary.resumed + summary.skipped == 0 and not opts.persistent:
        sys.exit(2)  # every image failed and each has had its one line: a summary would only repeat them
    click.echo(f"done: {summary.line()}", err=True)
    if summary.failed and summary.errors_file:
        click.echo(f"errors: {summary.failed} images skipped, reasons in {summary.errors_file}", err=True)
    for out in summary.outputs:
        click.echo(f"wrote: {out}", err=True)
    if summary.total == 0:
        click.echo(f"error: no images found in {' '.join(images)}", err=True)
        sys.exit(2)
    if summary.done + summary.resumed + summary.skipped == 0:
        click.echo("error: no image could be captioned", err=True)
        sys.exit(2)


def _run_local(images: Sequence[str], model: str, opts: Any, as_json: bool) -> Any:
    from ..batch.run import BatchRun
    from .options import json_line, one_line

    run = BatchRun(images, model, opts)
    for r in run:
        if r.status == "failed" and not opts.persistent:
            click.echo(f"error: {r.error}", err=True)
        elif r.status == "done" and not opts.persistent:  # nothing written: the captions go to stdout
            click.echo(
                json_line({"image": r.path, "caption": r.caption}) if as_json else f"{r.path}\t{one_line(r.caption)}"
            )
    return run.summary


def _run_ray(images: Sequence[str], model: str, opts: Any, v: dict[str, Any]) -> Any:
    try:
        import ray  # noqa: F401 - only to fail here, with advice, when Ray is missing

        from ..batch.ray_engine import RayRun
    except ImportError as e:
        raise click.UsageError(f"--engine ray needs Ray: pip install 'blip2[ray]' ({e})") from e
    run = RayRun(images, model, opts, address=v["address"], num_workers=v["num_workers"], shard_size=v["shard_size"])
    return run.run()
