"""`StepGate`: pauses a language model mid-generation, so a test can see what came out before the end, untimed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

GUARD_S = 60.0  # a paused step waits at most this long for `release()`: a failing test fails instead of hanging


class StepGate:
    """Wraps `lm.forward` (one call per decoding step, the prefill included). After `pause_after(n)`, the n+1-th
    next call waits for `release()` (or for `wait()`, when given: e.g. a read from a pipe another process writes)."""

    def __init__(self, lm: Any, wait: Callable[[], object] | None = None) -> None:
        self.calls = 0
        self.held = threading.Event()  # set when a call is waiting at the gate
        self._limit: int | None = None
        self._released = threading.Event()
        self._wait = wait or (lambda: self._released.wait(GUARD_S))
        forward = lm.forward

        def gated(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self._limit is not None and self.calls > self._limit:
                self.held.set()
                self._wait()
                self._limit = None
            return forward(*args, **kwargs)

        lm.forward = gated

    def pause_after(self, steps: int) -> None:
        self._released.clear()
        self.held.clear()
        self._limit = self.calls + steps

    def release(self) -> None:
        self._released.set()
