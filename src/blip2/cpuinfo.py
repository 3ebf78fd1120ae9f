"""The running CPU's name and the SIMD flags that decide its kernels, read from /proc/cpuinfo (standard library only,
so that any module may ask, the kernel builder of `native.py` included)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD flags that decide which kernels PyTorch can use (AVX2, AVX-512 and its bf16/VNNI parts, AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    present = set(line.split(":", 1)[-1].split())
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16")
    return [f for f in wanted if f in present] + sorted(f for f in present if f.startswith("amx_") and f != "amx_bf16")
