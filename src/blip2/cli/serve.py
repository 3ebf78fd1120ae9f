"""`blip2 serve`: the HTTP server (OpenAI-compatible `/v1/chat/completions`, `/v1/caption`, `/v1/vqa`, web page).

The port opens at once and the model loads in the background (`/healthz` answers 503 until it is ready); if the
model cannot be loaded the server stops and the command exits 2 with the reason.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar

import click

from ..defaults import AUTO_WAIT_MAX_S, AUTO_WAIT_MIN_S, AUTO_WAIT_SHARE, HOST, PORT, ServerSettings
from .options import engine_option, model_options

F = TypeVar("F", bound=Callable[..., Any])

DEFAULTS = {f.name: f.default for f in fields(ServerSettings)}  # the options' defaults: ServerSettings' own


def setting_option(name: str, type_: click.ParamType, help_: str) -> Callable[[F], F]:
    """The option for the ServerSettings field `name` (`--max-queue` for `max_queue`), its default the field's."""
    return click.option(
        "--" + name.replace("_", "-"), type=type_, default=DEFAULTS[name], show_default=True, help=help_
    )


@click.command()
@model_options
@engine_option
@click.option(
    "--host",
    default=HOST,
    show_default=True,
    help="Address to bind; 0.0.0.0 exposes the server to the network (use --api-key then).",
)
@click.option("--port", type=click.IntRange(0, 65535), default=PORT, show_default=True)
@click.option(
    "--served-model-name",
    default=DEFAULTS["served_name"],
    help="Model name reported by the API [the model folder's name].",
)
@setting_option("max_batch_size", click.IntRange(min=1), "Most requests per model call; 1 runs them one by one.")
@click.option(
    "--max-wait-ms",
    type=click.FloatRange(min=0),
    default=DEFAULTS["max_wait_ms"],
    help="How long the oldest waiting request waits for more, counted from when the model is free "
    f"[default: {AUTO_WAIT_SHARE:.0%} of the last batch's time, between {AUTO_WAIT_MIN_S * 1000:g} and "
    f"{AUTO_WAIT_MAX_S * 1000:g} ms].",
)
@setting_option(
    "max_queue", click.IntRange(min=1), "Requests allowed to wait; beyond it the server answers 503 with Retry-After."
)
@click.option(
    "--api-key",
    envvar="BLIP2_API_KEY",
    show_envvar=True,
    default=DEFAULTS["api_key"],
    help="Require 'Authorization: Bearer KEY' on every route except /healthz and the web page.",
)
@click.option(
    "--allow-remote-images",
    is_flag=True,
    default=DEFAULTS["allow_remote_images"],
    help="Fetch http(s) image URLs (public addresses only); otherwise only data: URIs are accepted.",
)
@setting_option("max_body_mb", click.FloatRange(min=0, min_open=True), "Largest request body (413 above).")
@setting_option("max_image_mb", click.FloatRange(min=0, min_open=True), "Largest remote image download.")
@setting_option(
    "remote_timeout_s", click.FloatRange(min=0, min_open=True), "Total time allowed for a remote image download."
)
@setting_option(
    "max_image_pixels",
    click.IntRange(min=1),
    "Largest decoded image (width x height); larger ones are refused as decompression bombs.",
)
@setting_option("max_tokens_limit", click.IntRange(min=1), "Largest max_tokens a request may ask for (400 above).")
@setting_option("max_history_turns", click.IntRange(min=0), "Most question/answer turns in a chat request (400 above).")
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
def serve(
    model: str,
    device: str,
    dtype: str,
    engine: str,
    host: str,
    port: int,
    served_model_name: str | None,
    max_batch_size: int,
    max_wait_ms: float | None,
    max_queue: int,
    api_key: str | None,
    allow_remote_images: bool,
    max_body_mb: float,
    max_image_mb: float,
    remote_timeout_s: float,
    max_image_pixels: int,
    max_tokens_limit: int,
    max_history_turns: int,
    log_level: str,
) -> None:
    """Serve a model over HTTP: OpenAI-compatible chat completions, caption/VQA routes and a web page at /."""
    try:
        import uvicorn

        from ..server import ServerSettings, create_app
    except ImportError as e:
        raise click.ClickException(f"the server needs the 'serve' extra: pip install 'blip2[serve]' ({e})") from e

    settings = ServerSettings(
        model=model,
        device=device,
        dtype=dtype,
        engine=engine,
        served_name=served_model_name,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        api_key=api_key,
        allow_remote_images=allow_remote_images,
        max_body_mb=max_body_mb,
        max_image_mb=max_image_mb,
        remote_timeout_s=remote_timeout_s,
        max_image_pixels=max_image_pixels,
        max_tokens_limit=max_tokens_limit,
        max_history_turns=max_history_turns,
    )
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_error(e: BaseException) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_error=on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False))
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        click.echo(f"warning: serving on {host} without --api-key; anyone who can reach it can use it", err=True)
    server.run()
    if failed:
        click.echo(f"error: could not load {model}: {failed[0]}", err=True)
        sys.exit(2)
