"""Chat keeps its history within a budget and reuses the image (and the LM's cache) between turns."""

from __future__ import annotations

import pytest

import blip2
from blip2.processing import chat_prompt


@pytest.fixture(scope="module", params=["opt", "t5"])
def model(request, opt_ckpt, t5_ckpt):
    return blip2.load(opt_ckpt if request.param == "opt" else t5_ckpt, device="cpu", dtype="fp32")


QUESTIONS = ["what is it?", "what colour is the cat?", "where is the table?", "is it big?"]


def test_chat_answers_equal_full_recomputation(model, images):
    """If this fails, reusing the cache between turns changes the answers (the reference recomputes all)."""
    chat = model.chat(images["rgb"])
    history = []
    for q in QUESTIONS:
        answer = chat.ask(q, max_new_tokens=10)
        prompt = chat_prompt(history, q, lambda s: len(model.tokenizer(s).input_ids), 512 - 8)
        expected = model.generate([images["rgb"]], [prompt], max_new_tokens=10)[0].text
        assert answer == expected
        history.append((q, answer))
    assert chat.history == history


def test_chat_runs_the_image_side_once(model, images):
    """If this fails, every chat turn pays for the vision encoder again (seconds per turn on a CPU)."""
    calls = []
    hook = model.model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        model._cache.clear()
        chat = model.chat(images["large"])
        for q in QUESTIONS[:3]:
            chat.ask(q, max_new_tokens=5)
        model.ask(images["large"], "one more question?")
    finally:
        hook.remove()
    assert len(calls) == 1


def test_kv_cache_is_reused_for_decoder_only(opt_ckpt, images):
    """If this fails, follow-up turns re-run the whole conversation through the LM."""
    m = blip2.load(opt_ckpt, dtype="fp32")
    seen = []
    hook = m.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs.get("input_ids"), kwargs.get("inputs_embeds"))),
        with_kwargs=True,
    )
    chat = m.chat(images["rgb"])
    chat.ask("what is it?", max_new_tokens=3)
    seen.clear()
    chat.ask("and the colour?", max_new_tokens=3)
    hook.remove()
    first_ids, first_embeds = seen[0]
    prompt_len = 8 + len(m.tokenizer(chat.prompt_for("x")).input_ids)
    assert first_embeds is None and first_ids.shape[1] < prompt_len  # only the new tokens were run


def test_budget_drops_oldest_turns_and_keeps_question(model, images):
    """If this fails, long chats overflow the LM's context or lose the question being asked."""
    last_two = "Question: old question number 5? Answer: answer 5. Question: what now? Answer:"
    budget = len(model.tokenizer(last_two).input_ids) + 2  # room for the newest turn, not for two
    chat = model.chat(images["rgb"], context=8 + budget)
    for i in range(6):
        chat.history.append((f"old question number {i}?", f"answer {i}"))
    prompt = chat.prompt_for("what now?")
    assert prompt.endswith("Question: what now? Answer:")
    assert "old question number 4" not in prompt and "old question number 5" in prompt
    assert len(model.tokenizer(prompt).input_ids) <= budget
    assert isinstance(chat.ask("what now?", max_new_tokens=3), str)


def test_reset_and_new_image(model, images):
    """If this fails, /reset keeps old turns or /image keeps answering about the old picture."""
    chat = model.chat(images["rgb"])
    first = chat.ask("what is it?", max_new_tokens=6)
    chat.ask("and then?", max_new_tokens=6)
    chat.reset()
    assert chat.history == [] and chat.ask("what is it?", max_new_tokens=6) == first
    chat.set_image(images["large"])
    assert chat.history == []
    assert chat.ask("what is it?", max_new_tokens=6) == model.ask(images["large"], "what is it?", max_new_tokens=6)


def test_bad_image_fails_at_chat_start(model, images):
    """If this fails, a chat opens on a broken file and crashes at the first question."""
    with pytest.raises(blip2.ImageError, match="truncated"):
        model.chat(images["truncated"])
