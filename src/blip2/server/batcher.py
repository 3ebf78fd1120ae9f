"""Micro-batching across requests: concurrent generation requests with the same options become one model call.

Requests wait in arrival order. The oldest one opens a batch and waits at most `max_wait_ms` for more requests with
the same generation options (up to `max_batch_size`); then the batch runs in a single worker thread, so the event loop
keeps accepting requests meanwhile. The wait counts from the request's arrival or from the moment the model became
free, whichever is later: a request that arrived while a batch ran still waits `max_wait_ms` after it, for the
clients that batch has just answered to send their next requests. Without that, 8 clients that each send again on
an answer settle into alternating batches (1, 7, 1, 7, ...): the lone early request found its wait long over and
left alone. Under load batches fill themselves, and an idle server adds at most `max_wait_ms` of latency.

`max_wait_ms=None` (the server's default) waits `AUTO_WAIT_SHARE` of the last batch's time, between
`AUTO_WAIT_MIN_S` and `AUTO_WAIT_MAX_S`: a client answered by a batch needs some tens of milliseconds to send again
(HTTP, JSON, image decoding, more on a busy CPU), and a wait shorter than that splits the batches. The floor covers
the clients of a fast batch (a tiny model, a GPU); the share covers those of a slow one, where sending again takes
longer. `bench/serve_load.py` measures the batch sizes and rates this gives; the figures are in docs/speed.md.

Batching never changes an answer (`Blip2.generate` is batch-invariant), with one exception handled here: a seeded
sampling request runs alone, because the random stream of a batch depends on its other members.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from ..defaults import AUTO_WAIT_MAX_S, AUTO_WAIT_MIN_S, AUTO_WAIT_SHARE, ServerSettings
from ..pipeline import Generation, GenerationOptions

log = logging.getLogger("blip2.server")

GenerateFn = Callable[[Sequence[Any], Sequence[str], GenerationOptions], list[Generation]]
R = TypeVar("R")
# Runs one model call (a function of no arguments) and gives its result; the default runs it in the worker thread.
RunModel = Callable[[Callable[[], R]], Awaitable[R]]


class QueueFull(Exception):
    """The queue of waiting requests is at its bound; the caller should answer 503 with Retry-After."""


@dataclass
class Job:
    image: Any
    prompt: str
    options: GenerationOptions
    key: Any
    future: asyncio.Future
    arrived: float  # the batcher's clock
    run: Callable[[], Any] | None = None  # a call of its own (a streamed answer), run alone in the worker thread


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    largest: int = 0

    def add(self, size: int) -> None:
        self.batches += 1
        self.requests += size
        self.largest = max(self.largest, size)


class MicroBatcher:
    """`await submit(image, prompt, options)` -> that request's generations (`options.num_return_sequences` of them).

    `clock` (seconds, monotonic) and `run_model` are for tests, which drive the batcher in virtual time: the clock
    must be the event loop's (`loop.time`) whenever the loop's time is not `time.monotonic`.
    """

    def __init__(
        self,
        generate: GenerateFn,
        max_batch_size: int = ServerSettings.max_batch_size,
        max_wait_ms: float | None = ServerSettings.max_wait_ms,
        max_queue: int = ServerSettings.max_queue,
        *,
        clock: Callable[[], float] = time.monotonic,
        run_model: RunModel | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or (max_wait_ms is not None and max_wait_ms < 0):
            raise ValueError(f"bad batcher limits: batch {max_batch_size}, queue {max_queue}, wait {max_wait_ms} ms")
        self.generate = generate
        self.max_batch_size = max_batch_size
        self.max_wait = None if max_wait_ms is None else max_wait_ms / 1000.0  # None: from the last batch's time
        self.max_queue = max_queue
        self.stats = BatchStats()
        self.clock = clock
        self._run_model = run_model or self._in_worker_thread
        self._pending: list[Job] = []
        self._wakeup = asyncio.Event()
        self._alone = itertools.count()  # unique keys for requests that must not share a batch
        # One thread: the model is not re-entrant, and torch already spreads one call over the CPU cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blip2-generate")
        self._task: asyncio.Task | None = None
        self._free_since = 0.0  # clock time at which the last batch's answers were handed out
        self._last_batch_s = 0.0  # how long the last model call took

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="blip2-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("server shutting down"))
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _in_worker_thread(self, call: Callable[[], R]) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    @property
    def queued(self) -> int:
        return len(self._pending)

    # ---- requests --------------------------------------------------------------------------------------------------
    def batch_key(self, options: GenerationOptions) -> Any:
        if options.do_sample and options.seed is not None:
            return ("alone", next(self._alone))
        # The seed only matters when sampling; dropping it lets greedy requests that carry a seed share a batch.
        return replace(options, seed=None) if not options.do_sample else options

    async def submit(self, image: Any, prompt: str, options: GenerationOptions) -> list[Generation]:
        return await self._enqueue(Job(image, prompt, options, self.batch_key(options), self._future(), self.clock()))

    def submit_alone(self, run: Callable[[], Any]) -> asyncio.Future:
        """Queue `run()` to be called in the worker thread, alone, in arrival order with the other requests (a
        streamed answer runs so: it holds the model until its last token or its cancellation). Returns its future;
        cancel it to drop a call that has not started. Raises `QueueFull` now."""
        job = Job(None, "", GenerationOptions(), ("alone", next(self._alone)), self._future(), self.clock(), run)
        self._enqueue(job)
        return job.future

    def _future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    def _enqueue(self, job: Job) -> asyncio.Future:
        if len(self._pending) >= self.max_queue:
            raise QueueFull(f"{len(self._pending)} requests are already waiting (--max-queue {self.max_queue})")
        self._pending.append(job)
        self._wakeup.set()
        return job.future

    # ---- the loop --------------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = await self._next_batch()
                if not batch:
                    continue
                self.stats.add(len(batch))
                started = self.clock()
                try:
                    results = await self._run_model(lambda batch=batch: self._generate_batch(batch))
                except Exception as e:  # noqa: BLE001 - _generate_batch already isolates per-request failures
                    results = [e] * len(batch)
                self._last_batch_s = self.clock() - started
                for job, result in zip(batch, results):
                    if job.future.done():  # the client went away meanwhile
                        continue
                    if isinstance(result, BaseException):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)
                self._free_since = self.clock()

    async def _next_batch(self) -> list[Job]:
        """Wait until the oldest request's batch is full or its wait is over, then take that batch."""
        self._pending = [j for j in self._pending if not j.future.done()]  # drop cancelled requests
        if not self._pending:
            return []
        first = self._pending[0]
        deadline = max(first.arrived, self._free_since) + self.wait_s()
        while first.run is None and self._count(first.key) < self.max_batch_size:
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch = [j for j in self._pending if j.key == first.key and not j.future.done()][: self.max_batch_size]
        taken = {id(j) for j in batch}
        self._pending = [j for j in self._pending if id(j) not in taken]
        return batch

    def wait_s(self) -> float:
        """Seconds the oldest request waits for company (module docstring)."""
        if self.max_wait is not None:
            return self.max_wait
        return min(max(AUTO_WAIT_SHARE * self._last_batch_s, AUTO_WAIT_MIN_S), AUTO_WAIT_MAX_S)

    def _count(self, key: Any) -> int:
        return sum(1 for j in self._pending if j.key == key)

    def _generate_batch(self, batch: list[Job]) -> list[list[Generation] | BaseException]:
        """Runs in the worker thread. One model call for the batch; if it fails, each request alone, so one bad
        request cannot fail the others."""
        if batch[0].run is not None:
            try:
                return [batch[0].run()]
            except Exception as e:  # noqa: BLE001 - reported to its request
                return [e]
        options = batch[0].options
        n = options.num_return_sequences
        try:
            gens = self.generate([j.image for j in batch], [j.prompt for j in batch], options)
            return [gens[i * n : (i + 1) * n] for i in range(len(batch))]
        except Exception as e:  # noqa: BLE001 - reported to the request(s) it belongs to
            if len(batch) == 1:
                return [e]
            log.warning("a batch of %d failed (%s); retrying one by one", len(batch), e)
            return [self._generate_batch([j])[0] for j in batch]
