"""`blip2 train CONFIG.yaml`: Q-Former pretraining (stage 1), stage 2 with any LM, fine-tuning (with LoRA).

The YAML holds `blip2.train.TrainConfig` fields; `--set key=value` overrides one (the value is read as YAML, so
`--set steps=100 --set loss_weights={itm: 0}` work). Several processes: `accelerate launch -m blip2.cli train ...`
or `torchrun --nproc-per-node N -m blip2.cli train ...`. A run resumes from `OUT/checkpoint` when it exists.

    blip2 train finetune MODEL DATA.jsonl --lora    fine-tune a checkpoint without writing a config
    blip2 train merge RUN/model OUT                 LoRA adapters merged into a plain checkpoint
"""

from __future__ import annotations

import click


def _overrides(pairs: tuple[str, ...]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        out[key.strip()] = yaml.safe_load(value)
    return out


class _RunByDefault(click.Group):
    """`blip2 train CONFIG.yaml` is `blip2 train run CONFIG.yaml`; `finetune` and `merge` are named."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_RunByDefault)
def train() -> None:
    """Train BLIP-2: `blip2 train CONFIG.yaml` (stage 1, stage 2, fine-tuning), `finetune`, `merge`."""


def _set_options(f):
    f = click.option("--stop-at-step", type=click.IntRange(min=1), default=None, help="Save and stop at this step.")(f)
    f = click.option("--out", default=None, help="Output folder (run: instead of the file's 'out').")(f)
    return click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a setting.")(f)


def _run(cfg) -> None:
    from ..train import train as run

    result = run(cfg)
    if result.model is None:
        click.echo(f"stopped at step {result.step}; checkpoint in {result.out / 'checkpoint'}")
    else:
        click.echo(f"trained {result.step} steps; model in {result.model}")


@train.command("run")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@_set_options
def run_config(config: str, sets: tuple[str, ...], out: str | None, stop_at_step: int | None) -> None:
    """Train BLIP-2 as CONFIG.yaml says; prints where the trained model is."""
    from ..train import TrainConfig

    overrides = _overrides(sets)
    if out is not None:
        overrides["out"] = out
    if stop_at_step is not None:
        overrides["stop_at_step"] = stop_at_step
    _run(TrainConfig.from_yaml(config, overrides))


@train.command()
@click.argument("model")
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--lora/--no-lora", default=False, help="Also train LoRA adapters on the LM (target modules per family).")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=float, default=1e-5, show_default=True, help="Peak learning rate (cosine decay).")
@_set_options
def finetune(
    model: str,
    data: tuple[str, ...],
    lora: bool,
    steps: int,
    batch_size: int,
    lr: float,
    sets: tuple[str, ...],
    out: str | None,
    stop_at_step: int | None,
) -> None:
    """Fine-tune the BLIP-2 checkpoint MODEL on DATA (JSONL of {image, caption} or {image, question, answer}).

    The Q-Former, its queries and the projection train (image encoder and LM frozen), as LAVIS fine-tunes; with
    --lora the LM gets adapters too. Any other TrainConfig setting with --set (e.g. --set mixed_precision=bf16
    --set "lora={r: 16}"). Output: --out (default runs/finetune); the model in OUT/model.
    """
    from ..train import TrainConfig

    cfg = {
        "stage": 2,
        "init": model,
        "out": out or "runs/finetune",
        "data": [{"kind": "jsonl", "path": path} for path in data],
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "min_lr": lr / 10,
        "warmup_steps": min(100, steps // 10),
        "warmup_lr": lr / 100,
        "lora": {} if lora else None,
        "stop_at_step": stop_at_step,
        **_overrides(sets),
    }
    _run(TrainConfig.from_dict(cfg))


@train.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), default=None, help="Default: MODEL/adapter.")
def merge(model: str, out: str, adapter: str | None) -> None:
    """Merge the LoRA adapter of MODEL (a fine-tuned run's model folder) into a plain checkpoint in OUT, which
    transformers' Blip2ForConditionalGeneration and `blip2 caption --dtype int8` load."""
    from ..train.lora import merge as merge_adapter

    click.echo(f"merged into {merge_adapter(model, out, adapter)}")
