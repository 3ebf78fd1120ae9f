"""Token streaming: the text of one generation, in pieces, as its tokens are generated; and a way to stop it.

`TextStream` runs the generation in a thread of its own. `transformers`' `generate` hands each new token to a
streamer; the stream decodes the tokens so far and gives out the new text only where it can no longer change: up to
the last whitespace, since a tokenizer may merge the bytes of a character or the spaces around punctuation across
tokens (as `transformers`' `TextIteratorStreamer`). At the end the rest of the exact answer follows, so the pieces
joined are the answer `caption`/`ask` give for the same options, to the character.

Beam search cannot stream token by token (which beam wins is known only at the end): with `num_beams > 1` the
answer comes as one piece when it is done. `cancel()` (from any thread) stops the generation at its next step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .errors import GenerationError


class _End:
    """The queue's last item: the run has returned `result`, or raised `error`."""

    def __init__(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error


def _work(run: Callable[[dict[str, Any]], Any], hooks: dict[str, Any], out: queue.Queue) -> None:
    """The generation thread. It holds no reference to its `TextStream`, so an abandoned stream is collected (and
    its `__del__` cancels the generation)."""
    try:
        with torch.no_grad():
            out.put(_End(result=run(hooks)))
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer's thread
        out.put(_End(error=e))


class _TokenQueue(BaseStreamer):
    """Puts each newly generated token id of a batch of one on a queue."""

    def __init__(self, out: queue.Queue) -> None:
        self.out = out
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # `generate` first puts the prompt (or the decoder's start token)
            self.prompt_seen = True
            return
        self.out.put(int(value.reshape(-1)[0]))

    def end(self) -> None:
        """Nothing: the stream ends once the whole run has returned, after it has recorded what it needs."""


class _Cancelled(StoppingCriteria):
    """Stops every sequence once `flag` is set (checked after each decoding step)."""

    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


def stable_prefix(text: str) -> str:
    """The part of a stripped partial answer that more tokens cannot change: all but its last word, stripped."""
    words = text.split()
    if not words:
        return ""
    return text[: len(text) - len(words[-1])].rstrip()


class TextStream(Iterator[str]):
    """An iterator of text pieces whose join is the finished answer.

    `run(hooks)` generates the answer and returns its `Generation`; it must pass `hooks` (`streamer`, when
    `streamable`, and `stopping_criteria`) to `transformers`' `generate`. It starts at the first `next()`, in a
    thread, under `torch.no_grad()`. `text(tokens)` is the answer's text of a list of token ids (specials dropped,
    stripped). `on_end(generation)` runs in the consumer's thread when the whole answer has been given out (not
    after `cancel`). After the end, `result` is the `Generation` (partial if cancelled).

    `cancel()` is safe from any thread and does not wait; `close()` (and leaving a `with` block) cancels and waits
    for the generation to stop, so the model is free again when it returns.
    """

    def __init__(
        self,
        run: Callable[[dict[str, Any]], Any],
        text: Callable[[list[int]], str],
        streamable: bool,
        on_end: Callable[[Any], None] | None = None,
    ) -> None:
        self._run, self._text, self._on_end = run, text, on_end
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._hooks: dict[str, Any] = {"stopping_criteria": StoppingCriteriaList([_Cancelled(self._stop)])}
        if streamable:
            self._hooks["streamer"] = _TokenQueue(self._queue)
        self._thread: threading.Thread | None = None
        self._tokens: list[int] = []
        self._given = ""  # the text given out so far
        self._done = False
        self.result: Any = None

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def cancel(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.cancel()
        if self._thread is not None and not self._done:
            self._thread.join()
            while not isinstance(item := self._queue.get(), _End):
                pass
            self.result = item.result
        self._done = True

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # an abandoned stream stops generating
        self._stop.set()

    def __next__(self) -> str:
        if self._done or (self._thread is None and self._stop.is_set()):
            self._done = True
            raise StopIteration
        if self._thread is None:
            args = (self._run, self._hooks, self._queue)
            self._thread = threading.Thread(target=_work, args=args, name="blip2-stream", daemon=True)
            self._thread.start()
        while True:
            item = self._queue.get()
            if isinstance(item, _End):
                return self._finish(item)
            self._tokens.append(item)
            piece = self._advance(stable_prefix(self._text(self._tokens)))
            if piece:
                return piece

    def _advance(self, text: str) -> str:
        """The new part of `text` when it extends what was given out (else nothing yet)."""
        if len(text) <= len(self._given) or not text.startswith(self._given):
            return ""
        piece, self._given = text[len(self._given) :], text
        return piece

    def _finish(self, end: _End) -> str:
        self._thread.join()
        self._done = True
        self.result = end.result
        if end.error is not None:
            raise end.error
        if self._stop.is_set():
            raise StopIteration
        final = self.result.text
        if not final.startswith(self._given):  # the tokenizer rewrote text before a space: nothing can be taken back
            raise GenerationError(f"the streamed text {self._given!r} is not the start of the answer {final!r}")
        if self._on_end is not None:
            self._on_end(self.result)
        piece = self._advance(final)
        if not piece:
            raise StopIteration
        return piece
