"""`dtype="int8"` with int8 activations (quant._int8_activations_mm): what `routes.py` picks where the CPU's int8
GEMM is fast (VNNI, AMX). `BLIP2_INT8_ACTIVATIONS=1` forces it here, on any CPU, with plain weights; `packed` with
weights prepacked for oneDNN's int8 matmul (quant.PackedInt8Linear)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import blip2
from blip2.checkpoint import save_model
from blip2.errors import ConfigError
from blip2.quant import (
    OUTLIER_THRESHOLD,
    ROW_BLOCK,
    ROW_PAD,
    FusedProjection,
    Int8Linear,
    PackedInt8Linear,
    PackedLinear,
    StoredEmbedding,
    can_pack,
    can_pack_int8,
    fuse_projections,
)


def _layer(width: int, out: int = 24, seed: int = 0) -> Int8Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(width, out)
    q = Int8Linear(lin, activations=True)
    q.set_weight(lin.weight.detach())
    return q


def _spelled_out(x: torch.Tensor, q: Int8Linear) -> torch.Tensor:
    """The arithmetic the route promises, written plainly: per position, activations above the outlier threshold
    multiplied in float64 on the dequantized weight; the rest rounded to int8 on their absmax / 127 scale,
    multiplied by the int8 weight exactly (float64 holds the int32 sums), then scaled back."""
    x = x.reshape(-1, q.in_features).float()
    big = x.abs() > OUTLIER_THRESHOLD
    rest = x.masked_fill(big, 0.0)
    s = rest.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
    xq = torch.round(rest / s).double()
    w, scale = q.weight.double(), q.scale.double()
    y = (xq @ w.t()) * s.double() * scale + (x * big).double() @ (w * scale[:, None]).t()
    return y + q.bias.double()


@pytest.mark.parametrize("rows", [1, 3, 8, ROW_BLOCK + 1, 3 * ROW_BLOCK])
@pytest.mark.parametrize("width", [32, 37])
def test_product_is_the_per_position_int8_arithmetic(rows, width):
    """If this fails, the int8-activations product computes something else than its quantized arithmetic: a block
    of positions left out or scaled by another position's scale, an output channel scaled wrongly, the bias lost."""
    q = _layer(width)
    x = torch.randn(rows, width) * 2
    x[rows // 2, 3] = 40.0  # one outlier, in one block
    with torch.no_grad():
        got = q(x)
    torch.testing.assert_close(got.double(), _spelled_out(x, q), atol=1e-5, rtol=1e-5)


def test_weight_rows_are_stored_apart_and_multiply_the_same():
    """If this fails, an int8 layer's rows lie their own length apart again (OPT-2.7B's fc2: 10240 bytes, on the same
    cache sets every other row) and its decoding product runs 1.4x slower; or the padded weight multiplies to
    something else than the same weight stored contiguously."""
    q = _layer(2048, 40)
    assert q.weight.shape == (40, 2048) and q.weight.stride() == (2048 + ROW_PAD, 1)
    x = torch.randn(8, 2048)
    with torch.no_grad():
        got = q(x)
        q.weight = q.weight.contiguous()
        assert torch.equal(got, q(x))


def test_an_outlier_does_not_coarsen_its_position():
    """If this fails, one large activation (OPT's outlier channels in real checkpoints) becomes the int8 scale of
    its whole position, and every other feature there is rounded to a few levels: answers degrade."""
    q = _layer(256, 64)
    x = torch.randn(4, 256)
    x[1, 5] = 80.0
    exact = x.double() @ q.dequantized().double().t() + q.bias.double()
    with torch.no_grad():
        err = (q(x).double() - exact).abs().amax(1)
    s = x.abs().amax(1, keepdim=True) / 127  # the same product without the guard
    naive = (torch.round(x / s) * s).double() @ q.dequantized().double().t() + q.bias.double()
    naive_err = (naive - exact).abs().amax(1)
    assert err[1] <= 2 * err.median(), err  # the outlier's position is as accurate as the others
    assert naive_err[1] >= 10 * err[1], (naive_err, err)  # and the guard is what made it so


@pytest.mark.parametrize("outliers", [False, True])
def test_each_sequence_of_a_batch_gets_what_it_gets_alone(outliers):
    """If this fails, batched captions differ from one-by-one captions on this route: a position's quantization
    depends on the other positions of its block."""
    q = _layer(64, 96)
    x = torch.randn(40, 7, 64)
    if outliers:
        x[3, 2, 10] = 50.0
        x[17, 0, 40] = -30.0
    with torch.no_grad():
        batched = q(x)
        for i in range(len(x)):
            alone = q(x[i : i + 1])[0]
            if outliers:  # the fp32 product of the outlier features sums other zeros: equal up to rounding
                torch.testing.assert_close(batched[i], alone, atol=1e-6, rtol=1e-6)
            else:  # int32 sums are exact: bit for bit
                assert torch.equal(batched[i], alone), i


@pytest.fixture
def int8_activations(monkeypatch):
    monkeypatch.setenv("BLIP2_INT8_ACTIVATIONS", "1")


def test_every_layer_of_the_model_takes_int8_activations(opt_ckpt, int8_activations):
    """If this fails, `BLIP2_INT8_ACTIVATIONS=1` (or a CPU measured to want it) leaves some layers on another route:
    bf16 vision weights where int8 ones were promised, or language-model layers on the weight-only kernel."""
    q = blip2.load(opt_ckpt, dtype="int8")
    for part in (q.model.language_model, q.model.vision_model):
        linears = [m for m in part.modules() if isinstance(m, nn.Linear | Int8Linear)]
        assert linears and all(type(m) is Int8Linear and m.activations for m in linears)
        assert all(m.weight.dtype == torch.int8 for m in linears)
    assert type(q.model.language_model.get_input_embeddings()) is StoredEmbedding
    assert all(p.dtype == torch.float32 for p in q.model.qformer.parameters())


def test_int8_activations_stay_close_to_fp32_and_batch_as_alone(opt_ckpt, images, monkeypatch):
    """If this fails, the route's logits drift from fp32's more than twice as far as bf16's do on the same inputs
    (this tiny random model amplifies any rounding: bf16 alone moves its logits by a fifth of their range; a
    wrong scale or a lost bias moves them by more than their range), fp32's next
    token falls out of the route's top 3 at more than 15% of the positions (the figures at full size are in
    docs/speed.md), or a batch decodes other tokens than its images one by one."""
    pics, prompts = [images["rgb"], images["rgba"]], ["a photo of", "Question: what is it? Answer:"]
    f = blip2.load(opt_ckpt, dtype="fp32")
    ids, mask = f.tokenize(prompts)
    monkeypatch.setenv("BLIP2_INT8_ACTIVATIONS", "1")
    deviation = {}
    for dtype in ("bf16", "int8"):
        q = blip2.load(opt_ckpt, dtype=dtype)
        with torch.no_grad():
            want, got = (m.model(ids, mask, pixel_values=m.pixel_values(pics)).logits.float() for m in (f, q))
        deviation[dtype] = (got - want).abs().max()
    assert deviation["int8"] <= 2 * deviation["bf16"], deviation
    top3 = got.topk(3, dim=-1).indices
    assert (top3 == want.argmax(-1, keepdim=True)).any(-1).float().mean() >= 0.85
    batched = q.generate(pics, prompts, max_new_tokens=8, batch_size=2)
    alone = [q.generate([p], [t], max_new_tokens=8)[0] for p, t in zip(pics, prompts)]
    assert [g.tokens for g in batched] == [g.tokens for g in alone]


def test_compiled_decoding_gives_the_eager_tokens(opt_ckpt, images, int8_activations):
    """If this fails, `compile=True` on this route crashes while compiling or decodes other tokens than eager."""
    eager, compiled = (blip2.load(opt_ckpt, dtype="int8", compile=c) for c in (False, True))
    eager.model.kv_storage = None  # compiled decoding keeps transformers' static cache, in the arithmetic's dtype
    pics, prompts = [images["rgb"]], ["a photo of"]
    want = [g.tokens for g in eager.generate(pics, prompts, max_new_tokens=10)]
    assert [g.tokens for g in compiled.generate(pics, prompts, max_new_tokens=10)] == want


needs_packing = pytest.mark.skipif(not can_pack_int8(), reason="this PyTorch has no oneDNN int8 matmul to prepack for")


@needs_packing
@pytest.mark.parametrize("rows", [1, 8, ROW_BLOCK + 1])
@pytest.mark.parametrize("outlier", [False, True])
def test_prepacked_weights_multiply_bit_for_bit_as_plain_ones(rows, outlier):
    """If this fails, `BLIP2_INT8_ACTIVATIONS=packed` (or a CPU measured to want it) gives other numbers than the
    plain int8-activations route on the same weights: oneDNN's int8 sums shifted by its zero point, scales applied
    in another order, or outlier features multiplied on wrong weight columns."""
    q = _layer(96, 40)
    x = torch.randn(2, rows, 96)
    if outlier:
        x[1, rows // 2, 7] = 45.0
    with torch.no_grad():
        want = q(x)
        packed = PackedInt8Linear(q)
        assert torch.equal(packed(x), want)
        assert torch.equal(packed.weight, q.weight) and torch.equal(packed.dequantized(), q.dequantized())


@pytest.mark.parametrize("pack", [False, pytest.param(True, marks=needs_packing)])
def test_an_empty_batch_gives_an_empty_output(pack):
    """If this fails, an int8-activations layer given no rows (an empty batch) crashes with a division by zero or a
    zero range step instead of returning no rows."""
    q = _layer(32, 16)
    layer = PackedInt8Linear(q) if pack else q
    with torch.no_grad():
        y = layer(torch.randn(0, 5, 32))
    assert y.shape == (0, 5, 16)


@needs_packing
def test_fused_projections_give_each_projection_its_own_layer_output():
    """If this fails, a packed int8 language model's attention gets query, key or value columns of another
    projection, other numbers than its three layers give one by one, a stale product when the input changes, or
    keeps each layer's last output alive after its three projections have taken theirs."""
    lm = nn.Module()
    lm.config = type("Config", (), {"is_encoder_decoder": False})()
    lm.attn = nn.Module()
    widths = {"q_proj": 24, "k_proj": 16, "v_proj": 16}  # grouped-query attention: narrower keys and values
    for seed, (name, out) in enumerate(widths.items()):
        setattr(lm.attn, name, _layer(96, out, seed))
    alone = {name: PackedInt8Linear(getattr(lm.attn, name)) for name in widths}
    model = nn.Module()
    model.language_model = lm
    assert fuse_projections(model) == 1 and isinstance(lm.attn.qkv_proj, PackedInt8Linear)
    x, other = torch.randn(2, 5, 96), torch.randn(2, 3, 96)
    x[0, 2, 7] = 45.0  # an outlier feature: multiplied in fp32 on its dequantized columns
    with torch.no_grad():
        for order in (("q_proj", "k_proj", "v_proj"), ("v_proj", "q_proj", "k_proj")):
            for name in order:
                assert isinstance(getattr(lm.attn, name), FusedProjection)
                assert torch.equal(getattr(lm.attn, name)(x), alone[name](x)), name
            assert lm.attn.q_proj._products.y is None  # released once all three took theirs
        assert torch.equal(lm.attn.q_proj(x), alone["q_proj"](x))
        assert torch.equal(lm.attn.k_proj(other), alone["k_proj"](other))  # a new input: multiplied anew


@needs_packing
def test_fusing_lets_each_layers_projections_go_before_the_next(monkeypatch):
    """If this fails, loading a packed int8 model holds every attention layer's unfused query, key and value
    weights until all are fused: its load peaks that much above the model (OPT-2.7B: 0.6 GiB)."""
    import weakref

    from blip2 import quant

    lm = nn.Module()
    lm.config = type("Config", (), {"is_encoder_decoder": False})()
    layers = [nn.Module() for _ in range(3)]
    for i, attn in enumerate(layers):
        for seed, name in enumerate(("q_proj", "k_proj", "v_proj")):
            setattr(attn, name, _layer(64, 32, 3 * i + seed))
        lm.add_module(f"attn{i}", attn)
    first = [weakref.ref(getattr(layers[0], name).weight) for name in ("q_proj", "k_proj", "v_proj")]
    alive_at_last = []
    real = quant.PackedInt8Linear

    def packing(linear):
        alive_at_last.append(sum(r() is not None for r in first))
        return real(linear)

    monkeypatch.setattr(quant, "PackedInt8Linear", packing)
    model = nn.Module()
    model.language_model = lm
    assert fuse_projections(model) == 3
    assert alive_at_last[-1] == 0  # when the third layer is packed, the first's three weights are gone


@needs_packing
def test_prepacked_layer_trains_on_its_dequantized_weight():
    """If this fails, a prepacked layer inside a model being fine-tuned (a LoRA or Q-Former run on an int8 LM)
    breaks the backward pass or multiplies other weights than its own."""
    q = _layer(32, 16)
    packed = PackedInt8Linear(q)
    x = torch.randn(3, 32, requires_grad=True)
    y = packed(x)
    y.sum().backward()
    torch.testing.assert_close(y, x @ q.dequantized().t() + q.bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, q.dequantized().sum(0).expand(3, -1), atol=1e-5, rtol=1e-5)


@needs_packing
def test_prepacked_model_decodes_the_plain_route_tokens(opt_ckpt, images, monkeypatch, tmp_path):
    """If this fails, `BLIP2_INT8_ACTIVATIONS=packed` leaves some int8 layers unpacked, packs the LM's output head
    (whose plain and packed copies together raise the load's peak), packs under `compile=True` (whose graphs take
    plain weights), captions differently from the plain int8-activations route, or saves a checkpoint without its
    linear weights (prepacked ones are not parameters) instead of refusing."""
    pics, prompts = [images["rgb"], images["rgba"]], ["a photo of", "Question: what is it? Answer:"]
    monkeypatch.setenv("BLIP2_INT8_ACTIVATIONS", "1")
    plain = blip2.load(opt_ckpt, dtype="int8")
    monkeypatch.setenv("BLIP2_INT8_ACTIVATIONS", "packed")
    packed = blip2.load(opt_ckpt, dtype="int8")
    head = packed.model.language_model.get_output_embeddings()
    assert type(head) is Int8Linear and head.activations
    for part in (packed.model.language_model, packed.model.vision_model):
        linears = [m for m in part.modules() if isinstance(m, nn.Linear | Int8Linear | PackedInt8Linear)]
        assert linears and all(type(m) is PackedInt8Linear for m in linears if m is not head)
    layers = packed.model.language_model.model.decoder.layers
    assert all(isinstance(layer.self_attn.q_proj, FusedProjection) for layer in layers)
    want = [g.tokens for g in plain.generate(pics, prompts, max_new_tokens=8, batch_size=2)]
    assert [g.tokens for g in packed.generate(pics, prompts, max_new_tokens=8, batch_size=2)] == want
    with pytest.raises(ConfigError, match="cannot be saved"):
        save_model(packed.model, tmp_path / "saved")
    compiled = blip2.load(opt_ckpt, dtype="int8", compile=True)
    assert not any(isinstance(m, PackedInt8Linear) for m in compiled.model.modules())


@needs_packing
def test_fused_projections_in_a_llama_lm_give_the_plain_route_answers(tmp_path, images, monkeypatch):
    """If this fails, an int8 InstructBLIP-Vicuna (LLaMA: grouped heads, rotary positions on the query and key
    columns) on prepacked weights answers otherwise than on plain ones, alone, in a batch or in a chat."""
    from instruct_checkpoints import make_instruct_llama_checkpoint

    ckpt = make_instruct_llama_checkpoint(tmp_path / "vicuna")
    pics = [images["rgb"], images["l"]]
    answers = {}
    for mode in ("1", "packed"):
        monkeypatch.setenv("BLIP2_INT8_ACTIVATIONS", mode)
        m = blip2.load(ckpt, dtype="int8")
        fused = [x for x in m.model.language_model.modules() if isinstance(x, FusedProjection)]
        assert len(fused) == (3 * m.model.language_model.config.num_hidden_layers if mode == "packed" else 0)
        chat = m.chat(pics[0])
        answers[mode] = (
            [g.tokens for g in m.generate(pics, ["describe it"] * 2, max_new_tokens=6, batch_size=2)],
            [m.generate([p], ["describe it"], max_new_tokens=6)[0].tokens for p in pics],
            [chat.ask("what is it?", max_new_tokens=5), chat.ask("and its colour?", max_new_tokens=5)],
        )
    assert answers["packed"] == answers["1"]


@needs_packing
def test_prepacked_layers_refuse_to_leave_the_cpu():
    """If this fails, `model.to("cuda")` after a CPU load with prepacked weights moves the biases and scales but
    leaves the prepacked weights behind, and the first caption fails inside oneDNN with a message about tensor
    layouts instead of saying how to load the model on that device; or `model.half()` casts the biases and scales
    around weights packed for another dtype and the next product fails or mixes dtypes."""
    packed = PackedInt8Linear(_layer(32, 16))
    with pytest.raises(ConfigError, match=r"cannot move to meta: load the model there instead.*device='meta'"):
        packed.to("meta")
    assert packed.cpu() is packed and packed.float() is packed  # staying on the CPU is fine
    with pytest.raises(ConfigError, match=r"cannot be cast to torch.float16: load the model in that dtype"):
        packed.half()  # its bias and scales would turn fp16 around weights packed for fp32 sums
    assert packed.bias.dtype == torch.float32
    if can_pack():  # bf16 prepacked layers hold theirs the same way
        with pytest.raises(ConfigError, match="PackedLinear holds weights prepacked for the CPU"):
            PackedLinear(nn.Linear(32, 16).bfloat16()).to("meta")
        with pytest.raises(ConfigError, match="cannot be cast to torch.float32"):
            PackedLinear(nn.Linear(32, 16).bfloat16()).float()
