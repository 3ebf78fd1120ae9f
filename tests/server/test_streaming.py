"""Token streaming over HTTP: the chunks joined are the non-streamed answer; the first chunk comes before the answer
ends; a client that goes away stops its generation and frees the worker."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
import uvicorn
from server_helpers import data_uri, free_port, user_message
from step_gate import GUARD_S, StepGate

import blip2
from blip2.defaults import ServerSettings
from blip2.server.app import create_app

QUESTIONS = ["what is it?", "what is the dog doing?", ""]  # "" asks for a caption


def chat_payload(image: Path, question: str, **extra) -> dict:
    return {"model": "m", "messages": [user_message(data_uri(image), question)], **extra}


def content_of(chunk_line: str) -> str:
    body = json.loads(chunk_line[len("data: ") :])
    return "".join(c["delta"].get("content", "") for c in body.get("choices", []))


def streamed(client: httpx.Client, payload: dict) -> tuple[str, list[str]]:
    """(joined content, every event line) of a streamed request."""
    with client.stream("POST", "/v1/chat/completions", json={**payload, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return "".join(content_of(line) for line in lines[:-1]), lines


@pytest.mark.parametrize("ckpt", ["opt_ckpt", "t5_ckpt"])
def test_streamed_chunks_join_to_the_answer(request, start_server, images, ckpt) -> None:
    """Otherwise a streaming client would read another answer than a non-streaming one (lost or doubled text)."""
    server = start_server(request.getfixturevalue(ckpt))
    reasons = set()
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for image in ("rgb", "l", "cmyk"):
            for question in QUESTIONS:
                payload = chat_payload(images[image], question, max_tokens=40)
                whole = client.post("/v1/chat/completions", json=payload).json()["choices"][0]
                text, lines = streamed(client, payload)
                assert text == whole["message"]["content"]
                finals = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
                assert [r for r in finals if r] == [whole["finish_reason"]]
                reasons.add(whole["finish_reason"])
    if ckpt == "opt_ckpt":  # both endings were streamed (the tiny T5's EOS case is a near tie, not relied on)
        assert reasons == {"stop", "length"}


# ---- a server in this process, its language model behind a StepGate --------------------------------------------


@pytest.fixture(scope="module")
def gated_server(opt_ckpt: Path):
    """A real HTTP server (uvicorn on a loopback port) whose model pauses where a test says."""
    holder: dict = {}

    def loader() -> blip2.Blip2:
        m = blip2.load(opt_ckpt, device="cpu", dtype="fp32")
        holder["gate"] = StepGate(m.model.language_model)
        real = m.stream

        def recorded(*args, **kwargs):
            stream = real(*args, **kwargs)
            holder.setdefault("streams", []).append(stream)
            return stream

        m.stream = recorded
        return m

    port = free_port()
    settings = ServerSettings(model=str(opt_ckpt), max_batch_size=1, max_tokens_limit=400)
    server = uvicorn.Server(uvicorn.Config(create_app(settings, loader), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=GUARD_S) as client:
        for _ in range(int(GUARD_S * 10)):
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            threading.Event().wait(0.1)
        yield client, holder
    server.should_exit = True
    thread.join(GUARD_S)


def test_first_chunk_before_the_answer_ends(gated_server, images) -> None:
    """Otherwise `stream: true` would send the answer only once it is whole (no time-to-first-token gain)."""
    client, holder = gated_server
    payload = chat_payload(images["l"], "", max_tokens=60)
    whole = client.post("/v1/chat/completions", json=payload).json()["choices"][0]["message"]["content"]
    holder["gate"].pause_after(30)  # the answer cannot end before release()
    with client.stream("POST", "/v1/chat/completions", json={**payload, "stream": True}) as r:
        lines = r.iter_lines()
        first = ""
        while not first:
            first = content_of(next(line for line in lines if line))
        assert whole.startswith(first) and first != whole
        holder["gate"].release()
        rest = [line for line in lines if line]
    assert first + "".join(content_of(x) for x in rest[:-1]) == whole


def test_disconnect_stops_generation(gated_server, images) -> None:
    """Otherwise a client that goes away would keep the (single) worker generating to max_tokens for nobody."""
    client, holder = gated_server
    payload = chat_payload(images["l"], "what is the dog doing?", max_tokens=300)
    whole = client.post("/v1/chat/completions", json=payload).json()
    assert whole["usage"]["completion_tokens"] > 40, "the fixture's answer ends before the pause"
    payload["stream"] = True
    holder["gate"].pause_after(20)
    with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        for line in r.iter_lines():
            if line and content_of(line):
                break  # one content chunk read; leaving the block closes the connection
    stream = holder["streams"][-1]
    for _ in range(int(GUARD_S * 10)):  # the server notices the disconnect and cancels
        if stream.cancelled:
            break
        threading.Event().wait(0.1)
    assert stream.cancelled
    holder["gate"].release()
    after = client.post("/v1/chat/completions", json=chat_payload(images["rgb"], "what is it?", max_tokens=5))
    assert after.status_code == 200  # the worker is free again
    assert stream.result is not None and len(stream.result.tokens) <= 21  # stopped at the paused step, not 300
