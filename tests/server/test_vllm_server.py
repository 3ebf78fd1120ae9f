"""The server with the vLLM engine (`blip2 serve --engine vllm`): each request goes straight to vLLM, which batches
them continuously; answers equal the API's; streamed answers come token by token and add up to the same answer; a
client that disconnects frees its slot."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image
from server_helpers import free_port

from blip2.defaults import ServerSettings
from blip2.server import create_app

pytestmark = pytest.mark.vllm


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(vllm_model, vllm_ckpt) -> Iterator[str]:
    """Our server in a thread of this process, with the session's vLLM engine."""
    import uvicorn

    settings = ServerSettings(model=str(vllm_ckpt), engine="vllm", dtype="fp32", max_tokens_limit=2000)
    app = create_app(settings, loader=lambda: vllm_model)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    yield url
    srv.should_exit = True
    thread.join(10)


def _chat(image: bytes, question: str, max_tokens: int = 12) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


def _prompt(m, question: str) -> str:
    """The prompt the server makes of a one-question chat."""
    from blip2.processing import chat_prompt

    return chat_prompt([], question, lambda s: len(m.tokenizer(s).input_ids), 10_000)


def test_concurrent_answers_equal_the_api(server: str, vllm_model) -> None:
    """8 clients at once: each gets the answer the API gives for its image alone, none waits for a batch to end."""
    images = [_png(i) for i in range(8)]

    async def ask_all() -> list[str]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            rs = await asyncio.gather(*(client.post("/v1/chat/completions", json=_chat(im, "what?")) for im in images))
        return [r.json()["choices"][0]["message"]["content"] for r in rs]

    answers = asyncio.run(ask_all())
    prompt = _prompt(vllm_model, "what?")
    assert answers == [vllm_model.caption(im, prompt=prompt, max_new_tokens=12) for im in images]
    form = {"max_tokens": "9"}
    caption = httpx.post(server + "/v1/caption", files={"file": ("a.png", images[0])}, data=form, timeout=60).json()
    assert caption["text"] == vllm_model.caption(images[0], max_new_tokens=9)


def test_refused_option_is_a_400_naming_it(server: str) -> None:
    """An option vLLM lacks is a client error that says so, not a silent change of decoding."""
    r = httpx.post(server + "/v1/caption", json={"image": base64.b64encode(_png(0)).decode(), "num_beams": 3})
    assert r.status_code == 400
    assert "beam search" in r.json()["error"]["message"]


def _metric(vllm_url: str, prefix: str) -> float:
    """The sum of vLLM's Prometheus metric lines that start with `prefix`."""
    text = httpx.get(vllm_url + "/metrics", timeout=10).text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))


def _running(vllm_url: str) -> float:
    """Requests in vLLM's running batch."""
    return _metric(vllm_url, "vllm:num_requests_running")


def _content(line: str) -> str:
    return "".join(c["delta"].get("content", "") for c in json.loads(line[6:]).get("choices", []))


def _streamed(server: str, payload: dict) -> list[str]:
    """Every event line of a streamed request, [DONE] last."""
    body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return lines[:-1]


def test_streamed_chunks_join_to_the_answer(server: str) -> None:
    """Otherwise a streaming client of `--engine vllm` would read another answer than a non-streaming one, get it
    in one piece at the end (no time-to-first-token gain), or a wrong finish_reason or usage."""
    for seed in range(3):
        payload = _chat(_png(seed), "what?", 12)
        whole = httpx.post(server + "/v1/chat/completions", json=payload, timeout=120).json()
        lines = _streamed(server, payload)
        pieces = [_content(line) for line in lines if _content(line)]
        assert "".join(pieces) == whole["choices"][0]["message"]["content"]
        assert whole["usage"]["completion_tokens"] > 1
        assert len(pieces) > 1, "a multi-token answer came as one chunk"
        chunks = [json.loads(line[6:]) for line in lines]
        finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert finals == [whole["choices"][0]["finish_reason"]]
        assert chunks[-1]["usage"] == whole["usage"]


LONG_ANSWER = 1800  # tokens, exactly: no early end of text, so the answer is still running when the client leaves


def _leaves_mid_answer(server: str, vllm_model, stream: bool, attempts: int = 3) -> None:
    """A client asks for an answer of exactly 1800 tokens and leaves after vLLM's first ones; then vLLM's running
    batch must be empty with fewer than 1800 tokens generated for it, and nothing in flight in the server.

    Up to `attempts` clients in turn, until one's request is aborted: vLLM publishes its token counter in steps,
    and on a 2-core machine the whole answer (~5 s) has now and then ended before the counter showed its first
    token, so that the client could not leave mid-answer; the engine's own cancel frees the slot within 0.1 s."""
    outcomes = []
    for _ in range(attempts):
        outcomes.append(_one_client_leaves(server, vllm_model, stream))
        if outcomes[-1] < LONG_ANSWER:
            break
    assert outcomes[-1] < LONG_ANSWER, f"every request ran to max_tokens: {outcomes} tokens"


def _one_client_leaves(server: str, vllm_model, stream: bool) -> float:
    generated = _metric(vllm_model.url, "vllm:generation_tokens_total")
    body = {**_chat(_png(0), "what?", LONG_ANSWER), "min_tokens": LONG_ANSWER, "stream": stream}

    # a raw socket, closed by hand: an httpx client can keep its connection open after it is done with a response,
    # until it is collected, and then the server never sees this client go
    url = httpx.URL(server)
    data = json.dumps(body).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: application/json\r\n"
    with socket.create_connection((url.host, url.port)) as sock:
        sock.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        deadline = time.monotonic() + 30  # until vLLM has generated a token for it (a counter: never missed)
        while _metric(vllm_model.url, "vllm:generation_tokens_total") <= generated:
            assert time.monotonic() < deadline, "vLLM generated nothing for the request"
            time.sleep(0.005)
        if stream:  # the stream's headers and its first tokens
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        else:
            sock.setblocking(False)
            try:  # the answer's headers come only at its end: none yet, unless the counter was published late
                answered = bool(sock.recv(1))
            except BlockingIOError:
                answered = False
            if answered:  # the client could not leave mid-answer: this attempt shows nothing, the next one tries
                return LONG_ANSWER
    deadline = time.monotonic() + 60  # the connection is closed
    while _running(vllm_model.url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _running(vllm_model.url) == 0
    # the server counts the request out when its stream's close returns, which can be just after vLLM has
    # dropped it from the running batch
    deadline = time.monotonic() + 5
    while httpx.get(server + "/healthz").json()["queued"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server + "/healthz").json()["queued"] == 0
    return _metric(vllm_model.url, "vllm:generation_tokens_total") - generated


def test_disconnected_client_frees_its_slot(server: str, vllm_model) -> None:
    """Otherwise a client that gives up before its (non-streamed) answer would keep its slot in vLLM's running batch
    until max_tokens, generating for nobody."""
    _leaves_mid_answer(server, vllm_model, stream=False)


def test_disconnected_stream_is_aborted_in_vllm(server: str, vllm_model) -> None:
    """Otherwise a streaming client that leaves mid-answer would keep its slot in vLLM's running batch until
    max_tokens, generating for nobody."""
    _leaves_mid_answer(server, vllm_model, stream=True)
