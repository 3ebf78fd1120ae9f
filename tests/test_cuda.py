"""The GPU path: CUDA in fp16 / bf16 against `transformers` on the same GPU; int8 and compiled decoding on CUDA.
Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from transformers import Blip2ForConditionalGeneration, Blip2Processor

import blip2
from blip2.processing import load_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cuda_logits_and_tokens_match_reference(opt_ckpt, images, dtype):
    """If this fails, captions on a GPU differ from transformers' on the same GPU and dtype."""
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    ours = blip2.load(opt_ckpt, device="cuda", dtype=dtype)
    ref = Blip2ForConditionalGeneration.from_pretrained(opt_ckpt, dtype=torch_dtype).to("cuda").eval()
    proc = Blip2Processor.from_pretrained(opt_ckpt)
    proc.tokenizer.padding_side = "left"
    imgs = [load_image(images[k]) for k in ("rgb", "large")]
    prompts = ["", "a photo of"]
    inputs = proc(images=imgs, text=prompts, padding=True, return_tensors="pt").to("cuda")
    # Both sides get our pixels: with torchvision installed (as on GPU machines) the processor resizes with it and
    # lands one uint8 level off PIL's resize (ours, and the processor's without torchvision) on some pixels,
    # which on random weights moves the logits by ~1, hiding what this test checks.
    inputs["pixel_values"] = ours.pixel_values(imgs).to(torch_dtype)
    with torch.no_grad():
        want = ref(**inputs).logits.float()
        ids, mask = ours.tokenize(prompts)
        got = ours.model(ids, mask, pixel_values=inputs["pixel_values"]).logits.float()
    real = torch.cat([torch.ones(2, ours.config.num_query_tokens), mask.cpu()], 1).bool()  # padding: meaningless
    torch.testing.assert_close(got.cpu()[real], want.cpu()[real], atol=2e-2, rtol=2e-2)
    out = ref.generate(**inputs, max_new_tokens=8)[:, inputs["input_ids"].shape[1] :]
    specials = set(proc.tokenizer.all_special_ids)
    want_tokens = [[t for t in row if t not in specials] for row in out.tolist()]
    assert [g.tokens for g in ours.generate(imgs, prompts, max_new_tokens=8)] == want_tokens


def test_cuda_int8_runs_and_stays_close(opt_ckpt, images):
    """If this fails, `--dtype int8` on a GPU crashes or computes another network than on the CPU."""
    cpu = blip2.load(opt_ckpt, device="cpu", dtype="int8")
    gpu = blip2.load(opt_ckpt, device="cuda", dtype="int8")
    ids, mask = cpu.tokenize(["a photo of"])
    with torch.no_grad():
        a = cpu.model(ids, mask, pixel_values=cpu.pixel_values([images["rgb"]])).logits
        b = gpu.model(ids.cuda(), mask.cuda(), pixel_values=gpu.pixel_values([images["rgb"]])).logits.float().cpu()
    assert (a - b).abs().max() <= 0.1 * a.abs().max()  # CPU: bf16 activations in the int8 kernel; GPU: fp16


def test_cuda_compiled_decoding_gives_the_eager_tokens(opt_ckpt, images):
    """If this fails, `compile=True` on a GPU (CUDA graphs replaying the decoding step) changes answers."""
    eager = blip2.load(opt_ckpt, device="cuda", dtype="fp16")
    compiled = blip2.load(opt_ckpt, device="cuda", dtype="fp16", compile=True)
    pics, prompts = [images["rgb"], images["large"]], ["", "a photo of"]
    for _ in range(2):  # the second call replays the captured graphs
        got = compiled.generate(pics, prompts, max_new_tokens=8)
        assert [g.tokens for g in got] == [g.tokens for g in eager.generate(pics, prompts, max_new_tokens=8)]
