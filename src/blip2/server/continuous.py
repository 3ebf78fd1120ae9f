"""The server's path to an engine that batches continuously (vLLM, `--engine vllm`).

Such an engine adds each request to its running batch at the next decoding step and removes it when it ends, so the
server does not gather requests itself (our engine's `MicroBatcher` does): each request goes to the engine as it
comes (`AsyncEngine.agenerate`, or `astream` when streamed). It has the batcher's interface (`start`, `stop`,
`submit`, `queued`, `stats`), so the routes are the same for both engines. A request whose client disconnects is
cancelled (`until_disconnected`; a stream, when its response is cancelled), which closes its connection to vLLM, and
vLLM aborts it: its slot in the batch is free at the next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..defaults import ServerSettings
from ..pipeline import Generation, GenerationOptions
from .batcher import BatchStats, QueueFull

T = TypeVar("T")


class Disconnected(Exception):
    """The client went away before its answer was ready; its request has been cancelled."""


class Continuous:
    """`await submit(image, prompt, options)` -> that request's generations, from `model().agenerate`."""

    def __init__(self, model: Callable[[], Any], max_queue: int = ServerSettings.max_queue) -> None:
        self.model = model
        self.max_queue = max_queue  # requests in flight at most; beyond it QueueFull (503)
        self.stats = BatchStats()  # each request counts as a batch of one: the engine batches them
        self.in_flight = 0

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    @property
    def queued(self) -> int:
        return self.in_flight

    def _admit(self) -> None:
        if self.in_flight >= self.max_queue:
            raise QueueFull(f"{self.in_flight} requests are already running (--max-queue {self.max_queue})")
        self.in_flight += 1
        self.stats.add(1)

    async def submit(self, image: Any, prompt: str, options: GenerationOptions) -> list[Generation]:
        self._admit()
        try:
            return await self.model().agenerate(image, prompt, options)
        finally:
            self.in_flight -= 1

    def submit_stream(
        self, image: Any, prompt: str, options: GenerationOptions, put: Callable[..., None]
    ) -> Callable[[], None]:
        """Stream one request from `model().astream`: `put("start")` once the engine has taken it, `put("piece",
        text)` per delta, then `put("end", generation)`, or `put("error", e)` instead of the rest. Returns its
        cancel function, which closes the engine's stream (vLLM aborts the request). Raises `QueueFull` now."""
        self._admit()

        async def run() -> None:
            try:
                stream = self.model().astream(image, prompt, options)
                try:
                    await stream.open()
                    put("start")
                    async for piece in stream:
                        put("piece", piece)
                    put("end", stream.result)
                finally:
                    await stream.aclose()
            except Exception as e:  # noqa: BLE001 - answered to its client
                put("error", e)
            finally:
                self.in_flight -= 1

        return asyncio.ensure_future(run()).cancel


async def until_disconnected(receive: Callable[[], Awaitable[dict]], work: Awaitable[T]) -> T:
    """`work`'s result; if the client disconnects first, `work` is cancelled and `Disconnected` raised.

    `receive` is the request's ASGI receive: once the body has been read, its next message is `http.disconnect`."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        raise Disconnected("the client disconnected")
    return task.result()
