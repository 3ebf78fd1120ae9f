"""Request bodies (OpenAI chat completions, the simple caption/VQA routes) and OpenAI's error shape.

Unknown top-level fields are allowed and ignored: OpenAI clients send fields this server has no use for
(`user`, `logprobs: false`, `presence_penalty`, ...), and refusing them would break those clients.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# ---- errors ---------------------------------------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    503: "server_error",
}


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "code"}}` with an HTTP status; never a traceback."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code)


def error_body(status: int, message: str, code: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


# ---- chat completions -----------------------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None  # OpenAI's low/high/auto; BLIP-2 always sees 224 px, so it is ignored


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str  # some clients send the URL string directly


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """BLIP-2 generation options beyond OpenAI's, accepted as extra body fields (as vLLM does)."""

    num_beams: int | None = Field(None, ge=1, le=16)
    do_sample: bool | None = None
    repetition_penalty: float | None = Field(None, gt=0)
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    min_tokens: int | None = Field(None, ge=0)


class ChatRequest(SamplingFields):
    model_config = ConfigDict(extra="allow")
    model: str | None = None  # any name is accepted: the server serves one model
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


# ---- /v1/caption and /v1/vqa ----------------------------------------------------------------------------------------


class SimpleRequest(SamplingFields):
    """JSON body, or the same fields as multipart form fields next to a `file` upload."""

    model_config = ConfigDict(extra="forbid")  # a typo in a form field should not be silently ignored
    image: str | None = None  # base64, or a data: URI (JSON bodies only)
    prompt: str | None = None  # caption: the text the caption starts with
    question: str | None = None  # vqa
    max_tokens: int | None = Field(None, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)  # the Python API's name; either works
    min_new_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, gt=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    seed: int | None = None
