"""Narrow weights, chosen kernels: `dtype="int8"` (weight-only quantization), `dtype="int4"` (int8 with int4
decoding weights, `int4.Int4Weight`) and `dtype="bf16"` on CPUs without bf16 instructions (`bf16_sums_in_fp32`, at the
end).

A frozen BLIP-2 spends its time in linear layers of two kinds, and they want different kernels (`bench/matmul.py`
compares them on the model's layer shapes; the figures are in docs/speed.md):

* the LLM while decoding multiplies a few rows (one per sequence) by each weight matrix: memory-bound, so reading
  1 byte per weight instead of 4 pays. PyTorch's own `_weight_int8pack_mm` (int8 weights, one scale per output
  channel, bf16 activations) beats fp32 and bf16 there;
* the vision encoder multiplies 257 rows per image, and the LLM's prefill 30-50 rows per prompt: compute-bound.
  There the same int8 kernel is slower than the fp32 GEMM. So these products run in fp32 on weights widened from
  their narrow storage a block at a time (`_widened_mm`: the wide block stays in the cache, which makes it as
  fast as an fp32 GEMM on fp32 weights);
* on CPUs with VNNI or AMX, PyTorch's int8 x int8 GEMM (`torch._int_mm`) beats all of these at every row count
  (on an AVX512-VNNI EPYC 1.5x bf16's speed on an image's rows, and it reads int8 weights faster than the int8
  kernel while decoding); without them it runs at about 1% of fp32's speed. There the activations are quantized
  too, per position, with large outliers kept in fp32 (`_int8_activations_mm`), and the vision encoder's weights
  are stored int8 as well.

So `int8` means: language-model linears (with the output head) int8 per output channel, multiplied by the int8
kernel below a number of positions per sequence (decoding) and widened to fp32 from there (prefill); vision
linears bf16 storage, fp32 arithmetic on widened weights (or PyTorch's bf16 kernel where the CPU has a faster
one); or, where `routes.py` measures int8 activations faster, every linear layer on int8 x int8 products. The
Q-Former, norms, biases and embeddings stay as the reference keeps them (the Q-Former in fp32, the token
embeddings stored bf16). `int4` is `int8` plus, in each language-model layer but the head, an int4 copy of the
weight that decoding steps (one position per sequence) multiply, where `routes.py` measures it faster: half int8's
bytes to read per step, and a step's time is the time to read them. Quality is measured, not assumed:
`tests/test_quant.py` and `tests/test_int8_activations.py` bound the logit deviation from fp32 on the tiny models
and `bench/quality.py` reports it on the full-size architecture (`route_quality.py`).

The swapped modules are created before loading, with their `weight` still on the meta device; the loader hands
each weight to `set_weight`, which converts it at once, so the full-precision copy of a layer never outlives
its conversion (peak memory stays near the quantized size).

Which kernel a layer takes is a number of positions per sequence per kind of layer (`Kernels`): `routes.py`
measures the running CPU and installs its choice with `use_kernels` (dtype_policy.placement does it before a model
is built); until then, and with `BLIP2_ROUTES=flags`, the defaults below hold (measured on an AVX2 CPU).
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .int4 import Int4Weight

SCHEMES = ("int8", "int4")
NEVER = sys.maxsize  # a threshold no sequence reaches: that kind of layer is never widened

# The defaults of `Kernels`, measured on an AVX2 CPU for OPT-2.7B's layers (`bench/matmul.py`, docs/speed.md): there
# the widened fp32 route is as fast as `_weight_int8pack_mm` at 24 rows and faster at a prompt's prefill, and beats
# the emulated bf16 kernel from somewhere between 8 and 32 rows. Decoding steps (one position) stay narrow.
INT8_FP32_MIN_POSITIONS = 24
BF16_FP32_MIN_POSITIONS = 24


@dataclass(frozen=True)
class Kernels:
    """Per kind of layer, the positions per sequence from which its products run in fp32 on weights widened a block
    at a time (`_widened_mm`); below, PyTorch's kernel for the stored dtype. 0: always widened; NEVER: never.

    Positions per sequence, never rows: a batch takes the route each of its sequences takes alone."""

    bf16_lm: int = BF16_FP32_MIN_POSITIONS  # dtype="bf16": the language model's and the Q-Former's layers
    bf16_vision: int = BF16_FP32_MIN_POSITIONS  # dtype="bf16": the vision encoder's (257 positions per image)
    int8_lm: int = INT8_FP32_MIN_POSITIONS  # dtype="int8": the LM's int8 layers; below, `_weight_int8pack_mm`
    int8_vision: int = 0  # dtype="int8": the vision encoder's bf16-stored layers (fp32 activations); below, bf16

    bf16_packed_lm: bool = False  # dtype="bf16", layers never widened: weights prepacked for oneDNN (`PackedLinear`)
    bf16_packed_vision: bool = False

    # dtype="int8": activations quantized too, per position, for `torch._int_mm` (`_int8_activations_mm`), in every
    # int8 layer at every row count; the vision encoder's layers are then stored int8 as well
    int8_activations: bool = False
    # with int8_activations: the int8 weights prepacked for oneDNN's int8 matmul (`PackedInt8Linear`)
    int8_packed: bool = False
    # dtype="int4": decoding steps on int4 copies of the LM's layers (`int4.Int4Weight`), where one row measures faster
    # on them than on the int8 route's layers; else dtype="int4" is dtype="int8"
    int4_decoding: bool = True
    # which int4 kernel: PyTorch's ("torch", `int4.Int4Weight`) or ours ("bf16", `int4.Int4Bf16Weight`), measured
    int4_kernel: str = "torch"

    @property
    def widens_bf16(self) -> bool:
        """Whether any bf16 layer of a `dtype="bf16"` model takes the widened route (`bf16_sums_in_fp32` applies)."""
        return min(self.bf16_lm, self.bf16_vision) < NEVER


_active = Kernels()


def use_kernels(kernels: Kernels) -> None:
    """Make `kernels` the routes of the layers that `prepare` and `bf16_sums_in_fp32` create from now on."""
    global _active
    _active = kernels


def active_kernels() -> Kernels:
    return _active


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 (symmetric, one fp32 scale per output channel)."""

    def __init__(
        self,
        linear: nn.Linear,
        min_positions: int = INT8_FP32_MIN_POSITIONS,
        activations: bool = False,
        int4: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the meta parameter until `set_weight`, then an int8 buffer of the same name
        self.bias = linear.bias
        self.min_positions = min_positions  # from here on (positions per sequence) the widened fp32 route
        self.activations = activations  # quantize the activations too (`_int8_activations_mm`), at every row count
        self.int4 = int4  # `set_weight` also makes `decoding`, an int4 copy for one position per sequence
        self.decoding: Int4Weight | None = None
        self.register_buffer("scale", None)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor, rows: int = 1024) -> None:
        """Quantize a (out, in) weight of any float dtype, a block of rows at a time (no full fp32 copy)."""
        q = int8_rows(*weight.shape) if self.activations else torch.empty(weight.shape, dtype=torch.int8)
        scale = torch.empty(weight.shape[0], dtype=torch.float32)
        for i in range(0, weight.shape[0], rows):
            w = weight[i : i + rows].float()
            # the kernel takes bf16 scales: use one that bf16 holds exactly, rounded up so |w / s| stays <= 127
            s = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0 * (1 + 2**-7)).bfloat16().float()
            q[i : i + rows] = torch.round(w / s[:, None]).clamp_(-127, 127)
            scale[i : i + rows] = s
        if self.int4 and weight.device.type == "cpu":
            self.decoding = Int4Weight.quantize(weight, kernel=active_kernels().int4_kernel)
        self._parameters.pop("weight", None)
        self.register_buffer("weight", q.to(weight.device))
        self.scale = scale.to(weight.device)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decoding is not None and _int4_step(x):
            return self.decoding(x, self.bias)
        if self.activations and x.device.type == "cpu" and not torch.is_grad_enabled():
            mm = _int8_activations_op if torch.compiler.is_compiling() else _int8_activations_mm
            bias = None if self.bias is None else self.bias.float()
            y = mm(x.reshape(-1, self.in_features), self.weight, self.scale, bias)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if _positions(x) >= self.min_positions and _widening_applies(x):
            y = _widened_mm(x.reshape(-1, self.in_features).float(), self.weight, self.scale, self.bias)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        # torch 2.13's CPU kernel reads out of bounds (segfault) when in_features is not a multiple of 8 and
        # there is more than one row; such layers (only in toy models) take the dequantizing path
        if x.device.type == "cpu" and self.in_features % 8 == 0:
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            mm = _int8_mm if torch.compiler.is_compiling() else torch._weight_int8pack_mm
            y = mm(rows, self.weight, self.scale.to(torch.bfloat16))
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:  # no int8-weight kernel (CUDA, odd widths): dequantize per call; memory as int8, not faster
            y = _linear_rows(x, self.weight.to(x.dtype) * self.scale[:, None].to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        acts = ", int8 activations per position" if self.activations else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel{acts}"


@torch.library.custom_op("blip2::int8_mm", mutates_args=())
def _int8_mm(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`_weight_int8pack_mm` as an opaque op for `torch.compile`: torch 2.13's inductor fails to lower the aten op
    when its input is a fused conversion ("LoweringException: AssertionError: Pointwise")."""
    return torch._weight_int8pack_mm(rows, weight, scale)


@_int8_mm.register_fake
def _(rows: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[0])


ROW_PAD = 64  # bytes between the end of an int8 weight row and the start of the next (`int8_rows`)


def int8_rows(out_features: int, in_features: int) -> torch.Tensor:
    """An empty (out, in) int8 weight whose rows lie `ROW_PAD` bytes further apart than their length, for
    `torch._int_mm`. Rows a multiple of 2 KiB apart (OPT-2.7B's fc2: 10240 bytes) fall on the same few cache sets,
    and oneDNN's int8 GEMM, which walks down them, then runs 1.4x slower at 8 rows of activations, 1.2x at 48 and
    1.05-1.1x at a prefill's or an image's rows (`bench/matmul.py --int8-row-pad`); the padded product is the same
    to the bit, and costs 64 bytes per row."""
    return torch.empty(out_features, in_features + ROW_PAD, dtype=torch.int8)[:, :in_features]


# LLM.int8() (Dettmers et al., 2022; bitsandbytes' `llm_int8_threshold`): an input feature of magnitude above 6 at
# any position is an outlier, multiplied in fp32 rather than squeezed into the position's int8 range
OUTLIER_THRESHOLD = 6.0
ROW_BLOCK = 256  # positions quantized and multiplied at a time: their int32 products stay within the cache


def _int8_activations_mm(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ (weight * scale)^T + bias in fp32 for (M, in) activations x and an int8 (out, in) weight with
    per-channel scales, with x quantized to int8 per position (symmetric, absmax / 127) and multiplied by
    `torch._int_mm` (int32 sums, exact), where the CPU has a fast int8 GEMM (VNNI, AMX; `routes.py` measures
    it), or by oneDNN's int8 matmul if `weight` is prepacked for it (`pack_int8`; the same int32 sums). Activations
    above `OUTLIER_THRESHOLD` are left out of the int8 product and multiplied in fp32 on their dequantized weight
    columns, so that one large feature does not coarsen the quantization of all the others at its position
    (OPT's activations have a few such channels in real checkpoints). Each position is quantized on its own: a
    batch's int8 products are those of its members alone, bit for bit."""
    rows, packed = x.shape[0], weight.is_mkldnn
    if rows == 0:  # an empty batch: nothing to quantize (and no block size to take)
        return x.new_zeros(0, scale.shape[0], dtype=torch.float32)
    # oneDNN's matmul takes all rows and returns fp32 itself; else equal blocks of at most ROW_BLOCK into one output
    # (257 rows: 129 + 128, not 256 + 1)
    out = None if packed else torch.empty(rows, scale.shape[0], dtype=torch.float32, device=x.device)
    block = rows if packed else -(-rows // -(-rows // ROW_BLOCK))
    for i in range(0, rows, block):
        xs = x[i : i + block].float()
        top = largest_magnitudes(xs)
        wide = None
        if top.max() > OUTLIER_THRESHOLD:
            big = xs.abs() > OUTLIER_THRESHOLD
            wide = big.any(0).nonzero().squeeze(1)  # the features that are outliers at some position of the block
            xo, xs = (xs * big)[:, wide], xs.masked_fill(big, 0.0)
            del big
            top = largest_magnitudes(xs)
        s = top.clamp_(min=1e-12) / 127
        q = torch.div(xs, s).round_()
        if packed:
            y = out = _qlinear(q, weight, scale)  # (sums * scale) in fp32, as below
        else:
            y = torch.mul(torch._int_mm(q.to(torch.int8), weight.t()), scale, out=out[i : i + block])
        y.mul_(s)
        if wide is not None:
            y.addmm_(xo, _dequantized_columns(weight, scale, wide, x.shape[1]))
        if bias is not None:
            y.add_(bias)
    return out


def largest_magnitudes(rows: torch.Tensor) -> torch.Tensor:
    """(..., 1): each row's (last dimension's) largest |value|, without an |rows| as large as the rows (an image's
    activations: tens of MB)."""
    return torch.maximum(rows.amax(-1, keepdim=True), rows.amin(-1, keepdim=True).neg_())


def _qlinear(q: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q @ W^T) * scale in fp32 for integer-valued fp32 q in [-128, 127] and a weight prepacked by `pack_int8`:
    oneDNN's int8 matmul takes unsigned activations, so q goes in shifted by 128 with a zero point of 128 (the
    int32 sums are those of q itself); q is shifted in place (the callers' scratch)."""
    u8 = q.add_(128).to(torch.uint8)
    zero = _zero_points(scale.shape[0])
    return torch.ops.onednn.qlinear_pointwise(
        u8, 1.0, 128, packed, scale, zero, None, 1.0, 0, torch.float32, "none", [], ""
    )


@functools.cache
def _zero_points(n: int) -> torch.Tensor:
    """The weight's zero points for `_qlinear` (symmetric: all 0), one tensor per width, read-only."""
    return torch.zeros(n, dtype=torch.long)


def _dequantized_columns(weight: torch.Tensor, scale: torch.Tensor, cols: torch.Tensor, k: int) -> torch.Tensor:
    """(weight[:, cols] * scale[:, None])^T in fp32; of a prepacked weight, as its product with one-hot rows."""
    if not weight.is_mkldnn:
        return (weight[:, cols].float() * scale[:, None]).t()
    one_hot = torch.zeros(len(cols), k)
    one_hot[torch.arange(len(cols)), cols] = 1.0
    return _qlinear(one_hot, weight, scale)


@torch.library.custom_op("blip2::int8_activations_mm", mutates_args=())
def _int8_activations_op(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`_int8_activations_mm` as one opaque op for `torch.compile` (the same arithmetic as in eager mode)."""
    return _int8_activations_mm(x, weight, scale, bias)


@_int8_activations_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


class StoredLinear(nn.Linear):
    """A linear layer whose weight is stored in a narrower dtype (bf16) and multiplied in a wider one.

    With an input of another dtype (fp32 under `dtype="int8"`) the weight is widened to it, except below
    `min_positions` positions per sequence on a CPU, where the input is rounded to bf16 for PyTorch's bf16 kernel
    (chosen where that kernel is native and faster, `routes.py`). With an input in the storage dtype itself
    (`dtype="bf16"` on a CPU without bf16 instructions, see `bf16_sums_in_fp32`) the product runs in fp32 and is
    rounded back to bf16: exact products summed in fp32 is what a bf16 GEMM computes, so the result differs from
    the native kernel only by the order of the sums (one bf16 step on ~0.02% of the outputs), and at 257 rows it
    is much faster than the emulated kernel (docs/speed.md). Below `min_positions` positions per
    sequence (decoding) widening the weight costs more than the native kernel saves, and with gradients enabled the
    fp32 copy would be kept for the backward pass: both take the native kernel.
    """

    def __init__(self, linear: nn.Linear, storage: torch.dtype, min_positions: int = 0) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.storage, self.min_positions = storage, min_positions

    def set_weight(self, weight: torch.Tensor) -> None:
        self.weight = nn.Parameter(weight.to(self.storage), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        widen = _widening_applies(x)
        narrow = widen and _positions(x) < self.min_positions
        if x.dtype == self.weight.dtype:  # bf16 in, bf16 out: fp32 sums only where they pay
            if not widen or narrow:
                return _linear_rows(x, self.weight, self.bias)
            compute = torch.float32
        elif narrow:  # fp32 in, where the CPU's bf16 kernel beats an fp32 product
            bias = None if self.bias is None else self.bias.to(self.storage)
            return _linear_rows(x.to(self.storage), self.weight, bias).to(x.dtype)
        else:
            compute = x.dtype
        bias = None if self.bias is None else self.bias.to(compute)
        if not widen:
            return _linear_rows(x.to(compute), self.weight.to(compute), bias).to(x.dtype)
        y = _widened_mm(x.reshape(-1, self.in_features).to(compute), self.weight, None, bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, stored {self.storage}"


def _linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` on x's rows as one (N, in) matrix. On a non-contiguous (B, T, in) input, such as the last position
    `h[:, -1:]` of a prompt's hidden states, `F.linear` itself runs a batched product on the weight expanded B times
    (language.head_takes_contiguous_rows says what that costs); a 2-D view of the rows folds into one product."""
    y = F.linear(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


_scratch = threading.local()
WIDEN_BLOCK = 512  # output channels widened at a time: 512 x 2560 fp32 is 5 MB, within the L3 cache


_stack = threading.local()  # positions per sequence of the language-model stack running in this thread


def _positions(x: torch.Tensor) -> int:
    """Positions per sequence of a (..., positions, features) input: what picks the kernel, never the batch size,
    so that a batch takes the route each of its members takes alone (a prompt's prefill widened, every decoding
    step on the narrow kernel, whatever the batch or beam count) and gives the same answers. A matrix of rows
    inside a language model's stack of layers takes the stack's positions per sequence (`track_positions`): OPT's
    feed-forward layers take a (batch x positions, features) matrix, whose rows alone would make a batch of
    decoding steps look like a prompt."""
    if x.dim() >= 3:
        return x.shape[-2]
    tracked = getattr(_stack, "positions", None)
    return x.shape[0] if tracked is None else tracked


def track_positions(lm: nn.Module) -> None:
    """Make each stack of layers in `lm` (a module holding the token embeddings, `embed_tokens`: OPT's decoder,
    LLaMA's model, T5's encoder and decoder) note its input's positions per sequence for `_positions` while it runs
    (forward hooks; idempotent)."""
    for m in lm.modules():
        if hasattr(m, "embed_tokens") and _note_positions not in m._forward_pre_hooks.values():
            m.register_forward_pre_hook(_note_positions, with_kwargs=True)
            m.register_forward_hook(_forget_positions, always_call=True)


def _note_positions(module: nn.Module, args: tuple, kwargs: dict) -> None:
    x = next((kwargs[k] for k in ("inputs_embeds", "input_ids") if kwargs.get(k) is not None), None)
    if x is None and args and isinstance(args[0], torch.Tensor):
        x = args[0]
    _stack.positions = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else None


def _forget_positions(module: nn.Module, args: tuple, output: object) -> None:
    _stack.positions = None


def _int4_step(x: torch.Tensor) -> bool:
    """Whether an input takes a layer's int4 copy (`int4.Int4Weight`): one position per sequence (a decoding step),
    CPU inference; a prompt keeps the int8 weight."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and _positions(x) == 1


def _widening_applies(x: torch.Tensor) -> bool:
    """`_widened_mm` serves CPU inference. With gradients the widened blocks would be kept for the backward pass,
    and a compiled graph gets the plain product (inductor plans its own buffers)."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _widened_mm(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """x @ (weight * scale)^T + bias in x's dtype (fp32) for a weight stored narrow (int8 with per-channel scales,
    or bf16): `WIDEN_BLOCK` output channels at a time are widened into one reused per-thread buffer and multiplied
    there, so the wide copy stays in the cache and never exists whole: as fast as an fp32 GEMM on fp32 weights or
    faster, and at many rows faster than the int8 kernel (`bench/matmul.py`; figures in docs/speed.md)."""
    out_features, in_features = weight.shape
    block = min(WIDEN_BLOCK, out_features)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < block * in_features or buf.dtype != x.dtype:
        buf = _scratch.buf = torch.empty(block * in_features, dtype=x.dtype)
    y = x.new_empty(x.shape[0], out_features)
    for j in range(0, out_features, block):
        n = min(block, out_features - j)
        w = buf[: n * in_features].view(n, in_features).copy_(weight[j : j + n])
        if scale is not None:
            w.mul_(scale[j : j + n, None])
        if bias is None:
            torch.mm(x, w.t(), out=y[:, j : j + n])
        else:
            torch.addmm(bias[j : j + n].to(x.dtype), x, w.t(), out=y[:, j : j + n])
    return y


class StoredEmbedding(nn.Embedding):
    """Token embeddings stored narrow, returned in `compute` dtype (plain `nn.Embedding`s only: an LM's subclass
    that scales its embeddings is left as it is)."""

    def __init__(self, emb: nn.Embedding, storage: torch.dtype, compute: torch.dtype) -> None:
        nn.Module.__init__(self)
        for k in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq"):
            setattr(self, k, getattr(emb, k))
        self.sparse = emb.sparse
        self.weight = emb.weight
        self.storage, self.compute = storage, compute

    def set_weight(self, weight: torch.Tensor) -> None:
        self.weight = nn.Parameter(weight.to(self.storage), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).to(self.compute)


def _swap(root: nn.Module, make) -> None:
    """Replace each submodule m of `root` for which make(m) returns a module. A module reachable under several
    names (T5's shared embeddings) is replaced by one new module everywhere; tied parameters stay tied."""
    made: dict[int, nn.Module | None] = {}
    for name, module in list(root.named_modules(remove_duplicate=False)):
        if id(module) not in made:
            made[id(module)] = make(module)
        if made[id(module)] is not None:
            parent_name, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, attr, made[id(module)])


def prepare(
    model: nn.Module, scheme: str, compute: torch.dtype = torch.float32, kernels: Kernels | None = None
) -> None:
    """Swap the layers of a model built on the meta device (`checkpoint.build_empty`) for their quantized forms,
    routed by `kernels` (default: `active_kernels()`)."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization {scheme!r} is not one of {', '.join(SCHEMES)}")
    k = kernels or _active
    lm = model.language_model
    if lm is not None:
        table = lm.get_input_embeddings().weight  # T5's encoder and decoder embeddings share it
        head = lm.get_output_embeddings()  # int8 under int4 too, as llama.cpp and GPTQ keep the head wider
        int4 = lambda m: scheme == "int4" and k.int4_decoding and m is not head  # noqa: E731
        _swap(lm, lambda m: Int8Linear(m, k.int8_lm, k.int8_activations, int4(m)) if type(m) is nn.Linear else None)
        track_positions(lm)
        shares_table = lambda m: type(m) is nn.Embedding and m.weight is table  # noqa: E731
        _swap(lm, lambda m: StoredEmbedding(m, torch.bfloat16, compute) if shares_table(m) else None)
    if k.int8_activations:
        vision = lambda m: Int8Linear(m, NEVER, activations=True)  # noqa: E731
    else:
        vision = lambda m: StoredLinear(m, torch.bfloat16, k.int8_vision)  # noqa: E731
    _swap(model.vision_model, lambda m: vision(m) if type(m) is nn.Linear else None)


def bf16_sums_in_fp32(model: nn.Module, kernels: Kernels | None = None) -> None:
    """For a bf16 model on a CPU where PyTorch's bf16 GEMM is slower than fp32 (emulated without AVX512-BF16/AMX,
    about a fifth of the fp32 speed): make every bf16 linear layer but the LM's output head a `StoredLinear` that
    sums in fp32 from `kernels.bf16_vision` (vision encoder) or `kernels.bf16_lm` (the rest) positions per sequence
    (default: `active_kernels()`). The weights stay the same bf16 parameters (memory, saving and state dict
    unchanged); the head is left alone, since its weight is the largest (a 500 MB fp32 copy) and it sees few rows
    while generating."""
    k = kernels or _active
    lm = getattr(model, "language_model", None)
    head = lm.get_output_embeddings() if lm is not None else None
    vision = set(map(id, model.vision_model.modules())) if hasattr(model, "vision_model") else set()

    def make(m: nn.Module) -> nn.Module | None:
        if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 and m is not head:
            return StoredLinear(m, torch.bfloat16, min_positions=k.bf16_vision if id(m) in vision else k.bf16_lm)
        return None

    _swap(model, make)
    if lm is not None:
        track_positions(lm)


class _CpuPacked(nn.Module):
    """A layer holding a weight prepacked for oneDNN's CPU kernels (not a parameter: `.to` would leave it behind).
    Moving it off the CPU, or casting its bias and scales to another dtype (`.half()`, `.to(torch.float32)` on a
    bf16 layer), is an error that says how to load the model that way, not a failure at its first product."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        device = fn(torch.empty(0)).device
        if device.type != "cpu":
            raise ConfigError(
                f"{type(self).__name__} holds weights prepacked for the CPU and cannot move to {device}: "
                f"load the model there instead, blip2.load(folder, device={str(device)!r})"
            )
        for t in (*self.parameters(recurse=False), *self.buffers(recurse=False)):
            cast = fn(t.detach()[:0]).dtype
            if cast != t.dtype:
                raise ConfigError(
                    f"{type(self).__name__} holds weights prepacked for the CPU in their own dtype and cannot be "
                    f"cast to {cast}: load the model in that dtype instead, blip2.load(folder, dtype=...)"
                )
        return super()._apply(fn, recurse)


class PackedLinear(_CpuPacked):
    """A bf16 linear layer for CPU inference whose weight is reordered once, at load, into oneDNN's blocked layout.

    `F.linear` on a plain bf16 weight makes oneDNN reorder the weight at every call: a pass over all of it, which
    is much of a decoding step's cost (one row reads the weight once anyway). On the prepacked weight the product
    is the same arithmetic, bit for bit, at any row count (`tests/test_quant.py`), and faster where the routes
    measure it so (`blip2 doctor`; on an AVX512-BF16 EPYC 1.35x at one row, 1.1-1.2x at 8-48 rows). The plain
    weight is dropped (kept only by a module it is tied to, such as the input embeddings of a tied output head);
    `weight` and the state dict give it back, unpacked. With gradients the layer multiplies the unpacked weight, so
    it stays differentiable."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self.packed = _pack(linear.weight.detach())

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return F.linear(x, self.weight.to(x.dtype), self.bias)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        if prefix + "weight" in state_dict:
            self.packed = _pack(state_dict[prefix + "weight"].to(torch.bfloat16))
        rest = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
        super()._load_from_state_dict(rest, prefix, *args)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 prepacked for oneDNN"


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)  # the row hint does not change the layout


def can_pack() -> bool:
    """Whether this PyTorch has oneDNN's prepacked linear (CPU builds with MKL-DNN)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack_bf16(model: nn.Module, kernels: Kernels | None = None) -> int:
    """Make the bf16 linear layers of a loaded CPU model `PackedLinear`s: the vision encoder's if
    `kernels.bf16_packed_vision`, every other one (Q-Former, language model, its head) if `kernels.bf16_packed_lm`
    (default: `active_kernels()`). Returns how many were packed. One layer at a time: memory grows by one layer's
    weight at most, and by a tied head's packed copy."""
    k = kernels or _active
    if not can_pack():
        return 0
    vision = set(map(id, model.vision_model.modules())) if hasattr(model, "vision_model") else set()
    count = 0

    def make(m: nn.Module) -> nn.Module | None:
        nonlocal count
        if type(m) is not nn.Linear or m.weight.dtype != torch.bfloat16 or m.weight.device.type != "cpu":
            return None
        if not (k.bf16_packed_vision if id(m) in vision else k.bf16_packed_lm):
            return None
        count += 1
        packed = PackedLinear(m)
        m.weight = None  # _swap holds the old modules to its end: let each plain weight go now (a tied one stays)
        return packed

    _swap(model, make)
    return count


class PackedInt8Linear(_CpuPacked):
    """An int8-activations layer (`Int8Linear(activations=True)`) whose int8 weight is reordered once, at load, into
    oneDNN's blocked layout for its int8 matmul. `torch._int_mm` reorders the plain weight at every call; on the
    prepacked one the same int32 sums come 1.5-1.8x faster at 8 rows on an AVX512-VNNI EPYC (OPT-2.7B's fc1, fc2,
    head; vision), 1.1-1.4x at a prefill's rows, 1.0-1.15x at an image's, and 1.1-1.5x slower at one (`routes.py`
    measures it and decides, `bench/matmul.py --int8-packed`). The product is `_int8_activations_mm`'s, outliers
    included; `weight` gives the plain int8 weight back (exactly: a product with one-hot rows). With gradients the
    layer multiplies the dequantized weight."""

    def __init__(self, linear: Int8Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self.register_buffer("scale", linear.scale)
        self.packed = torch.ops.onednn.qlinear_prepack(linear.weight.contiguous(), None)
        self.decoding = linear.decoding

    @property
    def weight(self) -> torch.Tensor:
        return (self.dequantized() / self.scale[:, None]).round().to(torch.int8)

    def dequantized(self) -> torch.Tensor:
        return _dequantized_columns(self.packed, self.scale, torch.arange(self.in_features), self.in_features).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decoding is not None and _int4_step(x):
            return self.decoding(x, self.bias)
        bias = None if self.bias is None else self.bias.float()
        if torch.is_grad_enabled():
            return F.linear(x.float(), self.dequantized(), bias).to(x.dtype)
        y = _int8_activations_mm(x.reshape(-1, self.in_features), self.packed, self.scale, bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 x int8 prepacked for oneDNN"


def can_pack_int8() -> bool:
    """Whether this PyTorch has oneDNN's prepacked int8 matmul (CPU builds with MKL-DNN)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")


def pack_int8(model: nn.Module) -> int:
    """Make the int8-activations layers of a loaded CPU model `PackedInt8Linear`s, one at a time (memory grows by
    one layer's weight at most), the query, key and value projections of a decoder-only language model's attention
    layers prepacked together (`fuse_projections`). Returns how many layers were packed.

    The language model's output head stays plain: prepacking needs the whole plain weight beside its packed copy,
    which for OPT-2.7B's head (50272 x 2560, 0.13 GB) raised the whole model's load peak by 0.09 GiB (to 1.17x the
    int8 weights); plain, the head takes about 4 ms more per decoding step of 8 rows (under 1% of a batch) and
    0.6 ms less at one row (AVX512-VNNI EPYC, docs/speed.md "int8 products")."""
    if not can_pack_int8():
        return 0
    count = fuse_projections(model)
    lm = getattr(model, "language_model", None)
    head = lm.get_output_embeddings() if lm is not None else None

    def make(m: nn.Module) -> nn.Module | None:
        nonlocal count
        if type(m) is not Int8Linear or not m.activations or m.weight.device.type != "cpu" or m is head:
            return None
        count += 1
        packed = PackedInt8Linear(m)
        m.weight = None  # _swap holds the old modules to its end: let each plain weight go now
        return packed

    _swap(model, make)
    return count


PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # of the attention layers of OPT, LLaMA and most decoder-only LMs


class _Products:
    """What the projections of one fused layer share: the layer, and its last input and output until each
    projection has taken its part."""

    def __init__(self, layer: nn.Module, parts: int) -> None:
        self.layer, self.parts = layer, parts
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.left = 0


class FusedProjection(nn.Module):
    """One of the query, key and value projections of an attention layer whose three products run as one
    (`fuse_projections`): the first of them to see an input multiplies it by the fused weight, each takes its
    columns, and the last lets the output go. An input not seen before is multiplied again, so any order of calls
    is right; decoder-only attention layers give all three the same hidden states. The fused layer is the attention
    module's `qkv_proj` (its state and device); this module only holds a reference to it."""

    def __init__(self, products: _Products, start: int, width: int, in_features: int) -> None:
        super().__init__()
        self.__dict__["_products"] = products  # not a submodule: the fused layer belongs to the attention module
        self.start, self.in_features, self.out_features = start, in_features, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self._products
        if p.x is not x:
            p.x, p.y, p.left = x, p.layer(x), p.parts
        y = p.y[..., self.start : self.start + self.out_features]
        p.left -= 1
        if p.left <= 0:
            p.x = p.y = None
        return y

    def extra_repr(self) -> str:
        cols = f"{self.start}:{self.start + self.out_features}"
        return f"in_features={self.in_features}, out_features={self.out_features}, columns {cols} of qkv_proj"


def fuse_projections(model: nn.Module) -> int:
    """In a decoder-only language model on int8 activations, replace each attention layer's `q_proj`, `k_proj` and
    `v_proj` by one `PackedInt8Linear` (`qkv_proj`) over their concatenated weights and three `FusedProjection`s:
    the activations are quantized once instead of three times and the weights read in one product, 1.1-1.3x faster
    than three at 1-48 rows on an AVX512-VNNI EPYC (`bench/matmul.py --fused-qkv`). Each output column's int32 sum
    is the one its own layer computes, so the outputs are the same, bit for bit. Returns how many fused layers."""
    lm = getattr(model, "language_model", None)
    if lm is None or lm.config.is_encoder_decoder:  # cross-attention reads keys and values from another input
        return 0
    count = 0
    # the attention modules only: a list of every module would hold each replaced projection's weight to the end
    for attn in [m for m in lm.modules() if all(hasattr(m, name) for name in PROJECTIONS)]:
        parts = [getattr(attn, name) for name in PROJECTIONS]
        if not all(type(q) is Int8Linear and q.activations and q.weight.device.type == "cpu" for q in parts):
            continue
        if len({q.in_features for q in parts}) > 1 or len({q.bias is None for q in parts}) > 1:
            continue
        fused = Int8Linear(nn.Linear(parts[0].in_features, 1, device="meta"), activations=True)
        fused.out_features = sum(q.out_features for q in parts)
        fused._parameters.pop("weight")
        fused.register_buffer("weight", torch.cat([q.weight for q in parts]))
        fused.scale = torch.cat([q.scale for q in parts])
        fused.bias = None if parts[0].bias is None else nn.Parameter(torch.cat([q.bias for q in parts]), False)
        first = parts[0].decoding
        fused.decoding = None if first is None else type(first).cat([q.decoding for q in parts])
        attn.qkv_proj = PackedInt8Linear(fused)
        products, start = _Products(attn.qkv_proj, len(parts)), 0
        for name, q in zip(PROJECTIONS, parts):
            setattr(attn, name, FusedProjection(products, start, q.out_features, q.in_features))
            start += q.out_features
        count += 1
    return count


def quantized_bytes(model: nn.Module | torch.Tensor) -> int:
    """Bytes held by a tensor, or by a module's parameters, buffers and prepacked weights (each shared tensor once)."""
    tensors = [model] if isinstance(model, torch.Tensor) else [*model.parameters(), *model.buffers()]
    seen, total = set(), 0
    for t in tensors:
        if t.device.type != "meta" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    if isinstance(model, nn.Module):
        packs = (m.packed for m in model.modules() if isinstance(m, PackedLinear | PackedInt8Linear))
        total += sum(p.numel() * p.element_size() for p in packs)
    return total
