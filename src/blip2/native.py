"""Kernels of our own in C++ (`csrc/`), compiled for the running machine at first use and cached.

`int4_bf16_mm` (csrc/int4_bf16.cpp) multiplies a few bf16 rows by int4 weights with AVX512-BF16's `vdpbf16ps`, for
the decoding steps of `dtype="int4"` (`int4.Int4Bf16Weight`): PyTorch's own int4 kernel for CPUs converts each
weight to a float before multiplying and is compute-bound at one row, reading the weights at about half the
machine's bandwidth; this one reads them near it (`bench/int4_gemv.py`, docs/speed.md). `routes.py` times both and
keeps the faster.

The library is built with PyTorch's extension builder (a C++ compiler and ninja) into
`$XDG_CACHE_HOME/blip2/kernels/<hash>/` (else `~/.cache/blip2/`; the hash covers the source, the torch version and
the Python version), once per machine: about ten seconds; later processes load it at once. Where the CPU lacks
AVX512-BF16, `BLIP2_NATIVE=0` is set, or the build fails (no compiler: the warning says why), nothing is built
and the int4 route keeps PyTorch's kernel.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

from .cpuinfo import cpu_flags

NATIVE_ENV = "BLIP2_NATIVE"
SOURCE = Path(__file__).parent / "csrc" / "int4_bf16.cpp"


class NativeBuildWarning(UserWarning):
    """A kernel of csrc/ could not be built or loaded; the route that wanted it uses PyTorch's kernels."""


def build_folder(source: bytes) -> Path:
    digest = hashlib.sha256(source + torch.__version__.encode() + sys.version.encode()).hexdigest()[:16]
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "blip2" / "kernels" / digest


@functools.cache
def int4_bf16() -> bool:
    """Whether `torch.ops.blip2_native.int4_bf16_mm` is there to call: built (or loaded) now if this CPU has
    AVX512-BF16 (its own flag, whatever `BLIP2_CPU_BF16` makes the routes assume) and `BLIP2_NATIVE` is not 0."""
    if os.environ.get(NATIVE_ENV, "").strip() == "0" or "avx512_bf16" not in cpu_flags():
        return False
    if hasattr(torch.ops.blip2_native, "int4_bf16_mm"):
        return True
    try:
        from torch.utils.cpp_extension import load

        folder = build_folder(SOURCE.read_bytes())
        folder.mkdir(parents=True, exist_ok=True)
        load(
            name="blip2_int4_bf16",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp"],  # at::parallel_for runs on OpenMP threads, as PyTorch's own ops do
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # a missing compiler or ninja, a failed build: each raises its own kind
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"the int4 kernel of {SOURCE.name} was not built ({first_line}); dtype='int4' decodes on PyTorch's "
            f"int4 kernel (set {NATIVE_ENV}=0 to skip the build)",
            NativeBuildWarning,
            stacklevel=2,
        )
        return False
    torch.library.register_fake("blip2_native::int4_bf16_mm")(_int4_bf16_shape)
    return True


def _int4_bf16_shape(x: torch.Tensor, packed: torch.Tensor, scales, offsets, group: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], packed.shape[0] * 16), dtype=torch.float32)
