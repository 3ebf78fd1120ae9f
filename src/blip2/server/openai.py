"""OpenAI chat completions on BLIP-2: messages -> (image, BLIP-2 prompt, options), generations -> OpenAI responses.

Conventions (also in the module docs of `app`):
- exactly one image in the whole conversation (BLIP-2 conditions on one image), anywhere in the user messages;
- system/developer messages are ignored: BLIP-2 was never trained with an instruction preamble, and prepending one
  to the `Question: ... Answer:` prompt only perturbs its answers;
- consecutive messages of one role are joined with a space (clients often send the image and the text apart);
- user/assistant pairs become the history of `processing.chat_prompt` ("Question: q Answer: a." turns, oldest dropped
  first to fit CONTEXT_TOKENS - num_query_tokens tokens); the last user message is the question; if its text is
  empty the answer is a plain caption;
- `temperature` absent or 0 means greedy; `temperature` > 0 or `top_p` < 1 means sampling (OpenAI's default is to
  sample, but BLIP-2's published results are greedy/beam, so greedy is the default here).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..defaults import CONTEXT_TOKENS as CONTEXT_TOKENS  # the chat budget; app.py reads it from here
from ..defaults import MAX_NEW_TOKENS
from ..errors import GenerationError
from ..pipeline import Generation, GenerationOptions
from .schema import ApiError, ChatRequest, ImagePart, ImageURL, SamplingFields, SimpleRequest, TextPart

DEFAULT_MAX_TOKENS = MAX_NEW_TOKENS  # GenerationOptions' default; the VQA route uses VQA_MAX_NEW_TOKENS as the API does


@dataclass
class Conversation:
    image_url: str
    image_field: str  # where the image sits in the request, for error messages: messages[0].content[1].image_url
    history: list[tuple[str, str]]
    question: str  # "" means: caption


def _parts(content: Any, where: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(texts, (image URL, its field path)) of the content of the message at `where` (`messages[i]`)."""
    if content is None:
        return [], []
    if isinstance(content, str):
        return [content], []
    texts, urls = [], []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, ImagePart):
            url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
            urls.append((url, f"{where}.content[{j}].image_url"))
    return texts, urls


def parse_conversation(request: ChatRequest, max_turns: int) -> Conversation:
    """Messages -> one image, the (question, answer) history and the final question; 400 on anything else."""
    turns: list[tuple[str, str]] = []  # (role, text), consecutive same-role messages merged
    urls: list[tuple[str, str]] = []
    for i, message in enumerate(request.messages):
        texts, images = _parts(message.content, f"messages[{i}]")
        if message.role in ("system", "developer"):
            continue
        if images and message.role != "user":
            raise ApiError(400, f"messages[{i}]: only user messages may contain images", "invalid_message")
        urls.extend(images)
        text = " ".join(t.strip() for t in texts if t.strip())
        if turns and turns[-1][0] == message.role:
            turns[-1] = (message.role, f"{turns[-1][1]} {text}".strip())
        else:
            turns.append((message.role, text))
    if len(urls) != 1:
        raise ApiError(
            400,
            f"the conversation must contain exactly one image (BLIP-2 sees one image); found {len(urls)}",
            "image_count",
        )
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last non-system message must be from the user", "invalid_message")
    if turns[0][0] != "user":
        raise ApiError(
            400, "the conversation must start with a user message (after any system messages)", "invalid_message"
        )
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
    if len(history) > max_turns:
        raise ApiError(
            400,
            f"history has {len(history)} turns, more than the limit of {max_turns} (--max-history-turns)",
            "history_too_long",
        )
    return Conversation(urls[0][0], urls[0][1], history, turns[-1][1])


def generation_options(body: SamplingFields, max_tokens: int | None, default_max: int, limit: int) -> GenerationOptions:
    """OpenAI-style fields -> `GenerationOptions`; a bad value is a 400 naming it."""
    # An explicit value above the limit is refused; the default just shrinks to fit a server with a low limit.
    max_new = max_tokens if max_tokens is not None else min(default_max, limit)
    if max_new > limit:
        raise ApiError(400, f"max_tokens={max_new} is more than this server's limit of {limit}", "max_tokens_too_large")
    temperature = getattr(body, "temperature", None)
    top_p = getattr(body, "top_p", None)
    sample = body.do_sample
    if sample is None:
        sample = bool(temperature) or (top_p is not None and top_p < 1.0)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new,
        "do_sample": sample,
        "num_return_sequences": getattr(body, "n", 1),
        "seed": getattr(body, "seed", None),
    }
    if sample and temperature:
        kwargs["temperature"] = temperature
    if sample and top_p is not None:
        kwargs["top_p"] = top_p
    for name, value in (
        ("num_beams", body.num_beams),
        ("repetition_penalty", body.repetition_penalty),
        ("length_penalty", body.length_penalty),
        ("no_repeat_ngram_size", body.no_repeat_ngram_size),
        ("min_new_tokens", body.min_tokens or getattr(body, "min_new_tokens", None)),
    ):
        if value is not None:
            kwargs[name] = value
    try:
        return GenerationOptions(**kwargs)
    except GenerationError as e:
        raise ApiError(400, str(e).split(";")[0].replace("num_return_sequences", "n"), "invalid_options") from e


def chat_options(body: ChatRequest, limit: int) -> GenerationOptions:
    return generation_options(body, body.max_completion_tokens or body.max_tokens, DEFAULT_MAX_TOKENS, limit)


def simple_options(body: SimpleRequest, default_max: int, limit: int) -> GenerationOptions:
    return generation_options(body, body.max_new_tokens or body.max_tokens, default_max, limit)


# ---- responses ------------------------------------------------------------------------------------------------------


def finish_reason(gen: Generation, options: GenerationOptions, eos_ids: set[int]) -> str:
    hit_limit = len(gen.tokens) >= options.max_new_tokens and not (gen.tokens and gen.tokens[-1] in eos_ids)
    return "length" if hit_limit else "stop"


def usage(prompt_tokens: int, gens: list[Generation]) -> dict[str, int]:
    completion = sum(len(g.tokens) for g in gens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_response(model: str, gens: list[Generation], reasons: list[str], prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": g.text}, "logprobs": None, "finish_reason": r}
            for i, (g, r) in enumerate(zip(gens, reasons))
        ],
        "usage": usage(prompt_tokens, gens),
    }


class Chunks:
    """Server-sent events of one streamed chat completion, as OpenAI streams them: per choice a role chunk, content
    chunks, a finish chunk; then (when asked) a usage chunk, and `data: [DONE]`."""

    DONE = "data: [DONE]\n\n"

    def __init__(self, model: str) -> None:
        self.base = {"id": new_id(), "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**self.base, 'choices': choices, **extra})}\n\n"

    def delta(self, index: int, delta: dict[str, Any], reason: str | None = None) -> str:
        return self.event([{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}])

    def role(self, index: int) -> str:
        return self.delta(index, {"role": "assistant", "content": ""})

    def content(self, index: int, text: str) -> str:
        return self.delta(index, {"content": text})

    def finish(self, index: int, reason: str) -> str:
        return self.delta(index, {}, reason)

    def usage(self, prompt_tokens: int, gens: list[Generation]) -> str:
        return self.event([], usage=usage(prompt_tokens, gens))

    def error(self, error: ApiError) -> str:
        """An error after the answer began (the status line is already sent): one event with OpenAI's error body."""
        return f"data: {json.dumps(error.body())}\n\n"


def chat_chunks(
    model: str, gens: list[Generation], reasons: list[str], prompt_tokens: int, include_usage: bool
) -> Iterator[str]:
    """Answers already whole (several choices, beam search: they come out of a batched call) as events: each answer
    is one content chunk. A single greedy or sampled answer streams token by token instead (`app`)."""
    chunks = Chunks(model)
    for i, (g, reason) in enumerate(zip(gens, reasons)):
        yield chunks.role(i)
        if g.text:
            yield chunks.content(i, g.text)
        yield chunks.finish(i, reason)
    if include_usage:
        yield chunks.usage(prompt_tokens, gens)
    yield Chunks.DONE


def simple_response(
    kind: str, model: str, gens: list[Generation], reasons: list[str], prompt_tokens: int, seconds: float
) -> dict[str, Any]:
    return {
        "id": new_id(kind),
        "object": f"blip2.{kind}",
        "created": int(time.time()),
        "model": model,
        "text": gens[0].text,
        "choices": [
            {"index": i, "text": g.text, "score": g.score, "finish_reason": r}
            for i, (g, r) in enumerate(zip(gens, reasons))
        ],
        "usage": usage(prompt_tokens, gens),
        "time_s": round(seconds, 4),
    }
