"""The real server on a tiny OPT checkpoint: answers equal the Python API's, OpenAI shapes, batching, bad requests."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from server_helpers import assert_error, b64, data_uri, user_message

import blip2


@pytest.fixture(scope="module")
def server(start_server, opt_ckpt: Path):
    return start_server(opt_ckpt)


@pytest.fixture(scope="module")
def model(opt_ckpt: Path) -> blip2.Blip2:
    return blip2.load(opt_ckpt, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def chat(client: httpx.Client, messages: list[dict], **extra) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": "anything", "messages": messages, **extra})


# ---- happy paths ---------------------------------------------------------------------------------------------------


def test_health_and_models(client: httpx.Client) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"


def test_chat_two_turns_equal_python_chat(client: httpx.Client, model: blip2.Blip2, images: dict[str, Path]) -> None:
    session = model.chat(images["rgb"])
    expected = [session.ask("what is it?"), session.ask("where is the cat?")]
    first = chat(client, [user_message(data_uri(images["rgb"]), "what is it?")])
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int) and body["model"]
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"] == expected[0]
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    second = chat(
        client,
        [
            {"role": "system", "content": "You are helpful."},  # ignored, as documented
            user_message(data_uri(images["rgb"]), "what is it?"),
            {"role": "assistant", "content": expected[0]},
            {"role": "user", "content": "where is the cat?"},
        ],
    )
    assert second.status_code == 200, second.text
    assert second.json()["choices"][0]["message"]["content"] == expected[1]


def test_empty_question_is_a_caption(client: httpx.Client, model: blip2.Blip2, images: dict[str, Path]) -> None:
    r = chat(client, [{"role": "user", "content": [{"type": "image_url", "image_url": data_uri(images["p"])}]}])
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == model.caption(images["p"])


def test_stream_is_openai_sse(client: httpx.Client, model: blip2.Blip2, images: dict[str, Path]) -> None:
    expected = model.chat(images["l"]).ask("what color is the car?", max_new_tokens=12)
    payload = {
        "messages": [user_message(data_uri(images["l"]), "what color is the car?")],
        "stream": True,
        "max_tokens": 12,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_n_seed_and_beams(client: httpx.Client, images: dict[str, Path]) -> None:
    messages = [user_message(data_uri(images["rgb"]), "what is it?")]
    sampled = [chat(client, messages, n=3, temperature=0.9, top_p=0.9, seed=7, max_tokens=6) for _ in range(2)]
    texts = [[c["message"]["content"] for c in r.json()["choices"]] for r in sampled]
    assert len(texts[0]) == 3 and texts[0] == texts[1]  # seeded sampling is reproducible
    beams = chat(client, messages, n=2, num_beams=2, max_tokens=6)
    assert beams.status_code == 200 and [c["index"] for c in beams.json()["choices"]] == [0, 1]
    assert_error(chat(client, messages, n=2), 400, "invalid_options", "n must be <= num_beams")


def test_caption_and_vqa_routes(client: httpx.Client, model: blip2.Blip2, images: dict[str, Path]) -> None:
    raw = images["rgb"].read_bytes()
    up = client.post("/v1/caption", files={"file": ("rgb.jpg", raw, "image/jpeg")})
    assert up.status_code == 200, up.text
    assert up.json()["text"] == model.caption(images["rgb"]) and up.json()["time_s"] > 0
    prompted = client.post(
        "/v1/caption", files={"file": ("rgb.jpg", raw)}, data={"prompt": "a photo of", "max_new_tokens": "8"}
    )
    assert prompted.json()["text"] == model.caption(images["rgb"], prompt="a photo of", max_new_tokens=8)
    as_json = client.post("/v1/caption", json={"image": b64(raw), "num_beams": 2, "max_tokens": 10})
    assert as_json.json()["text"] == model.caption(images["rgb"], num_beams=2, max_new_tokens=10)
    vqa = client.post("/v1/vqa", files={"file": ("x.jpg", raw)}, data={"question": "what is it?"})
    assert vqa.json()["text"] == model.ask(images["rgb"], "what is it?")
    vqa_json = client.post("/v1/vqa", json={"image": data_uri(images["rgb"]), "question": "where is the dog?"})
    assert vqa_json.json()["text"] == model.ask(images["rgb"], "where is the dog?")


def test_concurrent_requests_batch_and_equal_sequential(server, images: dict[str, Path]) -> None:
    names = ["rgb", "rgba", "l", "p", "cmyk", "i16", "exif_rot", "large"]
    questions = [
        "what is it?",
        "where is the cat?",
        "",
        "what color is the dog?",
        "how many cars are there?",
        "",
        "is there a bus in the picture?",
        "what is the man doing?",
    ]
    payloads = [{"messages": [user_message(data_uri(images[n]), q)], "max_tokens": 8} for n, q in zip(names, questions)]

    def send(payload: dict) -> str:
        r = httpx.post(f"{server.url}/v1/chat/completions", json=payload, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    sequential = [send(p) for p in payloads]
    before = httpx.get(f"{server.url}/healthz").json()["batches"]
    with ThreadPoolExecutor(len(payloads)) as pool:
        concurrent = list(pool.map(send, payloads))
    after = httpx.get(f"{server.url}/healthz").json()["batches"]
    assert concurrent == sequential
    assert after["requests"] - before["requests"] == len(payloads)
    assert after["batches"] - before["batches"] < len(payloads), "concurrent requests were not batched"
    assert after["largest"] > 1


def test_web_page_is_served(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="caption-btn"' in page.text
    assert client.get("/static/app.js").status_code == 200


# ---- bad requests --------------------------------------------------------------------------------------------------


def png_bomb() -> bytes:
    """20000 x 20000 (400 MP) mode-1 PNG: a few KB on the wire, gigabytes decoded."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_bad_json_and_schema(client: httpx.Client, images: dict[str, Path]) -> None:
    broken = client.post(
        "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    assert_error(broken, 400, "invalid_json", "invalid JSON")
    assert_error(client.post("/v1/chat/completions", json={"model": "x"}), 400, "invalid_request", "messages")
    bad_role = {"messages": [{"role": "robot", "content": "hi"}]}
    assert_error(client.post("/v1/chat/completions", json=bad_role), 400, "invalid_request", "role")
    bad_type = {"messages": [user_message(data_uri(images["rgb"]), "hi")], "max_tokens": "lots"}
    assert_error(client.post("/v1/chat/completions", json=bad_type), 400, "invalid_request", "max_tokens")
    assert_error(client.post("/v1/chat/completions", json=[1, 2]), 400, None, "JSON object")
    assert_error(
        client.post("/v1/caption", content=b"{nope", headers={"content-type": "application/json"}), 400, "invalid_json"
    )
    assert_error(
        client.post("/v1/caption", json={"image": b64(b"x"), "colour": "red"}), 400, "invalid_request", "colour"
    )
    assert_error(client.post("/v1/caption", content=b"hi", headers={"content-type": "text/plain"}), 415)
    assert_error(client.get("/v1/nothing"), 404)


@pytest.mark.parametrize("name, says", [("not_image", "not an image"), ("truncated", "truncated"), ("empty", "empty")])
def test_bad_image_files(client: httpx.Client, images: dict[str, Path], name: str, says: str) -> None:
    raw = images[name].read_bytes()
    up = client.post("/v1/caption", files={"file": (images[name].name, raw)})
    error = assert_error(up, 400, None, says)
    assert images[name].name in error["message"]  # names the uploaded file
    if raw:  # an empty data: URI is a base64 problem, tested below
        assert_error(chat(client, [user_message(data_uri(images[name]), "hi")]), 400, "invalid_image", says)


def test_image_bomb_is_refused(client: httpx.Client) -> None:
    bomb = png_bomb()
    assert len(bomb) < 200_000
    assert_error(client.post("/v1/caption", files={"file": ("bomb.png", bomb)}), 400, "invalid_image", "too large")
    uri = f"data:image/png;base64,{b64(bomb)}"
    assert_error(chat(client, [user_message(uri, "")]), 400, "invalid_image", "too large")


def test_bad_base64_and_urls(client: httpx.Client, images: dict[str, Path]) -> None:
    assert_error(client.post("/v1/caption", json={"image": "not base64!!"}), 400, "invalid_base64", "base64")
    assert_error(chat(client, [user_message("data:image/png;base64,%%%", "hi")]), 400, "invalid_base64")
    assert_error(chat(client, [user_message("data:image/png,rawbytes", "hi")]), 400, "invalid_image_url")
    assert_error(
        chat(client, [user_message("https://example.com/cat.jpg", "hi")]),
        400,
        "remote_images_disabled",
        "--allow-remote-images",
    )
    assert_error(chat(client, [user_message("file:///etc/passwd", "hi")]), 400, "remote_images_disabled")
    assert_error(client.post("/v1/caption", json={"prompt": "a"}), 400, "no_image")
    raw = images["rgb"].read_bytes()
    assert_error(client.post("/v1/vqa", files={"file": ("a.jpg", raw)}), 400, "no_question")


def test_conversation_rules(client: httpx.Client, images: dict[str, Path]) -> None:
    uri = data_uri(images["rgb"])
    assert_error(chat(client, [{"role": "user", "content": "hi"}]), 400, "image_count", "found 0")
    two = [user_message(uri, "a"), {"role": "assistant", "content": "b"}, user_message(uri, "c")]
    assert_error(chat(client, two), 400, "image_count", "found 2")
    ends_with_answer = [user_message(uri, "a"), {"role": "assistant", "content": "b"}]
    assert_error(chat(client, ends_with_answer), 400, "invalid_message", "last")
    starts_with_answer = [{"role": "assistant", "content": "hello"}, user_message(uri, "a")]
    assert_error(chat(client, starts_with_answer), 400, "invalid_message", "start")
    too_many = [user_message(uri, "q")]
    too_many += [
        m for i in range(21) for m in ({"role": "assistant", "content": "a"}, {"role": "user", "content": f"q{i}"})
    ]
    assert_error(chat(client, too_many), 400, "history_too_long", "21 turns")
    assert_error(chat(client, [user_message(uri, "a")], max_tokens=257), 400, "max_tokens_too_large", "256")


def test_still_serving_after_bad_requests(client: httpx.Client, images: dict[str, Path]) -> None:
    assert client.get("/healthz").status_code == 200
    r = chat(client, [user_message(data_uri(images["tiny"]), "what is it?")])
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
