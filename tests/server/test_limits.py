"""A server with tight limits and an API key: 401, 413 (declared and chunked), pixels, max_tokens, history, 503."""

from __future__ import annotations

import http.server
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from server_helpers import assert_error, data_uri, user_message

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def server(start_server, opt_ckpt: Path):
    return start_server(
        opt_ckpt,
        "--api-key",
        KEY,
        "--max-body-mb",
        "0.05",
        "--max-image-pixels",
        "5000",
        "--max-tokens-limit",
        "20",
        "--max-history-turns",
        "2",
        "--max-queue",
        "2",
        "--max-batch-size",
        "1",
        "--allow-remote-images",
    )


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def ask(client: httpx.Client, messages: list[dict], **extra) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"messages": messages, **extra})


def test_api_key(server, client: httpx.Client, images: dict[str, Path]) -> None:
    anonymous = httpx.Client(base_url=server.url, timeout=30)
    assert anonymous.get("/healthz").status_code == 200  # no auth for health checks
    assert anonymous.get("/").status_code == 200  # nor the page, which asks for the key itself
    error = assert_error(anonymous.get("/v1/models"), 401, "invalid_api_key")
    assert error["type"] == "authentication_error"
    wrong = anonymous.post(
        "/v1/caption", headers={"Authorization": "Bearer nope"}, files={"file": ("a.jpg", images["rgb"].read_bytes())}
    )
    assert_error(wrong, 401, "invalid_api_key")
    assert client.get("/v1/models").status_code == 200
    ok = client.post("/v1/caption", files={"file": ("a.jpg", images["rgb"].read_bytes())})
    assert ok.status_code == 200, ok.text


def test_body_limit(client: httpx.Client) -> None:
    big = b"x" * 60_000  # over 0.05 MB
    declared = client.post("/v1/caption", files={"file": ("big.jpg", big)})
    assert_error(declared, 413, "body_too_large", "--max-body-mb")

    def chunks():
        for _ in range(10):
            yield b"y" * 10_000

    chunked = client.post("/v1/caption", content=chunks(), headers={"content-type": "application/json"})
    assert_error(chunked, 413, "body_too_large")
    assert client.get("/healthz").status_code == 200


def test_pixel_tokens_and_history_limits(client: httpx.Client, images: dict[str, Path]) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (100, 100), (9, 99, 199)).save(buf, format="PNG")  # 10000 pixels, a few hundred bytes
    assert_error(
        client.post("/v1/caption", files={"file": ("flat.png", buf.getvalue())}),
        400,
        "invalid_image",
        "too many pixels (limit 5000)",
    )
    uri = data_uri(images["rgb"])  # 50 x 40 = 2000 pixels: under the limit
    assert_error(ask(client, [user_message(uri, "q")], max_tokens=21), 400, "max_tokens_too_large", "20")
    assert ask(client, [user_message(uri, "q")], max_tokens=20).status_code == 200
    assert_error(client.post("/v1/caption", json={"image": uri, "max_new_tokens": 99}), 400, "max_tokens_too_large")
    history = [
        user_message(uri, "q0"),
        {"role": "assistant", "content": "a0"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
    ]
    assert ask(client, [*history, {"role": "user", "content": "q2"}], max_tokens=4).status_code == 200
    longer = [
        *history,
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q3"},
    ]
    assert_error(ask(client, longer), 400, "history_too_long", "3 turns")


def test_remote_images_only_public(client: httpx.Client, images: dict[str, Path]) -> None:
    body = images["rgb"].read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        for url in (
            f"http://127.0.0.1:{httpd.server_address[1]}/a.jpg",
            f"http://localhost:{httpd.server_address[1]}/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/a.jpg",
        ):
            assert_error(ask(client, [user_message(url, "q")]), 400, "unsafe_image_url", "non-public")
        assert_error(ask(client, [user_message("ftp://example.com/a.jpg", "q")]), 400, "invalid_image_url")
    finally:
        httpd.shutdown()


def test_queue_full_answers_503_with_retry_after(server, images: dict[str, Path]) -> None:
    payload = {"messages": [user_message(data_uri(images["rgb"]), "what is it?")], "max_tokens": 20, "min_tokens": 20}

    def send(_: int) -> httpx.Response:
        return httpx.post(
            f"{server.url}/v1/chat/completions", json=payload, timeout=120, headers={"Authorization": f"Bearer {KEY}"}
        )

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(send, range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    busy = [r for r in responses if r.status_code == 503]
    assert busy, "a queue of 2 should overflow with 12 concurrent requests"
    assert busy[0].headers["retry-after"].isdigit()
    assert_error(busy[0], 503, "queue_full", "--max-queue")
    assert any(r.status_code == 200 for r in responses)
    assert httpx.get(f"{server.url}/healthz").status_code == 200
