"""Device and dtype policy (dtype_policy.py): what "auto" means on each device and CPU kind, and the kernel choices
that follow from the CPU's bf16 capability. `BLIP2_CPU_BF16` plays each CPU kind on any machine."""

from __future__ import annotations

import pytest
import torch

import blip2
from blip2 import checkpoint, dtype_policy
from blip2.dtype_policy import CPU_BF16_ENV, cpu_has_native_bf16, placement, resolve_dtype, target_dtype
from blip2.errors import ConfigError
from blip2.quant import StoredLinear

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(("forced", "want"), [("0", torch.float32), ("1", torch.bfloat16)])
def test_auto_on_a_cpu_follows_its_bf16_capability(monkeypatch, forced, want):
    """If this fails, dtype="auto" runs bf16 where PyTorch emulates it (5x slower) or fp32 where bf16 is native."""
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    assert cpu_has_native_bf16() is (forced == "1")
    assert resolve_dtype("auto", CPU) == want


@pytest.mark.parametrize("forced", ["0", "1"])
def test_auto_on_cuda_is_fp16_whatever_the_cpu(monkeypatch, forced):
    """If this fails, a GPU runs fp32 (twice the memory) or bf16 (other answers than the reference's fp16)."""
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    assert resolve_dtype("auto", CUDA) == torch.float16
    assert resolve_dtype("auto", torch.device("mps")) == torch.float32


@pytest.mark.parametrize("bad", ["yes", "2", "true"])
def test_bad_cpu_bf16_variable_is_a_clear_error(monkeypatch, bad):
    """If this fails, a typo in BLIP2_CPU_BF16 is silently read as 'detect'."""
    monkeypatch.setenv(CPU_BF16_ENV, bad)
    with pytest.raises(ConfigError, match=rf"{CPU_BF16_ENV}='{bad}': expected 0 or 1"):
        resolve_dtype("auto", CPU)


def test_names_and_bad_names():
    """If this fails, a dtype typo passes silently or a spelled-out name is refused."""
    assert resolve_dtype("bfloat16", CPU) == resolve_dtype("bf16", CUDA) == torch.bfloat16
    assert resolve_dtype(torch.float16, CPU) == torch.float16
    with pytest.raises(ConfigError, match="int3"):
        resolve_dtype("int3", CPU)
    with pytest.raises(ConfigError, match="not-a-device"):
        dtype_policy.pick_device("not-a-device")


def test_qformer_stays_fp32_under_fp16_only():
    """If this fails, half-precision loading drifts from transformers' (`_keep_in_fp32_modules`, fp16 only)."""
    assert target_dtype("qformer.encoder.layer.0.attention.attention.query.weight", torch.float16) == torch.float32
    assert target_dtype("query_tokens", torch.float16) == torch.float32
    assert target_dtype("vision_model.embeddings.class_embedding", torch.float16) == torch.float16
    assert target_dtype("qformer.layernorm.weight", torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("forced", ["0", "1"])
def test_int8_arithmetic_is_fp32_on_a_cpu_and_fp16_on_a_gpu(monkeypatch, forced):
    """If this fails, int8's wide products (`quant._widened_mm`) run in another dtype than the one they were
    measured and tested in, or the bf16 route is stacked on top of int8."""
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    assert placement("cpu", "int8") == dtype_policy.Placement(CPU, torch.float32, "int8", False)
    assert placement("cuda", "int8") == dtype_policy.Placement(CUDA, torch.float16, "int8", False)


@pytest.mark.parametrize(("forced", "sums_in_fp32"), [("0", True), ("1", False)])
def test_bf16_sums_in_fp32_only_on_a_cpu_without_bf16(monkeypatch, forced, sums_in_fp32):
    """If this fails, bf16 runs on PyTorch's emulated kernel on an AVX2 CPU (4x slower), or native kernels are
    replaced where they are fast."""
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    assert placement("cpu", "bf16").bf16_sums_in_fp32 is sums_in_fp32
    assert placement("cuda", "bf16").bf16_sums_in_fp32 is False
    assert placement("cpu", "fp32").bf16_sums_in_fp32 is False
    auto = placement("cpu", "auto")  # auto picks bf16 only where it is native: never the emulated route
    assert (auto.dtype, auto.bf16_sums_in_fp32) == (torch.bfloat16 if forced == "1" else torch.float32, False)


@pytest.mark.parametrize("forced", ["0", "1"])
def test_loading_follows_the_policy(opt_ckpt, monkeypatch, forced):
    """If this fails, `blip2.load` decides the dtype or the kernels elsewhere than dtype_policy."""
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    auto = blip2.load(opt_ckpt, device="cpu")
    assert auto.dtype == (torch.bfloat16 if forced == "1" else torch.float32)
    bf16 = blip2.load(opt_ckpt, device="cpu", dtype="bf16")
    swapped = any(type(mod) is StoredLinear for mod in bf16.model.modules())
    assert swapped is placement("cpu", "bf16").bf16_sums_in_fp32


def test_checkpoint_reexports_the_policy():
    """If this fails, code importing the dtype names from `blip2.checkpoint` gets a second, diverging copy."""
    assert checkpoint.resolve_dtype is resolve_dtype
    assert checkpoint.cpu_has_native_bf16 is cpu_has_native_bf16
    assert checkpoint.FP32_MODULES is dtype_policy.FP32_MODULES
