"""`blip2 train CONFIG.yaml`: Q-Former pretraining (stage 1), stage 2 with any LM, fine-tuning.

The YAML holds `blip2.train.TrainConfig` fields; `--set key=value` overrides one (the value is read as YAML, so
`--set steps=100 --set loss_weights={itm: 0}` work). Several processes: `accelerate launch -m blip2.cli train ...`
or `torchrun --nproc-per-node N -m blip2.cli train ...`. A run resumes from `OUT/checkpoint` when it exists.
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


@click.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a setting of the file.")
@click.option("--out", default=None, help="Output folder (overrides the file's 'out').")
@click.option("--stop-at-step", type=click.IntRange(min=1), default=None, help="Save and stop at this step.")
def train(config: str, sets: tuple[str, ...], out: str | None, stop_at_step: int | None) -> None:
    """Train BLIP-2 as CONFIG.yaml says; prints where the trained model is."""
    from ..train import TrainConfig
    from ..train import train as run

    overrides = _overrides(sets)
    if out is not None:
        overrides["out"] = out
    if stop_at_step is not None:
        overrides["stop_at_step"] = stop_at_step
    result = run(TrainConfig.from_yaml(config, overrides))
    if result.model is None:
        click.echo(f"stopped at step {result.step}; checkpoint in {result.out / 'checkpoint'}")
    else:
        click.echo(f"trained {result.step} steps; model in {result.model}")
