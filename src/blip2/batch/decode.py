"""Decoding and preprocessing in worker processes, running ahead of the model with a bounded window.

On Linux workers are forked, as torch's DataLoader does: a spawned worker would first import torch and transformers
(seconds per run, which is most of a small run); the workers only run PIL and numpy, not torch's thread pools.
Elsewhere they are spawned. Each worker ignores SIGINT (Ctrl-C is the parent's to handle, once) and on Linux asks
the kernel to kill it when the parent dies, so a `kill -9` of the run leaves no orphans behind.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from ..processing import ImageTransform
from .inputs import Item, prepare


def default_workers() -> int:
    """One core is left to the model's own threads; beyond 8 decoders the model is the bottleneck anyway."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # best effort: the pool still stops its workers on a normal exit


def decoded(
    items: Iterable[Item], transform: ImageTransform, max_pixels: int, workers: int, window: int
) -> Iterator[tuple[Item, np.ndarray | str]]:
    """(item, (3, S, S) float32 pixels or the reason it failed), in input order.

    With `workers` > 0 at most `window` items are in flight, so memory stays bounded however slow the model is,
    while the workers keep decoding the next batches during generation.
    """
    if workers <= 0:
        for item in items:
            yield item, prepare(item, transform, max_pixels)
        return
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_worker_init) as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.apply_async(prepare, (item, transform, max_pixels))))
            if len(pending) >= window:
                first, result = pending.popleft()
                yield first, result.get()
        while pending:
            first, result = pending.popleft()
            yield first, result.get()
