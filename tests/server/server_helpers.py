"""Helpers of the server tests: the real server in a subprocess on a free loopback port, request builders, checks."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *args: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "blip2",
            "serve",
            "--model",
            str(model),
            "--dtype",
            "fp32",
            "--device",
            "cpu",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *args,
        ]
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)
        self.health_seen: list[int] = []  # /healthz statuses while waiting: shows the 503 "loading" phase

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                r = httpx.get(f"{self.url}/healthz", timeout=2)
                self.health_seen.append(r.status_code)
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


def data_uri(path: Path, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def user_message(image_url: str | None, text: str) -> dict:
    content: list[dict] = [{"type": "text", "text": text}]
    if image_url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return {"role": "user", "content": content}


def assert_error(response: httpx.Response, status: int, code: str | None = None, says: str | None = None) -> dict:
    """OpenAI's error shape, with the expected status, code and a message that names what was wrong."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if says is not None:
        assert says.lower() in error["message"].lower(), error
    return error
