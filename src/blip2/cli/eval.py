"""`blip2 eval caption | vqa | retrieval`: run a checkpoint over a benchmark split and score it.

Each command prints the results table and writes, in `--out`: `<task>_results.json`, `<task>_results.txt` (the
table), `<task>_predictions.json` (official result format) and, for caption/VQA, `<task>_skipped.json` and the
resumable `<task>_predictions.partial.jsonl` (see `blip2.eval.run` for resuming and skipped images).
A bad annotation file, a missing images folder or mismatched resume settings: one line on stderr, exit 2.

The group's function is `eval_` (so as not to shadow the builtin inside this module); `eval = eval_` at the bottom is
the name the command registry in `cli/__init__.py` looks up.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

from ..defaults import (
    EVAL_BATCH_SIZE,
    EVAL_CAPTION,
    EVAL_K_TEST,
    EVAL_OUT,
    EVAL_RETRIEVAL_BATCH_SIZE,
    EVAL_VQA,
    RETRIEVAL_MODEL,
    VQA_TEMPLATE,
)
from .options import GENERATION_OPTIONS, generation_kwargs, model_options

F = TypeVar("F", bound=Callable[..., Any])

# The tasks' generation defaults, shown in `--help` (blip2.eval.run applies them: a test checks they agree).
CAPTION_HELP_DEFAULTS = EVAL_CAPTION
VQA_HELP_DEFAULTS = EVAL_VQA


def task_generation_options(defaults: Mapping[str, Any]) -> Callable[[F], F]:
    """The shared generation options (`options.GENERATION_OPTIONS`), each defaulting to "not given", with this
    task's defaults in the help text instead of the general ones."""

    def decorate(f: F) -> F:
        for name, decl, type_, help_ in reversed(GENERATION_OPTIONS):
            if name in defaults:
                help_ = re.sub(r"\[[^\]]*\]\.?$", f"[{defaults[name]:g}].", help_)
            f = click.option(decl, name, type=type_, default=None, help=help_)(f)
        return f

    return decorate


def common_options(f: F) -> F:
    f = click.option(
        "--out",
        "-o",
        default=EVAL_OUT,
        show_default=True,
        type=click.Path(file_okay=False),
        help="Folder for results, table, predictions and the resumable partial file.",
    )(f)
    f = click.option("--images", required=True, help="Folder the annotation's image files are relative to.")(f)
    return f


def image_pattern_option(f: F) -> F:
    return click.option(
        "--image-pattern",
        default=None,
        help="File name of an image from its id, e.g. 'COCO_val2014_{image_id:012d}.jpg'. Default: the annotation's "
        "file name if it has one, else COCO_<split>_{image_id:012d}.jpg (split from the file's data_subtype, then "
        "val2014, train2014, test2015; also in a <split>/ sub-folder), {image_id:012d}.jpg, {image_id}.jpg, "
        "{image_id}.png; the first that exists.",
    )(f)


def batch_size_option(default: int) -> Callable[[F], F]:
    return click.option(
        "--batch-size", "-b", type=click.IntRange(min=1), default=default, show_default=True, help="Inputs per pass."
    )


def _report(output: Any) -> None:
    click.echo(output.table, nl=False)
    for kind, path in output.paths.items():
        click.echo(f"wrote {kind}: {path}", err=True)
    n = output.results.get("n_skipped") or 0
    if n:
        click.echo(
            f"warning: {n} inputs skipped (missing or unreadable images), see {output.paths['skipped']}", err=True
        )


@click.group(name="eval")
def eval_() -> None:
    """Evaluate a checkpoint: COCO caption metrics, VQA accuracy (VQAv2, OK-VQA, GQA), retrieval recall."""


@eval_.command(name="caption")
@click.option("--annotations", required=True, help="COCO-style {images, annotations} or Karpathy-style caption JSON.")
@common_options
@click.option("--prompt", "-p", default=None, help="Captions continue this text (LAVIS -coco configs: 'a photo of').")
@batch_size_option(EVAL_BATCH_SIZE)
@click.option("--no-spice", is_flag=True, help="Skip SPICE (needs Stanford CoreNLP models and minutes of Java).")
@click.option("--no-meteor", is_flag=True, help="Skip METEOR (a Java process, ~15 s to start).")
@image_pattern_option
@model_options
@task_generation_options(CAPTION_HELP_DEFAULTS)
def eval_caption(
    annotations: str,
    images: str,
    out: str,
    prompt: str | None,
    batch_size: int,
    no_spice: bool,
    no_meteor: bool,
    image_pattern: str | None,
    model: str,
    device: str,
    dtype: str,
    **gen: Any,
) -> None:
    """Caption every annotated image and score BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE (pycocoevalcap).

    Defaults are LAVIS's COCO caption eval configs (caption_coco_*_eval.yaml): 5 beams, at most 30 and at least
    8 new tokens. Rerunning with the same settings resumes; images that cannot be read are skipped and listed.
    """
    from ..eval.run import evaluate_caption

    given = generation_kwargs(gen)
    output = evaluate_caption(
        model,
        annotations,
        images,
        out,
        options=given,
        prompt=prompt,
        batch_size=batch_size,
        spice=not no_spice,
        meteor=not no_meteor,
        image_pattern=image_pattern,
        device=device,
        dtype=dtype,
    )
    _report(output)


@eval_.command(name="vqa")
@click.option("--questions", required=True, help="VQAv2/OK-VQA question JSON, or a GQA question file with --gqa.")
@click.option(
    "--annotations", default=None, help="VQAv2/OK-VQA annotation JSON (without it: predictions only, e.g. test-dev)."
)
@common_options
@click.option(
    "--prompt",
    "-p",
    default=VQA_TEMPLATE,
    show_default=True,
    help="Template; {} is the question. LAVIS's YAML uses 'Question: {} Short answer:'.",
)
@click.option("--gqa", is_flag=True, help="GQA: exact-match accuracy; answers from --annotations or the question file.")
@batch_size_option(EVAL_BATCH_SIZE)
@image_pattern_option
@model_options
@task_generation_options(VQA_HELP_DEFAULTS)
def eval_vqa(
    questions: str,
    annotations: str | None,
    images: str,
    out: str,
    prompt: str,
    gqa: bool,
    batch_size: int,
    image_pattern: str | None,
    model: str,
    device: str,
    dtype: str,
    **gen: Any,
) -> None:
    """Answer every question and score VQA accuracy per answer type (official VQAv2 metric), or GQA accuracy.

    Defaults are the paper's zero-shot VQA setting (§4.2) and LAVIS's vqav2/okvqa/gqa zero-shot configs: 5 beams,
    length penalty -1, at most 10 and at least 1 new token, prompt "Question: {} Answer:". Resumable; images that
    cannot be read are skipped and listed.
    """
    from ..eval.run import evaluate_vqa

    output = evaluate_vqa(
        model,
        questions,
        images,
        out,
        annotations=annotations,
        gqa=gqa,
        options=generation_kwargs(gen),
        prompt=prompt,
        batch_size=batch_size,
        image_pattern=image_pattern,
        device=device,
        dtype=dtype,
    )
    _report(output)


@eval_.command(name="retrieval")
@click.option("--annotations", required=True, help="Karpathy-style [{image, caption: [...]}] JSON (test split).")
@common_options
@click.option(
    "--k-test",
    type=click.IntRange(min=0),
    default=EVAL_K_TEST,
    show_default=True,
    help="ITC candidates per query re-ranked by ITM (LAVIS retrieval config); 0: ITC only.",
)
@batch_size_option(EVAL_RETRIEVAL_BATCH_SIZE)
@model_options
def eval_retrieval(
    annotations: str, images: str, out: str, k_test: int, batch_size: int, model: str, device: str, dtype: str
) -> None:
    """Image-text retrieval recall@1/5/10 both ways, with ITC alone and with ITM re-ranking of the top --k-test
    (LAVIS compute_sim_matrix: score = ITM positive logit + ITC). Needs a checkpoint with a Q-Former text side."""
    from ..eval.run import evaluate_retrieval

    output = evaluate_retrieval(
        model, annotations, images, out, k_test=k_test, batch_size=batch_size, device=device, dtype=dtype
    )
    _report(output)


# Retrieval needs a Q-Former text side: its default model is the ITM checkpoint, not the shared captioning default.
for _param in eval_retrieval.params:
    if _param.name == "model":
        _param.default = RETRIEVAL_MODEL

eval = eval_  # the name `cli/__init__.py` registers; see the module docstring
