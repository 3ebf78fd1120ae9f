"""`blip2 serve`: its flags, and a model that cannot load stops the server with exit code 2 and the reason."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from server_helpers import free_port

from blip2.cli import main
from blip2.cli.serve import serve
from blip2.defaults import ServerSettings


def test_help_lists_flags() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    for flag in (
        "--host",
        "--port",
        "--max-batch-size",
        "--max-wait-ms",
        "--max-queue",
        "--api-key",
        "--allow-remote-images",
        "--max-body-mb",
        "--max-image-pixels",
        "--max-tokens-limit",
        "--max-history-turns",
    ):
        assert flag in result.output


def test_option_defaults_are_the_server_settings_defaults() -> None:
    """One place for each default: `blip2 serve` with no options must build the ServerSettings() a Python user gets."""
    fields = {f.name: f for f in dataclasses.fields(ServerSettings)}
    options = {p.name: p for p in serve.params}
    renamed = {"served_model_name": "served_name"}
    checked = 0
    for name, param in options.items():
        field = fields.get(renamed.get(name, name))
        if field is not None and field.default is not dataclasses.MISSING:
            assert param.default == field.default, name
            checked += 1
    assert checked >= 14


def test_unloadable_model_exits_2(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "blip2",
        "serve",
        "--model",
        str(tmp_path / "missing"),
        "--port",
        str(free_port()),
        "--log-level",
        "error",
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    )
    assert done.returncode == 2, done.stderr
    assert "could not load" in done.stderr and "missing" in done.stderr
