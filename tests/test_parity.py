"""Same weights => same logits and the same tokens as `transformers`' BLIP-2 classes (the bar for correctness)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor

import blip2
from blip2.processing import load_image

PROMPTS = ["", "a photo of", "Question: what is on the table? Answer:"]


@pytest.fixture(scope="module", params=["opt", "t5"])
def pair(request, opt_ckpt, t5_ckpt):
    """(our model, reference model, reference processor) on the same tiny checkpoint."""
    folder = opt_ckpt if request.param == "opt" else t5_ckpt
    ours = blip2.load(folder, device="cpu", dtype="fp32")
    ref = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    proc = Blip2Processor.from_pretrained(folder)
    proc.tokenizer.padding_side = "left" if request.param == "opt" else "right"
    return ours, ref, proc


def _images(images, n):
    return [load_image(images[k]) for k in ["rgb", "large", "rgba"][:n]]


def _ref_inputs(proc, imgs, prompts):
    return proc(images=imgs, text=prompts, padding=True, return_tensors="pt")


@pytest.mark.parametrize("n", [1, 3])
def test_logits_match_reference(pair, images, n):
    """If this fails, our captions differ from transformers' for the same checkpoint."""
    ours, ref, proc = pair
    imgs, prompts = _images(images, n), PROMPTS[:n]
    inputs = _ref_inputs(proc, imgs, prompts)
    ids, mask = ours.tokenize(prompts)
    kw = {}
    if ours.model.is_encoder_decoder:
        kw["decoder_input_ids"] = torch.tensor([[0, 5, 9, 17]] * n)
    with torch.no_grad():
        expected = ref(**inputs, **kw).logits
        got = ours.model(ids, mask, pixel_values=ours.pixel_values(imgs), **kw).logits
    assert torch.equal(inputs.pixel_values, ours.pixel_values(imgs))
    assert got.shape == expected.shape
    real = torch.cat([torch.ones(n, ours.config.num_query_tokens), mask], 1).bool()
    if not ours.model.is_encoder_decoder:  # padded positions' logits are meaningless in both
        got, expected = got[real], expected[real]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("beams", [1, 3])
def test_generation_matches_reference(pair, images, n, beams):
    """If this fails, greedy or beam-search outputs differ from transformers' token for token."""
    ours, ref, proc = pair
    imgs, prompts = _images(images, n), PROMPTS[:n]
    inputs = _ref_inputs(proc, imgs, prompts)
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=12, num_beams=beams)
    if not ours.model.is_encoder_decoder:
        out = out[:, inputs.input_ids.shape[1] :]
    expected = proc.tokenizer.batch_decode(out, skip_special_tokens=True)
    got = ours.generate(imgs, prompts, max_new_tokens=12, num_beams=beams)
    assert [g.text for g in got] == [e.strip() for e in expected]
    specials = set(proc.tokenizer.all_special_ids)
    assert [g.tokens for g in got] == [[t for t in row if t not in specials] for row in out.tolist()]
    assert len({g.text for g in got}) == n  # the fixture model really distinguishes inputs


def test_greedy_score_is_the_references_log_probability(pair, images):
    """If this fails, a caption's `score` is not the summed log-probability of its tokens that transformers'
    `compute_transition_scores` gives for the same generation (users rank and filter captions by it)."""
    ours, ref, proc = pair
    imgs, prompts = _images(images, 3), PROMPTS
    with torch.no_grad():
        out = ref.generate(
            **_ref_inputs(proc, imgs, prompts), max_new_tokens=12, return_dict_in_generate=True, output_scores=True
        )
    steps = ref.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    tokens = out.sequences[:, -steps.shape[1] :]
    is_eos = tokens == ref.generation_config.eos_token_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    want = steps.masked_fill(after_eos, 0.0).sum(dim=1)
    got = ours.generate(imgs, prompts, max_new_tokens=12)
    # fp32 sums of 12 log-probabilities, reduced in another order: equal to a few ulps of the total, not to 1e-4
    assert [g.score for g in got] == pytest.approx(want.tolist(), rel=2e-5, abs=1e-4)


def _recorded_and_kept_scores(lm, **kwargs):
    """Greedy scores as `scored_generate` records them step by step, and as `sequence_scores` sums them from
    every step's kept scores (`output_scores`), for the same generation."""
    from blip2.model import scored_generate, sequence_scores

    calls = []
    generate = lm.generate
    lm.generate = lambda **kw: calls.append(kw) or generate(**kw)
    torch.manual_seed(0)  # the same draws for both, when sampling
    try:
        out, recorded = scored_generate(lm, **kwargs)
    finally:
        del lm.generate  # the class's method again
    torch.manual_seed(0)
    kept = generate(**kwargs, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(kept.sequences, out.sequences)
    return calls[0], recorded, sequence_scores(lm, kept)


def test_greedy_scores_are_recorded_step_by_step_not_kept_for_every_step(pair, images):
    """If this fails, greedy captioning keeps every step's scores over the whole vocabulary until the end (a batch
    of 32 with 100 new tokens over OPT's vocabulary: 640 MB), or the scores recorded step by step differ from the
    summed log-probabilities of the kept ones, including for a sequence that ends before the others."""
    ours, _, _ = pair
    model, lm = ours.model, ours.model.language_model
    imgs = _images(images, 3)
    ids, mask = ours.tokenize(PROMPTS)
    embeds, full_mask = model.lm_inputs(model.image_prefix(ours.pixel_values(imgs)), ids, mask)
    kw = dict(inputs_embeds=embeds, attention_mask=full_mask, max_new_tokens=8)
    if not model.is_encoder_decoder:
        kw["input_ids"] = model.placeholder_ids(ids)
    plain = lm.generate(**kw)
    # a word the first row chooses at its third step ends that row there while the others go on
    eos = int(plain[0, -6])
    call, recorded, kept = _recorded_and_kept_scores(lm, **kw, eos_token_id=eos)
    assert call["output_scores"] is False
    torch.testing.assert_close(recorded, kept, rtol=0, atol=0)
    finished = lm.generate(**kw, eos_token_id=eos)
    assert (finished[0, -5:] == (lm.generation_config.pad_token_id or 0)).all()  # the row did end early
    call, _, _ = _recorded_and_kept_scores(lm, **kw, do_sample=True, temperature=0.7)
    assert call["output_scores"] is True  # sampling: the warpers come after any processor given


def test_batch_equals_one_by_one(pair, images):
    """If this fails, captioning a folder in batches gives different captions than one at a time."""
    ours, _, _ = pair
    imgs = _images(images, 3)
    batched = ours.generate(imgs, PROMPTS, max_new_tokens=12)
    alone = [ours.generate([im], [p], max_new_tokens=12)[0] for im, p in zip(imgs, PROMPTS)]
    assert [g.tokens for g in batched] == [g.tokens for g in alone]
    for b, a in zip(batched, alone):
        assert b.score == pytest.approx(a.score, abs=1e-4)


def test_a_large_batch_passes_the_vision_encoder_in_chunks_with_the_same_features(pair):
    """If this fails, a large CPU batch runs the vision encoder on all its images at once (slower, and its
    activations grow with the batch), or the chunks change the features the captions come from."""
    ours, _, _ = pair
    from blip2.model import CPU_VISION_CHUNK as n

    size = ours.model.config.vision_config.image_size
    px = torch.randn(2 * n + 3, 3, size, size)
    passes = []
    hook = ours.model.vision_model.register_forward_pre_hook(lambda mod, args: passes.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            chunked = ours.model.encode_image(px)
            whole = ours.model.vision_model(px)
    finally:
        hook.remove()
    assert passes == [n, n, 3, 2 * n + 3]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded(pair, images):
    """If this fails, `seed` does not make sampled captions reproducible."""
    ours, _, _ = pair
    img = _images(images, 1)
    a = ours.caption(img, do_sample=True, top_p=0.9, temperature=1.5, seed=7)
    b = ours.caption(img, do_sample=True, top_p=0.9, temperature=1.5, seed=7)
    assert a == b


def test_outputs_are_stripped_of_prompt_and_specials(pair, images):
    """If this fails, users see the prompt or </s>/<pad> in their captions."""
    ours, _, proc = pair
    img = _images(images, 1)[0]
    for g in ours.generate([img, img], ["a photo of", ""], max_new_tokens=8):
        assert not g.text.startswith("a photo of")
        assert not set(g.tokens) & set(proc.tokenizer.all_special_ids)
        assert g.text == g.text.strip()


@pytest.fixture(scope="module")
def itm_pair(itm_ckpt):
    ours = blip2.load(itm_ckpt, device="cpu", dtype="fp32")
    ref = Blip2ForImageTextRetrieval.from_pretrained(itm_ckpt, dtype=torch.float32).eval()
    return ours, ref, Blip2Processor.from_pretrained(itm_ckpt)


def test_itc_itm_match_reference(itm_pair, images):
    """If this fails, retrieval scores (ITC similarity, ITM probability) differ from transformers'."""
    ours, ref, proc = itm_pair
    imgs = _images(images, 2)
    texts = ["a red cat on a table", "a dog in the snow", "two birds"]
    sim = ours.similarity(imgs, texts)  # (2, 3)
    itm = ours.match(imgs, texts)
    for i, im in enumerate(imgs):
        inputs = proc(images=[im], text=texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            itc_ref = ref(**inputs, use_image_text_matching_head=False).logits_per_image[0]  # (3,)
            itm_ref = []
            for t in texts:
                one = proc(images=[im], text=[t], return_tensors="pt")
                itm_ref.append(ref(**one, use_image_text_matching_head=True).logits_per_image.softmax(-1)[0, 1])
        torch.testing.assert_close(sim[i], itc_ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(itm[i], torch.stack(itm_ref), atol=1e-4, rtol=0)
    assert sim.std() > 1e-3 and itm.std() > 1e-3


def test_itm_batched_both_ways(itm_pair, images):
    """If this fails, scoring one text against many images disagrees with scoring them one by one."""
    ours, _, _ = itm_pair
    imgs = _images(images, 3)
    texts = ["a red cat", "a blue car on the street"]
    full = ours.match(imgs, texts)
    for i, im in enumerate(imgs):
        torch.testing.assert_close(ours.match([im], texts)[0], full[i], atol=1e-5, rtol=0)
    for j, t in enumerate(texts):
        torch.testing.assert_close(ours.match(imgs, [t])[:, 0], full[:, j], atol=1e-5, rtol=0)


def test_retrieval_checkpoint_refuses_generation(itm_pair, images):
    """If this fails, captioning with a retrieval-only checkpoint crashes with a confusing error."""
    ours, _, _ = itm_pair
    with pytest.raises(blip2.ConfigError, match="no language model"):
        ours.caption(Image.new("RGB", (8, 8)))
