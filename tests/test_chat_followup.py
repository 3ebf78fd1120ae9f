"""A chat follow-up turn runs only its new tokens through the language model (pipeline.Chat keeps the LM's cache)."""

from __future__ import annotations

import blip2


def test_followup_turn_runs_only_the_new_positions(opt_ckpt, images):
    """If this fails, every follow-up turn re-runs the image's query tokens and all earlier turns through the LM
    (on a CPU seconds per turn; transformers' own follow-up does that)."""
    m = blip2.load(opt_ckpt, device="cpu", dtype="fp32")
    positions = []

    def count(mod, args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("inputs_embeds") is None else kwargs["inputs_embeds"]
        positions.append(x.shape[1])

    hook = m.model.language_model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        chat = m.chat(images["rgb"])
        chat.ask("what is it?", max_new_tokens=4, min_new_tokens=4)
        followup = len(m.tokenize([chat.prompt_for("and the colour?")])[0][0])  # its prompt: history + question
        earlier = m.config.num_query_tokens + len(m.tokenizer("Question: what is it? Answer:").input_ids)
        positions.clear()
        chat.ask("and the colour?", max_new_tokens=4, min_new_tokens=4)
    finally:
        hook.remove()
    full = m.config.num_query_tokens + followup  # what recomputing the whole conversation runs in its prefill
    assert len(positions) == 4  # one prefill, then one position per further new token
    assert positions[1:] == [1, 1, 1]
    assert positions[0] <= full - earlier  # the queries and the first turn's prompt came from the cache
