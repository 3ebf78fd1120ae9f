"""One real server (`python -m blip2 serve`) per test module, started by `start_server`, stopped at teardown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_helpers import Server  # noqa: E402


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """`start_server(ckpt, *flags)` -> a ready `Server`; every server started is stopped at module teardown."""
    started: list[Server] = []

    def start(model: Path, *args: str) -> Server:
        server = Server(model, *args, log=tmp_path_factory.mktemp("server") / "server.log")
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
