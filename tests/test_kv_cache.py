"""The LM's key/value cache during generation is written in place into reserved buffers (kv_cache.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import blip2
from blip2.kv_cache import ReservedCache, reserved_cache


@pytest.fixture(scope="module")
def fp32(opt_ckpt):
    return blip2.load(opt_ckpt, device="cpu", dtype="fp32")


def _generate(m, images, cache_factory=None, **gen):
    """`Blip2Model.generate` on three images, with the cache `cache_factory()` gives (None: the model's own)."""
    pics = [images["rgb"], images["rgba"], images["l"]]
    prompts = ["a photo of", "Question: what is it? Answer:", ""]
    ids, mask = m.tokenize(prompts)
    prefix = m.image_prefix(pics, prompts)
    extra = {} if cache_factory is None else {"cache": cache_factory()}
    return m.model.generate(prefix, ids, mask, max_new_tokens=8, **gen, **extra)


@pytest.mark.parametrize("gen", [{}, {"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2}])
def test_fp32_generation_is_transformers_own_bit_for_bit(fp32, images, gen):
    """If this fails, the in-place cache changes fp32 tokens or scores against transformers' concatenating cache
    (fp32 must stay token-identical to the reference; beam search reorders the cache every step)."""
    tokens, scores = _generate(fp32, images, **gen)
    want_tokens, want_scores = _generate(fp32, images, DynamicCache, **gen)
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(scores, want_scores)


def test_steps_write_into_buffers_reserved_once(fp32, images):
    """If this fails, each decoding step allocates the whole cache anew (for a batch of prompts a copy of every
    layer's keys and values per step, and a fragmented heap)."""
    m = fp32.model
    ids, mask = fp32.tokenize(["a photo of"])
    positions = m.config.num_query_tokens + ids.shape[1] + 6
    cache = m.new_cache(positions - 6, {"max_new_tokens": 6})
    assert isinstance(cache, ReservedCache)
    seen = set()

    def note(module, args, output):
        layer = cache.layers[0]
        seen.add((layer._buffers[0].data_ptr(), layer._buffers[0].shape[-2]))

    hook = m.language_model.get_decoder().layers[0].register_forward_hook(note)
    try:
        m.generate(fp32.image_prefix([images["rgb"]], ["a photo of"]), ids, mask, max_new_tokens=6, cache=cache)
    finally:
        hook.remove()
    assert len(seen) == 1 and next(iter(seen))[1] == positions
    assert cache.get_seq_length() == positions - 1  # the last token is generated, not cached


def test_buffers_grow_and_crop_for_a_chat():
    """If this fails, a chat's later turn (longer than the first turn's reservation) or its crop back to the common
    prefix loses or shifts cached positions."""
    layer = reserved_cache_layer(reserve=4)
    k = torch.randn(1, 2, 3, 8)
    layer.update(k, -k)
    more = torch.randn(1, 2, 5, 8)
    keys, values = layer.update(more, -more)  # 8 positions: past the reservation
    assert torch.equal(keys, torch.cat([k, more], 2)) and torch.equal(values, -keys)
    layer.crop(-6)
    last = torch.randn(1, 2, 1, 8)
    keys, _ = layer.update(last, -last)
    assert torch.equal(keys, torch.cat([k[..., :2, :], last], 2))
    layer.reorder_cache(torch.tensor([0, 0]))  # beams: transformers assigns new tensors; the next step adopts them
    two = last.repeat(2, 1, 1, 1)
    keys, _ = layer.update(two, -two)
    assert keys.shape == (2, 2, 4, 8) and torch.equal(keys[1, :, :3], torch.cat([k[0, :, :2], last[0]], 1))


@pytest.mark.parametrize("storage", [None, torch.bfloat16, torch.int8])
def test_values_may_have_another_head_size_than_keys(storage):
    """If this fails, an LM whose value heads are narrower than its key heads (as some attention variants have)
    cannot be cached: the values are written into buffers shaped like the keys."""
    layer = reserved_cache_layer(reserve=4, storage=storage)
    k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 6)
    keys, values = layer.update(k, v)
    more_k, more_v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 6)  # past the reservation: the buffers grow
    keys, values = layer.update(more_k, more_v)
    assert keys.shape == (1, 2, 6, 8) and values.shape == (1, 2, 6, 6)
    torch.testing.assert_close(values, torch.cat([v, more_v], 2), atol=0.05, rtol=0.02)


def reserved_cache_layer(reserve: int, storage: torch.dtype | None = None):
    cache = ReservedCache(reserve, storage)
    return cache.layer_class_to_replicate()


def test_bf16_storage_returns_the_arithmetic_dtype():
    """If this fails, attention under an fp32 route reads bf16 keys (a dtype error in SDPA) or the cache is not
    halved."""
    layer = reserved_cache_layer(reserve=8, storage=torch.bfloat16)
    k = torch.randn(2, 2, 3, 8)
    keys, values = layer.update(k, k)
    assert keys.dtype == values.dtype == torch.float32
    assert layer.keys.dtype == torch.bfloat16
    assert torch.equal(keys, k.to(torch.bfloat16).float())


@pytest.mark.parametrize("width", [80, 6])
def test_int8_storage_keeps_each_row_within_half_a_step_of_its_scale(width):
    """If this fails, an int8 cache hands attention keys and values further from the computed ones than int8
    rounding of each row allows (a wrong or shared scale), or does not quarter the fp32 cache."""
    layer = reserved_cache_layer(reserve=8, storage=torch.int8)
    k = torch.randn(2, 3, 5, width) * torch.logspace(-3, 3, 5)[:, None]  # rows of very different sizes
    keys, values = layer.update(k, -2 * k)
    assert keys.dtype == values.dtype == torch.float32 and keys.shape == k.shape
    step = k.abs().amax(-1, keepdim=True) / 127
    # half a step, plus the fp32 roundings of x / s and of q * s (each within 2^-24 of what it rounds)
    assert ((keys - k).abs() <= step / 2 + (k.abs() + step) * 2**-22).all()
    assert ((values + 2 * k).abs() <= step + (2 * k.abs() + 2 * step) * 2**-22).all()
    assert layer.keys.dtype == torch.int8 and layer.keys.shape[-1] == -(-width // 4) * 4 + 4


def test_int8_storage_moves_scales_with_keys_under_crop_and_beams():
    """If this fails, beam search or a chat's crop under an int8 cache pairs a position's int8 values with
    another position's or sequence's scale."""
    layer = reserved_cache_layer(reserve=4, storage=torch.int8)
    k = torch.randn(2, 2, 3, 8) * torch.tensor([1.0, 100.0])[:, None, None, None]
    before, _ = layer.update(k, k)
    layer.crop(-1)
    layer.reorder_cache(torch.tensor([1, 0]))
    last = torch.randn(2, 2, 1, 8)
    keys, _ = layer.update(last, last)
    assert torch.equal(keys[:, :, :2], before.flip(0)[:, :, :2])


def test_int8_route_keeps_a_narrow_cache_and_batches_as_alone(opt_ckpt, images):
    """If this fails, `dtype="int8"` keeps its cache in fp32 (four times the memory of a batch's generation), or
    its narrow cache makes a batch's captions differ from the same images captioned one at a time."""
    m = blip2.load(opt_ckpt, device="cpu", dtype="int8")
    assert m.model.kv_storage == torch.int8
    pics = [images["rgb"], images["rgba"], images["l"]]
    together = m.generate(pics, ["a photo of"] * 3, max_new_tokens=8, batch_size=3)
    alone = [m.generate([p], ["a photo of"], max_new_tokens=8)[0] for p in pics]
    assert [g.tokens for g in together] == [g.tokens for g in alone]
    assert [g.score for g in together] == pytest.approx([g.score for g in alone], abs=1e-4)


def _stored(m, images) -> torch.dtype:
    """The dtype a generation of `m` stores its cache in."""
    caches = []
    new_cache = m.model.new_cache
    m.model.new_cache = lambda *a, **k: caches.append(new_cache(*a, **k)) or caches[-1]
    try:
        m.generate([images["rgb"]], ["a photo of"], max_new_tokens=4)
    finally:
        del m.model.new_cache  # the class's method again
    return caches[0].layers[0].keys.dtype


def test_kv_cache_option_sets_the_cache_dtype(opt_ckpt, images, monkeypatch):
    """If this fails, a user who asks `blip2.load(kv_cache=...)` for an int8 cache (to fit a larger batch) or for
    the arithmetic's own on the int8 weights (transformers' cache numbers) silently gets the route's default, or
    an int8 cache makes a batch's captions differ from the same images captioned alone."""
    exact = blip2.load(opt_ckpt, device="cpu", dtype="int8", kv_cache="fp32")
    assert exact.model.kv_storage is None and _stored(exact, images) == torch.float32
    narrow = blip2.load(opt_ckpt, device="cpu", dtype="fp32", kv_cache="int8")
    assert _stored(narrow, images) == torch.int8
    monkeypatch.setenv("BLIP2_KV_CACHE", "int8")  # the default of every load (the CLI's --kv-cache sets it)
    assert blip2.load(opt_ckpt, device="cpu", dtype="fp32").model.kv_storage == torch.int8
    monkeypatch.delenv("BLIP2_KV_CACHE")
    pics = [images["rgb"], images["rgba"], images["l"]]
    together = narrow.generate(pics, max_new_tokens=8, batch_size=3)  # each row's cache is rounded on its own
    assert [g.tokens for g in together] == [narrow.generate([p], max_new_tokens=8)[0].tokens for p in pics]


@pytest.mark.parametrize(
    ("dtype", "kv_cache", "words"),
    [("fp32", "int4", "'int4'"), ("bf16", "fp32", "wider"), ("fp32", "auto", None)],
)
def test_kv_cache_option_refuses_what_it_cannot_store(opt_ckpt, dtype, kv_cache, words):
    """If this fails, an unknown or wider-than-the-model cache dtype loads without a word (or a valid one fails)."""
    if words is None:
        assert blip2.load(opt_ckpt, device="cpu", dtype=dtype, kv_cache=kv_cache).model.kv_storage is None
        return
    with pytest.raises(blip2.errors.ConfigError, match=words):
        blip2.load(opt_ckpt, device="cpu", dtype=dtype, kv_cache=kv_cache)
    with pytest.raises(blip2.errors.ConfigError, match="compile"):
        blip2.load(opt_ckpt, device="cpu", dtype="fp32", kv_cache="int8", compile=True)


def test_encoder_decoder_lms_keep_transformers_cache(t5_ckpt):
    """If this fails, a Flan-T5 BLIP-2 is handed a decoder-only cache (its cross-attention cache would be lost)."""
    m = blip2.load(t5_ckpt, device="cpu", dtype="fp32")
    assert reserved_cache(m.model.language_model, 16) is None
