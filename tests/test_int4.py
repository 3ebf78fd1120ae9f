"""`dtype="int4"`: the int8 route with a second, int4 copy of the language model's layers for decoding steps
(int4.Int4Weight on PyTorch's int4 kernel for CPUs, int4.Int4Bf16Weight on ours for AVX512-BF16 CPUs); prompts
keep the int8 layers. Each test runs with both kernels; ours is skipped, with the reason, where it is not built."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import blip2
from blip2.dtype_policy import placement
from blip2.errors import ConfigError
from blip2.int4 import Int4Bf16Weight, Int4Weight, can_int4
from blip2.quant import FusedProjection, Int8Linear, Kernels, PackedInt8Linear, can_pack_int8

pytestmark = pytest.mark.skipif(not can_int4(), reason="this PyTorch has no int4 kernel for CPUs")


@pytest.fixture(params=["torch", "bf16"])
def kernel(request, monkeypatch) -> str:
    """Each int4 kernel in turn, installed as the routes' choice for the loads of the test."""
    from blip2 import quant, routes

    if not can_int4(request.param):
        pytest.skip("our int4 kernel needs an AVX512-BF16 CPU and a C++ compiler (blip2.native)")
    chosen = routes.cpu_routes
    monkeypatch.setattr(quant, "_active", replace(quant.active_kernels(), int4_kernel=request.param))
    monkeypatch.setattr(
        routes, "cpu_routes", lambda: replace(chosen(), kernels=replace(chosen().kernels, int4_kernel=request.param))
    )
    return request.param


@pytest.mark.parametrize(("out", "width", "group"), [(64, 256, 128), (48, 96, 32), (32, 64, 64)])
def test_int4_weight_is_the_nearest_of_its_groups_levels(out, width, group, kernel):
    """If this fails, the int4 weights a decoding step multiplies are not the original weights rounded to their
    group's 16 levels: a scale or zero taken from another group or channel, levels rounded the wrong way, or a
    product that is not the rows times those weights."""
    torch.manual_seed(0)
    w = torch.randn(out, width) * torch.rand(out, 1) * 3
    q = Int4Weight.quantize(w, kernel=kernel)
    assert q is not None and q.group == group
    got = q.dequantized()
    groups = w.view(out, -1, group)
    step = (groups.amax(-1) - groups.amin(-1)) / 15  # one level
    error = (got - w).abs().view(out, -1, group)
    assert (error <= step[..., None] * 0.5 + 0.02 * w.abs().amax()).all()  # half a level, plus bf16 rounding
    x = torch.randn(5, width)
    with torch.no_grad():
        y = q(x)
        want = x.bfloat16().float() @ got.t()
    torch.testing.assert_close(y, want, atol=0.05 * want.abs().max().item(), rtol=0)


def test_each_row_decodes_as_it_does_alone(kernel):
    """If this fails, a batch of decoding steps gets other sums than each sequence alone (the kernel's blocking
    over rows), and a batch of captions would differ from the same captions one by one."""
    torch.manual_seed(1)
    q = Int4Weight.quantize(torch.randn(128, 256), kernel=kernel)
    x = torch.randn(9, 256)
    with torch.no_grad():
        batched = q(x)
        assert all(torch.equal(batched[i], q(x[i : i + 1])[0]) for i in range(len(x)))


def test_our_kernel_sums_exact_products_in_fp32(kernel):
    """If this fails, our int4 kernel (csrc/int4_bf16.cpp) multiplies rows by weights in another order than it
    packs them, applies a group's scale or offset to another group or output, or loses more than fp32 sums lose:
    its products differ from the rows (in bf16) times its dequantized weight computed in fp64."""
    if kernel != "bf16":
        pytest.skip("PyTorch's kernel rounds its output to bf16: test_int4_weight_is_the_nearest bounds it")
    torch.manual_seed(3)
    for rows, out, width in [(1, 32, 256), (6, 96, 512), (4, 48, 96)]:
        w = torch.randn(out, width) * torch.linspace(0.1, 3, out)[:, None]
        q = Int4Weight.quantize(w, kernel="bf16")
        assert isinstance(q, Int4Bf16Weight)
        x = torch.randn(rows, width).bfloat16()
        with torch.no_grad():
            got = q(x.float())
        exact = x.double() @ q.dequantized().double().t()
        scale = q.scales.transpose(1, 2).reshape(out, -1).repeat_interleave(q.group, 1)  # each weight's group scale
        terms = x.double().abs() @ (q.dequantized().abs() + 144 * scale).double().t()  # the kernel's magnitudes
        assert ((got.double() - exact).abs() <= 2**-14 * terms).all()


def test_shapes_the_kernel_cannot_take_stay_int8(kernel):
    """If this fails, a layer whose width PyTorch's int4 packing refuses (outputs not a multiple of 16, inputs not
    a multiple of 32) fails to load instead of decoding on its int8 weight."""
    assert Int4Weight.quantize(torch.randn(37, 64), kernel=kernel) is None
    assert Int4Weight.quantize(torch.randn(32, 48), kernel=kernel) is None
    assert Int4Weight.fits(64, 2560) == 128 and Int4Weight.fits(64, 96) == 32


def test_fused_int4_weights_multiply_as_the_whole_quantized_at_once(kernel):
    """If this fails, the query, key and value projections fused into one layer decode with their int4 columns
    shuffled or scaled by another projection's groups."""
    torch.manual_seed(2)
    parts = [torch.randn(64, 128) for _ in range(3)]
    quantized = [Int4Weight.quantize(p, kernel=kernel) for p in parts]
    fused = type(quantized[0]).cat(quantized)
    whole = Int4Weight.quantize(torch.cat(parts), kernel=kernel)
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.equal(fused(x), whole(x))
    narrow = [Int4Weight.quantize(torch.randn(32, 128), kernel=kernel) for _ in range(3)]
    # PyTorch's packing keeps blocks of 64 outputs together: parts of 32 cannot be joined; ours, of 16
    assert (type(narrow[0]).cat(narrow) is None) == (kernel == "torch")
    assert type(quantized[0]).cat([quantized[0], None]) is None


def _count_int4_products(monkeypatch) -> list[int]:
    """Positions per sequence seen by each int4 product from now on (either kernel: `Int4Bf16Weight` inherits
    `Int4Weight.forward`)."""
    calls: list[int] = []
    forward = Int4Weight.forward

    def counted(self, x, bias=None):
        calls.append(x.shape[-2] if x.dim() >= 3 else 1)
        return forward(self, x, bias)

    monkeypatch.setattr(Int4Weight, "forward", counted)
    return calls


@pytest.mark.parametrize("acts", ["0", "1"])
def test_prompts_run_int8_and_decoding_steps_int4(opt_ckpt, images, monkeypatch, acts, kernel):
    """If this fails, `dtype="int4"` leaves language-model layers without their int4 copy, quantizes the output
    head too, multiplies a prompt by int4 weights (a prompt's logits then differ from the int8 route's; OPT's
    feed-forward layers see a batch's rows as one matrix, so only the tracked positions per sequence tell a
    prompt from a batch of steps), never uses the int4 weights while decoding, or decodes a batch otherwise
    than its images one by one."""
    monkeypatch.setenv("BLIP2_INT8_ACTIVATIONS", acts)
    pics, prompts = [images["rgb"], images["rgba"]], ["a photo of", "Question: what is it? Answer:"]
    m8, m4 = blip2.load(opt_ckpt, dtype="int8"), blip2.load(opt_ckpt, dtype="int4")
    lm = m4.model.language_model
    head = lm.get_output_embeddings()
    linears = [x for x in lm.modules() if isinstance(x, Int8Linear)]
    fits = [x for x in linears if Int4Weight.fits(x.out_features, x.in_features) and x is not head]
    chosen = Int4Bf16Weight if kernel == "bf16" else Int4Weight
    assert fits and all(type(x.decoding) is chosen for x in fits)
    assert head.decoding is None
    assert all(x.decoding is None for x in m8.model.language_model.modules() if isinstance(x, Int8Linear))
    calls = _count_int4_products(monkeypatch)
    ids, mask = m4.tokenize(prompts)
    with torch.no_grad():
        want, got = (m.model(ids, mask, pixel_values=m.pixel_values(pics)).logits for m in (m8, m4))
    assert torch.equal(got, want) and not calls
    batched = m4.generate(pics, prompts, max_new_tokens=8, batch_size=2)
    assert calls and set(calls) == {1}
    alone = [m4.generate([p], [t], max_new_tokens=8)[0] for p, t in zip(pics, prompts)]
    assert [g.tokens for g in batched] == [g.tokens for g in alone]
    first8 = [g.tokens[0] for g in m8.generate(pics, prompts, max_new_tokens=1, batch_size=2)]
    assert [g.tokens[0] for g in batched] == first8  # the first token comes from the prompt's (int8) logits


@pytest.mark.skipif(not can_pack_int8(), reason="this PyTorch has no oneDNN int8 matmul to prepack for")
def test_int4_llama_decodes_batches_and_chats_as_alone(tmp_path, images, monkeypatch, kernel):
    """If this fails, an int4 InstructBLIP-Vicuna (LLaMA, prepacked int8 layers for prompts) loses its int4
    copies when its layers are prepacked, or answers otherwise in a batch than alone, or a chat's follow-up turn
    (a few new prompt positions, then decoding steps) fails."""
    from instruct_checkpoints import make_instruct_llama_checkpoint

    monkeypatch.setenv("BLIP2_INT8_ACTIVATIONS", "packed")
    m = blip2.load(make_instruct_llama_checkpoint(tmp_path / "vicuna"), dtype="int4")
    lm = m.model.language_model
    packed = [x for x in lm.modules() if isinstance(x, PackedInt8Linear) and x is not lm.get_output_embeddings()]
    assert packed and any(isinstance(x.decoding, Int4Weight) for x in packed)
    assert any(isinstance(x, FusedProjection) for x in lm.modules())
    calls = _count_int4_products(monkeypatch)
    pics = [images["rgb"], images["l"]]
    batched = [g.tokens for g in m.generate(pics, ["describe it"] * 2, max_new_tokens=6, batch_size=2)]
    alone = [m.generate([p], ["describe it"], max_new_tokens=6)[0].tokens for p in pics]
    assert batched == alone and calls
    chat = m.chat(pics[0])
    assert [chat.ask("what is it?", max_new_tokens=5), chat.ask("and its colour?", max_new_tokens=5)]


def test_int4_t5_decodes_on_int4_and_batches_as_alone(t5_ckpt, images, monkeypatch, kernel):
    """If this fails, an int4 encoder-decoder (Flan-T5) multiplies its encoder's prompt by int4 weights, its
    decoder's steps never take them, or they take another route in a batch than alone."""
    m = blip2.load(t5_ckpt, dtype="int4")
    pics, prompts = [images["rgb"], images["p"]], ["a photo of", "what is it?"]
    calls = _count_int4_products(monkeypatch)
    with torch.no_grad():
        m.model.language_model.encoder(inputs_embeds=torch.randn(2, 7, m.model.language_model.config.d_model))
    assert not calls
    batched = [g.tokens for g in m.generate(pics, prompts, max_new_tokens=6, batch_size=2)]
    assert calls
    alone = [m.generate([p], [t], max_new_tokens=6)[0].tokens for p, t in zip(pics, prompts)]
    assert batched == alone


def test_int4_is_refused_off_the_cpu():
    """If this fails, `dtype="int4"` on a GPU loads without its int4 kernel (or fails later, inside a product)
    instead of saying at once that it is a CPU route."""
    with pytest.raises(ConfigError, match="int4.*int8"):
        placement("cuda", "int4")
    assert placement("cpu", "int4").quantize == "int4"


def test_int4_model_counts_its_int4_copy_in_its_size(opt_ckpt):
    """If this fails, the memory a user is told an int4 model holds leaves out its int4 copies."""
    from blip2.quant import quantized_bytes

    m8, m4 = blip2.load(opt_ckpt, dtype="int8"), blip2.load(opt_ckpt, dtype="int4")
    extra = sum(quantized_bytes(x) for x in m4.model.modules() if isinstance(x, Int4Weight))
    assert extra > 0 and quantized_bytes(m4.model) == quantized_bytes(m8.model) + extra


def test_int4_without_int4_decoding_is_int8(opt_ckpt, monkeypatch):
    """If this fails, on a CPU where the routes found int4 decoding slower than int8 (`Kernels.int4_decoding`),
    `dtype="int4"` still makes int4 copies: more memory, slower steps."""
    from blip2 import quant, routes

    flags = routes.cpu_routes()
    monkeypatch.setattr(quant, "_active", quant.active_kernels())  # the load installs its kernels: undone after
    monkeypatch.setattr(routes, "cpu_routes", lambda: replace(flags, kernels=Kernels(int4_decoding=False)))
    m = blip2.load(opt_ckpt, dtype="int4")
    assert not any(isinstance(x, Int4Weight) for x in m.model.modules())
    assert quant.active_kernels().int4_decoding is False


def test_compiled_int4_decoding_gives_the_eager_tokens(opt_ckpt, images, kernel):
    """If this fails, `compile=True` with `dtype="int4"` crashes while compiling (the int4 kernel, or the stack's
    positions noted by forward hooks, inside a compiled step), or decodes on other weights than eager (int8 ones:
    other tokens)."""
    pics, prompts = [images["rgb"]], ["a photo of"]
    eager, compiled = (blip2.load(opt_ckpt, dtype="int4", compile=c) for c in (False, True))
    eager.model.kv_storage = None  # compiled decoding keeps transformers' static cache, in the arithmetic's dtype
    want = [g.tokens for g in eager.generate(pics, prompts, max_new_tokens=10)]
    assert [g.tokens for g in compiled.generate(pics, prompts, max_new_tokens=10)] == want
    int8 = blip2.load(opt_ckpt, dtype="int8")
    assert [g.tokens for g in int8.generate(pics, prompts, max_new_tokens=10)] != want  # the test can tell them apart
