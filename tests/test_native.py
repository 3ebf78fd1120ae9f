"""Our C++ kernels (blip2.native): built once per machine into the user's cache, and where they cannot be built
the routes keep PyTorch's kernels.

If these fail, a machine without a C++ compiler (or without AVX512-BF16) fails to load `dtype="int4"` instead of
decoding on PyTorch's int4 kernel, the failure is silent (a user never learns why int4 is slower there), or the
kernel is rebuilt by every process."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from blip2.machine import cpu_flags
from blip2.native import NATIVE_ENV, SOURCE, build_folder, int4_bf16

PROBE = """
import torch
from blip2.native import int4_bf16
from blip2.int4 import Int4Weight
print("built", int4_bf16())
print("layer", type(Int4Weight.quantize(torch.randn(64, 128), kernel="bf16")).__name__)
"""


def _probe(tmp_path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != NATIVE_ENV} | {"XDG_CACHE_HOME": str(tmp_path)} | env
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=environ, timeout=300)


def test_without_a_compiler_int4_decodes_on_pytorchs_kernel(tmp_path):
    out = _probe(tmp_path, CXX="/bin/false")
    assert out.returncode == 0, out.stderr
    assert "built False" in out.stdout and "layer Int4Weight" in out.stdout  # PyTorch's kernel, not None (int8)
    if "avx512_bf16" in cpu_flags():  # elsewhere nothing is tried, so there is nothing to warn about
        assert "NativeBuildWarning" in out.stderr and "int4_bf16.cpp was not built" in out.stderr


def test_the_switch_turns_the_build_off(tmp_path):
    out = _probe(tmp_path, **{NATIVE_ENV: "0"})
    assert out.returncode == 0, out.stderr
    assert "built False" in out.stdout and "layer Int4Weight" in out.stdout
    assert "Warning" not in out.stderr and not (tmp_path / "blip2" / "kernels").exists()


def test_a_built_kernel_lies_in_the_cache_for_the_next_process():
    if not int4_bf16():
        import pytest

        pytest.skip("our int4 kernel needs an AVX512-BF16 CPU and a C++ compiler")
    folder = build_folder(SOURCE.read_bytes())
    assert (folder / "blip2_int4_bf16.so").is_file()
    assert hasattr(torch.ops.blip2_native, "int4_bf16_mm")
