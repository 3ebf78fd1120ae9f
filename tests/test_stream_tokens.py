"""`Blip2.stream` and `Chat.stream`: text pieces as tokens are generated, joined exactly the non-streamed answer."""

from __future__ import annotations

from pathlib import Path

import pytest
from step_gate import StepGate

import blip2
from blip2.errors import GenerationError
from blip2.pipeline import GenerationOptions
from blip2.streaming import stable_prefix

QUESTION = "Question: what is it? Answer:"
# (image, prompt, options, how it ends) on the tiny fixtures; "eos" and "length" are checked, not assumed
CASES = {
    "opt": [
        ("rgb", QUESTION, {}, "eos"),
        ("l", "", {"max_new_tokens": 60}, "length"),
        ("p", "a photo of", {}, "length"),
        ("rgb", "", {"do_sample": True, "top_p": 0.9, "seed": 3, "max_new_tokens": 40}, "length"),
    ],
    "t5": [
        ("cmyk", QUESTION, {}, "either"),  # EOS or length: a near tie on the tiny random T5
        ("p", "", {"max_new_tokens": 60}, "length"),
        ("l", "a photo of", {"do_sample": True, "seed": 3, "max_new_tokens": 40}, "length"),
    ],
}


@pytest.fixture(scope="module")
def models(opt_ckpt: Path, t5_ckpt: Path) -> dict[str, blip2.Blip2]:
    return {kind: blip2.load(ckpt, device="cpu", dtype="fp32") for kind, ckpt in (("opt", opt_ckpt), ("t5", t5_ckpt))}


def ends_at_eos(m: blip2.Blip2, image: Path, prompt: str, options: dict) -> bool:
    """Whether the raw generated ids (special tokens included) hold the LM's end-of-sequence id."""
    opts = GenerationOptions(**options)
    ids, mask = m.tokenize([prompt])
    with m._seeded(opts.seed):
        raw, _ = m.model.generate(m.image_prefix([image]), ids, mask, **opts.hf_kwargs())
    return m.model.language_model.generation_config.eos_token_id in raw[0].tolist()


@pytest.mark.parametrize("kind,case", [(k, c) for k, cases in CASES.items() for c in cases])
def test_pieces_join_to_the_caption(models, images, kind, case) -> None:
    """Otherwise a streamed answer would differ from the same request answered whole (lost or doubled text)."""
    m = models[kind]
    image, prompt, options, ending = case
    whole = m.generate([images[image]], [prompt], **options)[0]
    if ending != "either":
        assert ends_at_eos(m, images[image], prompt, options) == (ending == "eos"), "the fixture case ends otherwise"
    pieces = list(m.stream(images[image], prompt, **options))
    assert "".join(pieces) == whole.text == m.caption(images[image], prompt=prompt, **options)
    assert all(pieces)
    if len(whole.text.split()) > 2:
        assert len(pieces) > 1  # streamed word by word, not given whole at the end


def test_beam_search_gives_one_piece(models, images) -> None:
    """Beam search cannot stream: its answer must still come, whole and exact, as one piece."""
    m = models["opt"]
    expected = m.caption(images["rgb"], "a photo of", num_beams=3)
    assert list(m.stream(images["rgb"], "a photo of", num_beams=3)) == [expected]


def test_several_answers_are_refused(models, images) -> None:
    with pytest.raises(GenerationError, match="num_return_sequences must be 1"):
        models["opt"].stream(images["rgb"], num_return_sequences=2, do_sample=True)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_chat_stream_equals_chat_ask(models, images, kind) -> None:
    """Otherwise a streamed chat would drift from `Chat.ask`: other answers, or a history (and kept cache) that
    differs from the asked one."""
    m = models[kind]
    questions = ["what is it?", "where is the cat?", "what color is it?"]
    asked = m.chat(images["rgb"])
    streamed = m.chat(images["rgb"])
    for q in questions:
        expected = asked.ask(q, max_new_tokens=20)
        assert "".join(streamed.stream(q, max_new_tokens=20)) == expected
    assert streamed.history == asked.history
    assert streamed.last.tokens == asked.last.tokens


def paused_stream(m: blip2.Blip2, gate: StepGate, run, steps: int):
    """Starts `run()` (a stream) with the LM paused after `steps` forward calls; returns (stream, first piece)."""
    gate.pause_after(steps)
    stream = run()
    return stream, next(stream)


@pytest.fixture
def gated(opt_ckpt: Path) -> tuple[blip2.Blip2, StepGate]:
    m = blip2.load(opt_ckpt, device="cpu", dtype="fp32")
    return m, StepGate(m.model.language_model)


def test_first_piece_comes_while_generation_is_paused(gated, images) -> None:
    """Otherwise `stream` would only give text once the whole answer is done (no streaming at all)."""
    m, gate = gated
    whole = m.generate([images["l"]], [""], max_new_tokens=60)[0]
    half = len(whole.tokens) // 2
    assert stable_prefix(m.text(whole.tokens[:half])), "the fixture's answer has no word boundary early enough"
    stream, first = paused_stream(m, gate, lambda: m.stream(images["l"], max_new_tokens=60), half)
    # The generation cannot end before `release()`: a piece in hand now came before the end.
    assert first and whole.text.startswith(first) and first != whole.text
    gate.release()
    assert first + "".join(stream) == whole.text


def test_cancel_stops_generation_and_frees_the_chat(gated, images) -> None:
    """Otherwise an abandoned stream would go on generating to max_new_tokens, or leave a half turn in the chat
    history, or a key/value cache that changes the next answer."""
    m, gate = gated
    chat, fresh = m.chat(images["l"]), m.chat(images["l"])
    for c in (chat, fresh):
        c.ask("what is it?", max_new_tokens=10)
    history = list(chat.history)
    fresh.ask("what is the dog doing?", max_new_tokens=200)
    assert len(fresh.last.tokens) > 40, "the fixture's answer ends before the pause"
    fresh.reset()
    fresh.ask("what is it?", max_new_tokens=10)
    stream, first = paused_stream(m, gate, lambda: chat.stream("what is the dog doing?", max_new_tokens=200), 30)
    assert first
    stream.cancel()
    gate.release()
    stream.close()  # waits for the generation to stop
    assert len(stream.result.tokens) <= 31  # the paused step, then the stopping criterion; not 200
    assert chat.history == history
    assert chat.ask("what color is it?", max_new_tokens=12) == fresh.ask("what color is it?", max_new_tokens=12)
