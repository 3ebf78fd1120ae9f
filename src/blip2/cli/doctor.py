"""`blip2 doctor`: what the machine it runs on can do (memory bandwidth, GEMM rates, the CPU kernels on BLIP-2's layer
shapes), measured in a few seconds, and which dtype and routes blip2 takes on it (`blip2.machine`)."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the table.")
@click.option("--recalibrate", is_flag=True, help="Measure the routes again and replace the cached ones.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads [torch's default].")
def doctor(as_json: bool, recalibrate: bool, threads: int | None) -> None:
    """Measure the limits of the machine it runs on, and print the CPU kernel routes chosen on BLIP-2's layer shapes."""
    import torch

    from ..machine import format_report, report

    if threads is not None:
        torch.set_num_threads(threads)
    r = report(recalibrate)
    click.echo(json.dumps(r) if as_json else format_report(r))
