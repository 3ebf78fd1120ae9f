"""`dtype="int8"`: weight-only quantization of the language model, bf16-stored vision encoder (quant.py)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import blip2
from blip2 import pipeline
from blip2.cli import main
from blip2.quant import (
    INT8_FP32_MIN_POSITIONS,
    Int8Linear,
    PackedLinear,
    StoredEmbedding,
    StoredLinear,
    can_pack,
    quantized_bytes,
)


def _pair(folder):
    return blip2.load(folder, dtype="fp32"), blip2.load(folder, dtype="int8")


@pytest.fixture(scope="module")
def opt_pair(opt_ckpt):
    return _pair(opt_ckpt)


def _lm_logits(m, images):
    ids, mask = m.tokenize(["a photo of", "Question: what is it? Answer:"])
    extra = {}
    if m.model.is_encoder_decoder:  # decoder input: the start token, then the prompt again
        start = torch.full((2, 1), m.model.language_model.config.decoder_start_token_id)
        extra = {"decoder_input_ids": torch.cat([start, ids], dim=1)}
    with torch.no_grad():
        return m.model(ids, mask, pixel_values=m.pixel_values([images["rgb"], images["rgba"]]), **extra).logits


def test_every_lm_linear_is_int8_and_vision_is_bf16_stored(opt_pair):
    """If this fails, int8 loading leaves full-precision copies behind (no memory saved) or misses layers."""
    _, q = opt_pair
    lm_linears = [m for m in q.model.language_model.modules() if isinstance(m, nn.Linear | Int8Linear)]
    assert lm_linears and all(type(m) is Int8Linear and m.weight.dtype == torch.int8 for m in lm_linears)
    vis = [m for m in q.model.vision_model.modules() if isinstance(m, nn.Linear)]
    assert vis and all(type(m) is StoredLinear and m.weight.dtype == torch.bfloat16 for m in vis)
    emb = q.model.language_model.get_input_embeddings()
    assert type(emb) is StoredEmbedding and emb.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in q.model.qformer.parameters())  # as the reference keeps it
    assert not any(p.is_meta for p in [*q.model.parameters(), *q.model.buffers()])


def test_quantized_weights_are_within_half_a_step_of_the_checkpoint(opt_pair):
    """If this fails, a layer got another layer's weights (ties, names) or was rounded wrongly."""
    f, q = opt_pair
    full = dict(f.model.language_model.named_modules())
    for name, mod in q.model.language_model.named_modules():
        if isinstance(mod, Int8Linear):
            w = full[name].weight
            err = (mod.dequantized() - w).abs()
            assert (err <= mod.scale[:, None] / 2 + 1e-7).all(), name
            assert torch.equal(mod.bias, full[name].bias) if mod.bias is not None else full[name].bias is None


def test_tied_output_head_is_quantized_from_the_embeddings(opt_pair):
    """If this fails, OPT's output head (tied to the token embeddings, not stored) is random or missing."""
    f, q = opt_pair
    head = q.model.language_model.get_output_embeddings()
    emb = f.model.language_model.get_input_embeddings().weight
    assert (head.dequantized() - emb).abs().max() <= head.scale.max() / 2 + 1e-7


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("width", [32, 37])  # 37: torch's int8 kernel would read out of bounds; fallback path
def test_int8_linear_matches_its_dequantized_weights(rows, width):
    """If this fails, the int8 kernel computes something else than x @ W^T for some batch size or width
    (torch 2.13's kernel crashes the process on widths not a multiple of 8 with several rows)."""
    torch.manual_seed(0)
    lin = nn.Linear(width, 24)
    q = Int8Linear(lin)
    q.set_weight(lin.weight.detach())
    x = torch.randn(2, rows, width)
    want = torch.nn.functional.linear(x.bfloat16().float(), q.dequantized(), lin.bias.detach())
    torch.testing.assert_close(q(x), want, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("width", [32, 37])
def test_int8_linear_with_many_rows_multiplies_in_fp32(width):
    """If this fails, a prompt's prefill (>= 24 positions) through an int8 layer computes something else than
    x @ W^T with the dequantized weight in fp32 (the widened route, faster than the int8 kernel at many rows),
    e.g. a block of output channels left out or scaled by another channel's scale."""
    torch.manual_seed(0)
    lin = nn.Linear(width, 1100)  # 1100 output channels: two full blocks of 512 and a partial one
    q = Int8Linear(lin)
    q.set_weight(lin.weight.detach())
    x = torch.randn(3, INT8_FP32_MIN_POSITIONS, width)
    with torch.no_grad():
        got = q(x)
    want = torch.nn.functional.linear(x.double(), q.dequantized().double(), lin.bias.detach().double())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)  # no bf16 rounding of x on this route


@pytest.mark.parametrize("positions", [1, INT8_FP32_MIN_POSITIONS + 6])  # decoding steps; a prompt's prefill
def test_int8_linear_gives_each_sequence_of_a_batch_what_it_gives_alone(positions):
    """If this fails, a batch of sequences takes another kernel than each sequence alone (say 8 images x 3 beams
    decoding: 24 rows), and batched answers differ from one-by-one answers in the server and batch captioning."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    q = Int8Linear(lin)
    q.set_weight(lin.weight.detach())
    x = torch.randn(40, positions, 64)
    with torch.no_grad():
        batched = q(x)
        for i in range(len(x)):
            assert torch.equal(batched[i], q(x[i : i + 1])[0]), i


def test_a_batch_of_decoding_steps_stays_on_the_decoding_kernel(opt_pair, images, monkeypatch):
    """If this fails, OPT's feed-forward layers, which take a batch's decoding steps as one (sequences, features)
    matrix, widen to fp32 once a batch has as many sequences as a prompt has positions: such a batch decodes on
    other arithmetic than its images one by one (and slower)."""
    from blip2 import quant

    widened = []
    real = quant._widened_mm
    monkeypatch.setattr(quant, "_widened_mm", lambda x, *a: widened.append(len(x)) or real(x, *a))
    batch = INT8_FP32_MIN_POSITIONS + 2
    pics = [images["rgb"], images["rgba"]] * (batch // 2)
    opt_pair[1].generate(pics, ["a photo of"] * batch, max_new_tokens=3, batch_size=batch)
    assert widened and batch not in widened  # prompts and images widen; the steps' (batch, features) rows do not


def _decoding(x: torch.Tensor) -> bool:
    """The int8 kernel's inputs (decoding steps); a prompt's prefill is fp32 throughout."""
    return x.shape[-2] < INT8_FP32_MIN_POSITIONS


def _emulated(folder, q):
    """The fp32 model with the int8 model's arithmetic spelled out: dequantized weights, bf16 rounding of the
    inputs and outputs of each int8 product with few rows (the int8 kernel's), bf16-rounded vision weights and
    embeddings."""
    f = blip2.load(folder, dtype="fp32")
    quantized = dict(q.model.named_modules())
    for name, mod in f.model.named_modules():
        qm = quantized.get(name)
        if isinstance(qm, StoredLinear | StoredEmbedding):
            mod.weight.data = mod.weight.data.bfloat16().float()
        if not isinstance(qm, Int8Linear):
            continue
        mod.weight = nn.Parameter(qm.dequantized())  # a new tensor: OPT's head shares the embeddings' one
        if qm.in_features % 8:  # the dequantizing path: fp32 throughout
            continue
        bias = mod.bias if mod.bias is not None else 0.0
        mod.register_forward_pre_hook(lambda m, args: (args[0].bfloat16().float(),) if _decoding(args[0]) else None)
        mod.register_forward_hook(
            lambda m, args, out, b=bias: (out - b).bfloat16().float() + b if _decoding(args[0]) else None
        )
    return f


def test_int8_model_computes_the_quantized_network(opt_ckpt, t5_ckpt, opt_pair, images):
    """If this fails, the int8 model is not the network its quantized weights describe (a layer skipped, a scale
    applied twice, the wrong kernel layout), whatever the rounding error of quantization itself."""
    for folder, q in ((opt_ckpt, opt_pair[1]), (t5_ckpt, blip2.load(t5_ckpt, dtype="int8"))):
        want, got = _lm_logits(_emulated(folder, q), images), _lm_logits(q, images)
        assert (got - want).abs().max() <= 1e-2 * want.abs().max(), folder


def test_int8_logits_stay_close_to_fp32(opt_pair, images):
    """If this fails, int8 answers drift from the full-precision model more than the bounds below allow: 8% of the
    largest logit, and fp32's top token in int8's top 3 at 90% of the positions. (Measured figures: docs/speed.md.)"""
    f, q = opt_pair
    want, got = _lm_logits(f, images), _lm_logits(q, images)
    assert (got - want).abs().max() <= 0.08 * want.abs().max()
    top3 = got.topk(3, dim=-1).indices
    assert (top3 == want.argmax(-1, keepdim=True)).any(-1).float().mean() >= 0.9


def test_int8_weights_take_a_quarter_of_the_memory(opt_pair):
    """If this fails, --dtype int8 does not save the memory it promises (the full-size figure is in docs/speed.md)."""
    f, q = opt_pair

    def linear_bytes(root, kinds):
        return sum(quantized_bytes(m) - (quantized_bytes(m.bias) if m.bias is not None else 0)
                   for m in root.modules() if isinstance(m, kinds))  # fmt: skip

    lm_f = linear_bytes(f.model.language_model, nn.Linear)
    assert linear_bytes(q.model.language_model, Int8Linear) <= 0.3 * lm_f  # int8 + one fp32 scale per row
    vis_f = linear_bytes(f.model.vision_model, nn.Linear)
    assert linear_bytes(q.model.vision_model, StoredLinear) == vis_f // 2


def test_cli_caption_with_int8(opt_ckpt, images, opt_pair):
    """If this fails, `blip2 caption --dtype int8` is refused or answers differently than the Python API."""
    _, q = opt_pair
    r = CliRunner().invoke(
        main, ["caption", str(images["rgb"]), "--model", str(opt_ckpt), "--dtype", "int8", "--max-new-tokens", "6"]
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.split("\t", 1)[1].strip() == q.caption(images["rgb"], max_new_tokens=6)


def test_saving_an_int8_model_is_refused(opt_pair, tmp_path):
    """If this fails, saving an int8 model writes int8 tensors under fp32 names: a checkpoint nobody can load."""
    from blip2.checkpoint import save_model
    from blip2.errors import ConfigError

    with pytest.raises(ConfigError, match="int8"):
        save_model(opt_pair[1].model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", [4, 100, -1000])
def test_damaged_weights_name_the_file_in_int8_loading(opt_ckpt, tmp_path, cut):
    """If this fails, a truncated or corrupt checkpoint crashes int8 loading (its own reader) with a traceback."""
    import shutil

    from blip2.errors import CheckpointError

    folder = tmp_path / "broken"
    shutil.copytree(opt_ckpt, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:cut])  # the header cut, or the last tensor
    with pytest.raises(CheckpointError, match="model.safetensors"):
        blip2.load(folder, dtype="int8")


# --- dtype="bf16" on a CPU without bf16 instructions: bf16 layers summed in fp32 (quant.bf16_sums_in_fp32) ---


def _bf16_step(t: torch.Tensor) -> torch.Tensor:
    """The distance from each value to the next bf16 number (one unit in the last place)."""
    t = t.float().abs().clamp(min=2.0**-126)
    return 2.0 ** (torch.floor(torch.log2(t)) - 7)


def test_bf16_linear_summed_in_fp32_is_the_bf16_product():
    """If this fails, `dtype="bf16"` on an AVX2 CPU computes something else than a bf16 GEMM would (bf16 inputs,
    exact products, fp32 sums, one rounding): captions would drift from the reference's bf16 ones."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 512).bfloat16()
    fast = StoredLinear(lin, torch.bfloat16, min_positions=24)
    x = torch.randn(2, 40, 256).bfloat16()  # 80 rows: the fp32 route
    with torch.no_grad():
        got, native = fast(x), torch.nn.functional.linear(x, lin.weight, lin.bias)
    exact = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= _bf16_step(exact)).all()  # rounded from a nearly exact fp32 sum
    differ = got != native
    assert differ.float().mean() < 0.01  # the native kernel sums in another order: a rare one-step difference
    assert ((got - native).float().abs()[differ] <= _bf16_step(native)[differ]).all()


def test_bf16_linear_keeps_the_native_kernel_for_few_rows_and_for_gradients():
    """If this fails, decoding upcasts a whole weight per token (slower than the native kernel), or training
    keeps an fp32 copy of every frozen weight alive for the backward pass."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).bfloat16()
    fast = StoredLinear(lin, torch.bfloat16, min_positions=24)
    few = torch.randn(8, 64).bfloat16()
    with torch.no_grad():
        assert torch.equal(fast(few), torch.nn.functional.linear(few, lin.weight, lin.bias))
    many = torch.randn(30, 64).bfloat16().requires_grad_()
    out = fast(many)
    assert torch.equal(out, torch.nn.functional.linear(many, lin.weight, lin.bias))
    out.float().sum().backward()
    assert many.grad is not None and many.grad.shape == many.shape


@pytest.mark.parametrize("native", [False, True])
def test_bf16_load_sums_in_fp32_only_where_the_cpu_lacks_bf16(opt_ckpt, images, monkeypatch, native):
    """If this fails, `dtype="bf16"` runs 4x slower than it could on an AVX2 CPU, touches the output head, or gives
    other answers than the native bf16 kernels beyond their rounding."""
    monkeypatch.setenv("BLIP2_CPU_BF16", "1" if native else "0")  # the CPU kind, through dtype_policy
    m = blip2.load(opt_ckpt, dtype="bf16")
    swapped = [n for n, mod in m.model.named_modules() if type(mod) is StoredLinear]
    if native:
        assert swapped == []
        return
    lm = m.model.language_model
    assert any(n.startswith("vision_model.") for n in swapped) and any(n.startswith("language_model.") for n in swapped)
    assert any(n.startswith("qformer.") for n in swapped)  # bf16 too, as transformers keeps it
    assert type(lm.get_output_embeddings()) is nn.Linear
    layers = [*m.model.vision_model.modules(), *lm.model.decoder.layers.modules()]
    assert all(type(mod) is not nn.Linear for mod in layers)
    ref = blip2.load(opt_ckpt, dtype="bf16")  # native kernels: swap them back
    for mod in ref.model.modules():
        if type(mod) is StoredLinear:
            mod.min_positions = 10**9
    assert m.model.state_dict().keys() == ref.model.state_dict().keys()  # saving sees the same model
    a, b = _lm_logits(m, images).float(), _lm_logits(ref, images).float()
    assert (a - b).abs().max() <= 0.05 * b.abs().max()


needs_onednn = pytest.mark.skipif(not can_pack(), reason="this PyTorch has no oneDNN prepacked linear")


@needs_onednn
def test_packed_linear_is_the_bf16_product_bit_for_bit():
    """If this fails, prepacking changes the answers of dtype="bf16" instead of only their speed."""
    torch.manual_seed(0)
    base = nn.Linear(64, 96).bfloat16()
    packed = PackedLinear(base)
    for x in (torch.randn(1, 64), torch.randn(7, 64), torch.randn(3, 5, 64), torch.randn(4, 9, 64)[:, -1:]):
        x = x.bfloat16()
        with torch.no_grad():
            assert torch.equal(packed(x), base(x)), x.shape
    assert torch.equal(packed.weight, base.weight)  # unpacked on demand


@needs_onednn
def test_packed_linear_saves_loads_and_trains_as_a_linear():
    """If this fails, a model loaded with packed layers saves without its weights, cannot take a state dict, or
    breaks under gradients."""
    torch.manual_seed(0)
    base = nn.Linear(32, 16).bfloat16()
    packed = PackedLinear(base)
    sd = packed.state_dict()
    assert set(sd) == {"weight", "bias"} and torch.equal(sd["weight"], base.weight)
    other = nn.Linear(32, 16).bfloat16()
    packed.load_state_dict(other.state_dict())
    x = torch.randn(3, 32).bfloat16()
    with torch.no_grad():
        assert torch.equal(packed(x), other(x))
    x.requires_grad_(True)
    packed(x).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()


@needs_onednn
def test_bf16_load_packs_and_gives_the_same_answers(opt_ckpt, images, monkeypatch):
    """If this fails, a bf16 load on a CPU where packing measures faster answers differently from the plain bf16
    layers, or keeps both copies of the weights."""
    monkeypatch.setenv("BLIP2_CPU_BF16", "1")  # native bf16 by the flags: every kind packed
    imgs = [images["rgb"], images["large"]]
    prompts = ["", "Question: what is it? Answer:"]
    packed = blip2.load(opt_ckpt, device="cpu", dtype="bf16")
    assert sum(isinstance(m, PackedLinear) for m in packed.model.modules()) > 10
    monkeypatch.setattr(pipeline, "pack_bf16", lambda m: 0)
    plain = blip2.load(opt_ckpt, device="cpu", dtype="bf16")
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    got = packed.generate(imgs, prompts, max_new_tokens=6)
    want = plain.generate(imgs, prompts, max_new_tokens=6)
    assert [g.tokens for g in got] == [g.tokens for g in want]
    head = plain.model.language_model.get_output_embeddings().weight
    # the same bytes, but the output head's packed copy beside the input embeddings it is tied to
    assert quantized_bytes(packed.model) - quantized_bytes(plain.model) <= head.numel() * head.element_size()
