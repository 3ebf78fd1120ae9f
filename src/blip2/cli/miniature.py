"""`blip2 demo` and `blip2 miniature build`: the miniature BLIP-2 of `blip2.train.miniature`, trained from nothing on
the shapes world (`build`, about 20-30 minutes on a 2-core CPU) and exported to `examples/miniature`, which `demo`
captions, questions and chats with. Both run offline (HF_HUB_OFFLINE=1) and need no extra: a core install runs them.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..defaults import MINIATURE_EXPORT, MINIATURE_WORK


def _offline() -> None:
    """Set before huggingface_hub is imported (it reads the variable once): nothing here may reach the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"


@click.command()
@click.argument("folder", default=MINIATURE_EXPORT, type=click.Path(file_okay=False))
def demo(folder: str) -> None:
    """Caption, question and chat with the miniature model in FOLDER (made by `blip2 miniature build`), offline.

    Prints a few images' answers in full, then the scores on all the sample images: new renders of colour-shape
    pairs seen in training, and of pairs held out of every training text.
    """
    if not (Path(folder) / "model").is_dir():
        raise click.UsageError(
            f"{folder} holds no miniature model (no model/ folder): run from the repository root, which holds "
            f"{MINIATURE_EXPORT}, or make one with `blip2 miniature build --export {folder}`"
        )
    _offline()
    from ..train.miniature import demo as run_demo

    run_demo(Path(folder), echo=click.echo)


@click.group()
def miniature() -> None:
    """The miniature BLIP-2 on the shapes world: `build` trains it from nothing; `blip2 demo` runs it."""


@miniature.command()
@click.option("--work", default=MINIATURE_WORK, show_default=True, type=click.Path(file_okay=False))
@click.option("--export", "export_dir", default=None, type=click.Path(file_okay=False), help="Copy the result here.")
@click.option("--quick", is_flag=True, help="A few steps of everything: checks the pipeline, learns nothing.")
@click.pass_context
def build(ctx: click.Context, work: str, export_dir: str | None, quick: bool) -> None:
    """Render the data, pretrain the towers, train stage 1 and stage 2, evaluate; with --export, copy the models,
    sample images and results.json to a folder (`make miniature` exports to examples/miniature).

    A run killed midway goes on where it stopped when run again with the same --work.
    """
    _offline()
    from ..train import miniature as implementation

    ctx.invoke(implementation.build, work=work, export_dir=export_dir, quick=quick)


@miniature.command()
@click.option("--model", default=f"{MINIATURE_EXPORT}/model", show_default=True, type=click.Path(file_okay=False))
@click.option("--work", default=f"{MINIATURE_WORK}-finetune", show_default=True, type=click.Path(file_okay=False))
@click.option("--pair", nargs=2, default=("red", "triangle"), show_default=True, help="COLOUR SHAPE, a held-out pair.")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True)
@click.pass_context
def finetune(ctx: click.Context, model: str, work: str, pair: tuple[str, str], steps: int) -> None:
    """Fine-tune a miniature model (default: the committed one) with LoRA on captions of one colour-shape pair it
    never saw, mixed with seen pairs; prints the caption accuracy on that pair and on seen pairs before and after
    (needs the `train` extra)."""
    _offline()
    from ..train import miniature as implementation

    ctx.invoke(implementation.finetune_command, model=model, work=work, pair=pair, steps=steps)


@miniature.command()
@click.option("--first", default=MINIATURE_EXPORT, show_default=True, type=click.Path(file_okay=False))
@click.option("--work", default=f"{MINIATURE_WORK}-tower", show_default=True, type=click.Path(file_okay=False))
@click.pass_context
def tower(ctx: click.Context, first: str, work: str) -> None:
    """Build the miniature again on a second, different image tower (a `transformers` CLIP tower) with the same
    data, frozen LM and recipe as the exported model in --first; prints both towers' held-out figures and writes
    them to WORK/results.json (about 10-20 minutes on a 2-core CPU; needs the `train` extra)."""
    _offline()
    from ..train import miniature as implementation

    ctx.invoke(implementation.tower_command, first=first, work=work)
