"""The server on a tiny Flan-T5 checkpoint (encoder-decoder LM): chat and caption equal the Python API's."""

from __future__ import annotations

from pathlib import Path

import httpx
from server_helpers import data_uri, user_message

import blip2


def test_t5_chat_and_caption(start_server, t5_ckpt: Path, images: dict[str, Path]) -> None:
    server = start_server(t5_ckpt)
    model = blip2.load(t5_ckpt, device="cpu", dtype="fp32")
    session = model.chat(images["rgb"])
    first, second = session.ask("what is it?"), session.ask("what color is it?")
    with httpx.Client(base_url=server.url, timeout=60) as client:
        uri = data_uri(images["rgb"])
        r1 = client.post("/v1/chat/completions", json={"messages": [user_message(uri, "what is it?")]})
        assert r1.json()["choices"][0]["message"]["content"] == first
        history = [
            user_message(uri, "what is it?"),
            {"role": "assistant", "content": first},
            {"role": "user", "content": "what color is it?"},
        ]
        r2 = client.post("/v1/chat/completions", json={"messages": history})
        assert r2.json()["choices"][0]["message"]["content"] == second
        cap = client.post("/v1/caption", files={"file": ("rgb.jpg", images["rgb"].read_bytes())})
        assert cap.json()["text"] == model.caption(images["rgb"])
