"""`blip2.load(..., compile=True)`: decoding with a static KV cache and a compiled step gives the same tokens."""

from __future__ import annotations

import pytest

import blip2


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_compiled_decoding_gives_the_eager_tokens(kind, opt_ckpt, t5_ckpt, images):
    """If this fails, `compile=True` changes answers (a stale static cache, a wrong position after the prompt, a
    recompiled step for a new length that reads the old shapes) instead of only making decoding cheaper."""
    folder = opt_ckpt if kind == "opt" else t5_ckpt
    eager, compiled = blip2.load(folder, dtype="fp32"), blip2.load(folder, dtype="fp32", compile=True)
    pics = [images["rgb"], images["rgba"]]
    prompts = ["", "Question: what is in the picture? Answer:"]  # two prompt lengths: a recompile with new shapes
    for gen in ({"max_new_tokens": 12}, {"max_new_tokens": 7, "num_beams": 3}, {"max_new_tokens": 9}):
        want = eager.generate(pics, prompts, **gen)
        got = compiled.generate(pics, prompts, **gen)
        assert [g.tokens for g in got] == [g.tokens for g in want], gen
        assert [g.score for g in got] == pytest.approx([g.score for g in want], abs=1e-4)
    assert compiled.model.language_model._compiled_call is not None  # it did compile, not silently run eager


def test_compile_is_off_by_default(opt_ckpt):
    """If this fails, every user pays tens of seconds of compilation on their first caption."""
    m = blip2.load(opt_ckpt, dtype="fp32")
    assert m.model.compile_decoding is False and m.model._decoding_kwargs() == {}


def test_compiled_decoding_of_an_int8_model_gives_its_eager_tokens(opt_ckpt, images):
    """If this fails, `dtype="int8", compile=True` crashes while compiling (torch's inductor cannot lower the int8
    kernel fed by a fused conversion) or decodes other tokens than the same int8 model without compiling."""
    eager, compiled = (blip2.load(opt_ckpt, dtype="int8", compile=c) for c in (False, True))
    eager.model.kv_storage = None  # compiled decoding keeps transformers' static cache, in the arithmetic's dtype
    pics, prompts = [images["rgb"]], ["a photo of"]
    want = eager.generate(pics, prompts, max_new_tokens=10)
    assert [g.tokens for g in compiled.generate(pics, prompts, max_new_tokens=10)] == [g.tokens for g in want]
