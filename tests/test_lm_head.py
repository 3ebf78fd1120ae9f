"""The LM head on the last prompt position: one matrix product on contiguous rows, whatever the route.

transformers' causal LMs hand their head `h[:, -1:]` during `generate`'s prefill, a (B, 1, D) view with the prompt's
stride. With frozen weights (as we load them) `F.linear` then runs a batched product on the head's weight expanded
B times, which some CPUs' kernels copy whole (language.head_takes_contiguous_rows, bench/lm_head.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import Blip2ForConditionalGeneration, Blip2Processor

import blip2
from blip2.processing import load_image
from blip2.quant import Int8Linear, StoredLinear

PROMPTS = ["", "a photo of", "Question: what is on the table? Answer:"]


def _images(images):
    return [load_image(images[k]) for k in ["rgb", "large", "rgba"]]


def _head_products(m, imgs, prompts, **gen) -> set[str]:
    """The aten products that touched the vocabulary dimension while generating."""
    vocab = m.model.language_model.get_output_embeddings().weight.shape[0]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        m.generate(imgs, prompts, max_new_tokens=2, **gen)
    products = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm", "mkldnn::_linear_pointwise")
    return {e.name for e in prof.events() if e.name in products and any(vocab in s for s in e.input_shapes if s)}


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("kind", ["opt", "t5"])
@pytest.mark.parametrize("beams", [1, 3])
def test_head_runs_one_matrix_product(opt_ckpt, t5_ckpt, images, dtype, kind, beams):
    """If this fails, a batch's prefill multiplies the head's weight expanded per sequence: on CPUs whose batched
    kernel copies the expansion, half of a batch's time (4 of 8 s, OPT-2.7B bf16, 8 images)."""
    m = blip2.load(opt_ckpt if kind == "opt" else t5_ckpt, device="cpu", dtype=dtype)
    got = _head_products(m, _images(images), PROMPTS, num_beams=beams)
    assert got and "aten::bmm" not in got, got


def test_quantized_linears_take_a_sliced_input_as_rows():
    """If this fails, the int8 or bf16-stored layers (quant.py) fall into the batched product on a sliced input in
    the routes that call `F.linear`: the dequantizing one (CUDA, odd widths), bf16 decoding steps, and gradients."""
    torch.manual_seed(0)
    base = nn.Linear(60, 96)  # 60: not a multiple of 8, so Int8Linear dequantizes
    q = Int8Linear(nn.Linear(60, 96, device="meta"))
    q.set_weight(base.weight.detach())
    q.bias = base.bias
    stored = {}
    for dtype in (torch.bfloat16, torch.float32):  # dtype="bf16" (all bf16) and dtype="int8"'s vision (fp32 x, bias)
        stored[dtype] = StoredLinear(nn.Linear(60, 96), torch.bfloat16, min_positions=24)
        stored[dtype].set_weight(base.weight.detach())
        stored[dtype].bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
    h = torch.randn(5, 7, 60)
    routes = [
        (q, h, torch.no_grad),
        (stored[torch.bfloat16], h.bfloat16(), torch.no_grad),  # a decoding step: the native bf16 product
        (stored[torch.float32], h, torch.enable_grad),  # with gradients: no widening
    ]
    for layer, x, grad in routes:
        last = x[:, -1:]  # (5, 1, 60), not contiguous
        with grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            y = layer(last)
        assert "aten::bmm" not in {e.name for e in prof.events()}, (type(layer).__name__, x.dtype, grad)
        torch.testing.assert_close(y, layer(last.contiguous()), atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_first_step_logits_batch_alone_and_reference(opt_ckpt, t5_ckpt, images, kind):
    """If this fails, the logits of a batch's first generated token differ from each prompt's alone, or from
    transformers' for the same checkpoint."""
    folder = opt_ckpt if kind == "opt" else t5_ckpt
    ours = blip2.load(folder, device="cpu", dtype="fp32")
    head = ours.model.language_model.get_output_embeddings()
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda mod, args, out: seen.append(out.detach()))
    imgs = _images(images)
    ours.generate(imgs, PROMPTS, max_new_tokens=1)
    batch = seen[0][:, -1]  # (3, V): the prefill's last position
    alone = []
    for im, p in zip(imgs, PROMPTS):
        seen.clear()
        ours._cache.clear()  # alone means its own vision pass, not the batch's cached features
        ours.generate([im], [p], max_new_tokens=1)
        alone.append(seen[0][0, -1])
    hook.remove()
    alone = torch.stack(alone)
    # a batch's fp32 products may sum in another order than one image's (the GEMM blocks by row count on some
    # CPUs): ~1e-6 relative in the vision features, which the tiny random T5 amplifies to ~1e-5 of its largest logit
    torch.testing.assert_close(batch, alone, atol=2e-5 * float(alone.abs().max()), rtol=0)

    ref = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    proc = Blip2Processor.from_pretrained(folder)
    expected = []
    for im, p in zip(imgs, PROMPTS):
        inputs = proc(images=[im], text=[p], return_tensors="pt")
        kw = {}
        if kind == "t5":
            kw["decoder_input_ids"] = torch.tensor([[ref.config.text_config.decoder_start_token_id]])
        with torch.no_grad():
            expected.append(ref(**inputs, **kw).logits[0, -1])
    torch.testing.assert_close(alone, torch.stack(expected), atol=1e-4, rtol=0)
