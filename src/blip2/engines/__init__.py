"""Engines: what turns a prepared image and a prompt into tokens and text.

    m = blip2.load("Salesforce/blip2-opt-2.7b")                    # ours: exact against transformers, the default
    m = blip2.load("Salesforce/blip2-opt-2.7b", engine="vllm")     # vLLM: continuous batching, GPUs
    m.caption("cat.jpg"); m.ask("cat.jpg", "what is it?")
    for delta in m.stream("cat.jpg", "Question: what is it? Answer:"): print(delta, end="")

Both engines answer the same calls (`Engine` below), so batch captioning, the server and the CLI run either one.
Ours is `blip2.pipeline.Blip2`; vLLM's is `blip2.engines.vllm.VllmBlip2`, which runs vLLM in its own Python
(docs/engines.md says how to install it) and talks to it over local HTTP.

`stream` yields text deltas whose concatenation equals the text `generate` gives for the same request; `TextDeltas`
turns generated token ids into such deltas with the rule `Blip2.decode` uses for the whole text (special tokens
dropped, the text stripped), so any engine that produces token ids streams text that adds up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

    from ..pipeline import Generation, GenerationOptions, ImageInput
    from ..processing import ImageTransform

ENGINES = ("ours", "vllm")
DEFAULT_ENGINE = "ours"

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "AsyncEngine",
    "AsyncTextStream",
    "Engine",
    "TextDeltas",
    "check_engine",
    "eos_ids",
]


@runtime_checkable
class Engine(Protocol):
    """What batch captioning, the server and the CLI need of a loaded model, whichever engine runs it."""

    name: str  # the model as the user named it
    engine: str  # one of ENGINES
    tokenizer: Any  # the checkpoint's tokenizer (counting prompt tokens, decoding)
    transform: ImageTransform  # the image preprocessing of the checkpoint: `prepared` images are its output

    @property
    def config(self) -> Any: ...  # blip2.config.Blip2Config (num_query_tokens, ...)

    def generate(
        self,
        images: Sequence[ImageInput],
        prompts: Sequence[str] | None = None,
        options: GenerationOptions | None = None,
        **gen: Any,
    ) -> list[Generation]:
        """One `Generation` (text, tokens, score) per (image, prompt) pair, x num_return_sequences."""

    def generate_pixels(
        self, pixel_values: torch.Tensor, prompts: Sequence[str], options: GenerationOptions | None = None, **gen: Any
    ) -> list[Generation]:
        """`generate` for images already prepared by `transform`: (B, 3, S, S) float32."""

    def stream(self, image: ImageInput, prompt: str | None = None, **gen: Any) -> Iterator[str]:
        """Text deltas of one generation as they come; joined they equal `generate`'s text."""

    def caption_prompt(self, prompt: str | None = None) -> str:
        """The LM prompt a caption is asked with (`prompt`, or the model family's default)."""

    def question_prompt(self, question: str) -> str:
        """The LM prompt of a visual question (the model family's VQA template)."""

    def caption(self, image: Any, prompt: str | None = None, **gen: Any) -> Any: ...

    def ask(self, image: Any, question: Any, **gen: Any) -> Any: ...


@runtime_checkable
class AsyncEngine(Protocol):
    """The server's side of an engine that batches continuously (vLLM): requests join the running batch one by one,
    so the server hands each request over as it comes instead of batching them itself."""

    async def agenerate(self, image: ImageInput, prompt: str, options: GenerationOptions) -> list[Generation]:
        """One request's generations; cancelling the awaiting task aborts the request in the engine."""

    def astream(self, image: ImageInput, prompt: str, options: GenerationOptions) -> AsyncTextStream:
        """One request streamed: text deltas as they come, then its `Generation` as `result`."""


@runtime_checkable
class AsyncTextStream(Protocol):
    """What `AsyncEngine.astream` returns: `await open()` sends the request (a refusal raises here, before any
    text); `async for delta in stream` gives text deltas whose join is `agenerate`'s text; after the last one
    `result` is the `Generation` (tokens, score), as `agenerate` gives it. `aclose()`, or cancelling the task that
    reads it, aborts the request in the engine."""

    result: Generation | None

    async def open(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...


def check_engine(engine: str) -> str:
    """The engine's name, or `ConfigError` naming the known ones."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    return engine


def eos_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """The ids that end a generation: the generation config's `eos_token_id` (an id or a list), else the
    tokenizer's."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


class TextDeltas:
    """Token ids in, text deltas out; the deltas add up to `Blip2.decode`'s text of all the ids.

    That text drops special tokens and is stripped, so a delta is held back while it is whitespace that may turn
    out to be trailing, or while it ends in an incomplete UTF-8 sequence (a byte-level token can end mid-character:
    the tokenizer then decodes U+FFFD, which the next token may complete).

        deltas = TextDeltas(tokenizer)
        for ids in chunks: yield deltas.add(ids)
        yield deltas.finish()
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.specials = set(tokenizer.all_special_ids)
        self.tokens: list[int] = []
        self.sent = ""  # the text handed out so far: always a prefix of the final text

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()

    def add(self, ids: Sequence[int]) -> str:
        """The new text that is certain after `ids`, "" when none is."""
        self.tokens += [t for t in ids if t not in self.specials]
        text = self._text()
        if text.endswith("\ufffd"):  # maybe half a character: wait for the rest
            text = text.rstrip("\ufffd").rstrip()
        return self._advance(text)

    def finish(self) -> str:
        """The rest of the text, once the generation has ended."""
        return self._advance(self._text())

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # a later token changed earlier text (not seen with byte-level BPE)
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta
