"""The web page in a real headless Chromium: upload, caption (equals the API's), a two-turn chat, a visible error."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from server_helpers import data_uri, user_message

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

sync_api = pytest.importorskip("playwright.sync_api", reason="the python package playwright is not installed")
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install chromium) - browser test skipped"
)


@pytest.fixture(scope="module")
def server(start_server, opt_ckpt: Path):
    return start_server(opt_ckpt)


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(server.url + "/")
            yield page
        finally:
            browser.close()


def test_caption_chat_and_error(page, server, images: dict[str, Path]) -> None:
    expect = sync_api.expect
    expect.set_options(timeout=60_000)  # a loaded CI machine may take more than the default 5 s per answer
    page.set_input_files("#file", str(images["rgb"]))
    expect(page.locator("#preview")).to_be_visible()
    expect(page.locator("#caption-btn")).to_be_enabled()

    page.click("#caption-btn")
    caption = page.locator("#caption-result .text")
    expect(caption).not_to_be_empty()
    expect(page.locator("#caption-result .time")).to_contain_text(" s)")
    with httpx.Client(base_url=server.url, timeout=60) as client:
        api = client.post("/v1/caption", files={"file": ("rgb.jpg", images["rgb"].read_bytes())}).json()["text"]
        assert caption.text_content() == api

        for i, question in enumerate(["what is it?", "where is the cat?"], start=1):
            page.fill("#question", question)
            page.click("#ask-btn")
            expect(page.locator("#chat-log li.answer")).to_have_count(i)
        answers = [a.text_content() for a in page.locator("#chat-log li.answer .text").all()]
        uri = data_uri(images["rgb"])
        first = client.post("/v1/chat/completions", json={"messages": [user_message(uri, "what is it?")]})
        assert answers[0] == first.json()["choices"][0]["message"]["content"]
        history = [
            user_message(uri, "what is it?"),
            {"role": "assistant", "content": answers[0]},
            {"role": "user", "content": "where is the cat?"},
        ]
        second = client.post("/v1/chat/completions", json={"messages": history})
        assert answers[1] == second.json()["choices"][0]["message"]["content"]
    expect(page.locator("#chat-log li.answer .time")).to_have_count(2)
    expect(page.locator("#error")).to_be_hidden()

    page.set_input_files("#file", str(images["not_image"]))
    page.click("#caption-btn")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("not an image")
