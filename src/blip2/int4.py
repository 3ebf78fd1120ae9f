"""`dtype="int4"`'s second copy of the language model's layers: int4 weights that decoding steps multiply.

Each group of 128 inputs of an output channel (fewer where a layer's inputs are not a multiple of it) holds 16
levels between the group's smallest and largest weight, with a bf16 scale and zero. Two kernels multiply them:
PyTorch's int4 kernel for CPUs (`Int4Weight`) and ours for AVX512-BF16 CPUs (`Int4Bf16Weight`, csrc/int4_bf16.cpp,
built by `native.py`); `routes.py` times both and keeps the faster (`quant.Kernels.int4_kernel`). The layer that
holds the copy (`quant.Int8Linear`) keeps its int8 weight for prompts (`quant._int4_step`).
"""

from __future__ import annotations

import torch
from torch import nn

INT4_GROUP = 128  # inputs per scale of `Int4Weight` (fewer where a layer's inputs are not a multiple of it)


class Int4Weight(nn.Module):
    """A linear layer's weight in int4 for decoding (`dtype="int4"`): each group of `group` inputs of an output
    channel holds 16 levels, w = (q - 8) * scale + zero with q in 0..15 and a bf16 scale and zero per group (the
    group's range, asymmetric), multiplied by PyTorch's int4 kernel for CPUs (`_weight_int4pack_mm_for_cpu`, bf16
    rows, bf16 out) on the layout it packs for the running CPU. Half the bytes of int8: a decoding step, which reads
    every weight once for one row per sequence, runs 2.1-2.9x faster per layer than on the int8 route's prepacked
    layers on an AVX512-VNNI EPYC (bench/int4_gemv.py); from a few rows on it is slower than int8 (compute-bound),
    so the layer holding it keeps its int8 weight for prompts (`quant._int4_step`). Each row's sums do not depend on the
    other rows: a batch decodes as its members do alone."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> None:
        super().__init__()
        self.group = group
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (in / group, out, 2) bf16

    @staticmethod
    def fits(out_features: int, in_features: int) -> int | None:
        """The group size for a (out, in) weight, or None where the kernel cannot take it (out not a multiple of
        16, in not a multiple of 32)."""
        if out_features % 16:
            return None
        return next((g for g in (INT4_GROUP, 64, 32) if in_features % g == 0), None)

    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: torch.Tensor, kernel: str = "torch", rows: int = 1024) -> Int4Weight | None:
        """From a (out, in) weight of any float dtype, a block of rows at a time, for `kernel` ("torch": this class;
        "bf16": `Int4Bf16Weight`, PyTorch's where ours is not built; the routes' choice is
        `quant.Kernels.int4_kernel`); None where the kernel cannot take its shape (the layer then decodes on int8)
        or this PyTorch lacks its int4 kernel."""
        if kernel == "bf16" and not can_int4("bf16"):  # not built here (`native.int4_bf16` warned why)
            kernel = "torch"
        n, k = weight.shape
        group = cls.fits(n, k)
        if group is None or not can_int4(kernel):
            return None
        q = torch.empty(n, k, dtype=torch.int32)
        sz = torch.empty(n, k // group, 2, dtype=torch.bfloat16)
        for i in range(0, n, rows):
            w = weight[i : i + rows].float().view(-1, k // group, group)
            low, high = w.amin(-1), w.amax(-1)
            # scale and zero as bf16 holds them; the levels are rounded against those
            scale = ((high - low) / 15).clamp(min=1e-12).bfloat16()
            zero = (low + 8 * scale.float()).bfloat16()
            levels = w.sub(zero.float()[..., None]).div_(scale.float()[..., None]).add_(8).round_().clamp_(0, 15)
            q[i : i + rows] = levels.view(-1, k)
            sz[i : i + rows] = torch.stack([scale, zero], -1)
        return (Int4Bf16Weight if kernel == "bf16" else Int4Weight).from_levels(q, sz, group)

    @classmethod
    def from_levels(cls, q: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> Int4Weight:
        """From levels q (out, in) in 0..15 and each group's bf16 scale and zero (out, in / group, 2)."""
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return cls(packed, scales_and_zeros.transpose(0, 1).contiguous(), group)

    @classmethod
    def cat(cls, parts: list[Int4Weight | None]) -> Int4Weight | None:
        """One weight of the parts' output channels in order (the fused query, key and value projections). The
        packed layout keeps blocks of up to 64 output channels together, so parts whose widths are multiples of
        64 concatenate as packed; others (and parts without int4 weights) give None: the fused layer decodes on
        int8."""
        if not parts or any(type(p) is not Int4Weight or p.scales_and_zeros.shape[1] % 64 for p in parts):
            return None
        if len({(p.group, p.packed.shape[1]) for p in parts}) > 1:
            return None
        packed = torch.cat([p.packed for p in parts])
        return cls(packed, torch.cat([p.scales_and_zeros for p in parts], 1), parts[0].group)

    def dequantized(self) -> torch.Tensor:
        """The (out, in) weight as the kernel multiplies it (a product with the identity: rounded to bf16)."""
        k = self.packed.shape[1] * 2
        eye = torch.eye(k, dtype=torch.bfloat16)
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scales_and_zeros)
        return w.t().float()

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self._product(x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous())
        y = y.to(x.dtype) if bias is None else y.to(x.dtype) + bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        """(M, in) bf16 rows times the weight: (M, out), bf16."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scales_and_zeros)

    def extra_repr(self) -> str:
        n, half = self.packed.shape
        return f"in_features={half * 2}, out_features={n}, int4 in groups of {self.group} for decoding"


class Int4Bf16Weight(Int4Weight):
    """`Int4Weight`'s numbers (the same levels, scales and zeros) laid out for our own kernel,
    `torch.ops.blip2_native.int4_bf16_mm` (`native.py`): AVX512-BF16 products of the bf16 rows with 128 + q, exact
    in fp32, then each group's scale and offset. Reads the weights near the machine's bandwidth at one row, where
    PyTorch's kernel is compute-bound (`routes.py` keeps the faster). Each row's sums do not depend on the other
    rows either.

    `packed` (out / 16, in / 8, 64) uint8 in the kernel's order (csrc/int4_bf16.cpp); `scales` and `offsets`
    (out / 16, in / group, 16) fp32, the offset being zero - 136 * scale: w = scale * (128 + q) + offset."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int) -> None:
        nn.Module.__init__(self)
        self.group = group
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)

    @classmethod
    def from_levels(cls, q: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> Int4Bf16Weight:
        n, k = q.shape
        # byte j of 128-bit lane L of chunk c of block b: output 16b + 4L + t, inputs 8c + 2u + e (low nibble) and
        # that + 4 (high), where j = 8u + 2t + e
        nibbles = q.to(torch.uint8).view(n // 16, 4, 4, k // 8, 2, 2, 2)  # b L t c high u e
        byte = nibbles[:, :, :, :, 0] | (nibbles[:, :, :, :, 1] << 4)  # b L t c u e
        packed = byte.permute(0, 3, 1, 4, 2, 5).reshape(n // 16, k // 8, 64).contiguous()
        scale, zero = scales_and_zeros.float().unbind(-1)  # (out, in / group)
        per_block = lambda t: t.view(n // 16, 16, k // group).transpose(1, 2).contiguous()  # noqa: E731
        return cls(packed, per_block(scale), per_block(zero - 136 * scale), group)

    @classmethod
    def cat(cls, parts: list[Int4Weight | None]) -> Int4Weight | None:
        """One weight of the parts' output channels in order; None where a part has none or the groups differ."""
        if not parts or any(type(p) is not cls for p in parts) or len({p.group for p in parts}) > 1:
            return None
        return cls(
            *(torch.cat([getattr(p, b) for p in parts]) for b in ("packed", "scales", "offsets")), parts[0].group
        )

    def dequantized(self) -> torch.Tensor:
        blocks, chunks, _ = self.packed.shape
        byte = self.packed.view(blocks, chunks, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5)  # b L t c u e
        q = torch.stack([byte & 15, byte >> 4], 4).reshape(blocks * 16, chunks * 8).float()  # b L t c high u e
        per_output = lambda t: t.transpose(1, 2).reshape(blocks * 16, -1)  # noqa: E731
        scale, offset = per_output(self.scales), per_output(self.offsets)
        w = (q + 128).view(blocks * 16, -1, self.group) * scale[..., None] + offset[..., None]
        return w.view(blocks * 16, chunks * 8)

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        """(M, in) bf16 rows times the weight: (M, out), fp32."""
        return torch.ops.blip2_native.int4_bf16_mm(rows, self.packed, self.scales, self.offsets, self.group)

    def extra_repr(self) -> str:
        blocks, chunks, _ = self.packed.shape
        n, k = blocks * 16, chunks * 8
        return f"in_features={k}, out_features={n}, int4 in groups of {self.group} for decoding (bf16 kernel)"


def can_int4(kernel: str = "torch") -> bool:
    """Whether the int4 kernel for CPUs is there: PyTorch's ("torch", `Int4Weight`) in this build, or ours ("bf16",
    `Int4Bf16Weight`: an AVX512-BF16 CPU, built by `native.int4_bf16`)."""
    if kernel == "bf16":
        from .native import int4_bf16

        return int4_bf16()
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
