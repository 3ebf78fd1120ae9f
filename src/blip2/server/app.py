"""The FastAPI app: OpenAI-compatible chat completions with one image, caption/VQA routes, a web page.

Routes
    GET  /healthz               no auth; 503 {"status": "loading"} until the model is loaded, then 200 {"status": "ok"}
    GET  /v1/models             the one served model, OpenAI's list shape
    POST /v1/chat/completions   OpenAI chat completions (image_url parts, stream, n, seed, max_tokens, ...)
    POST /v1/caption            multipart (`file` + fields) or JSON {"image": base64, "prompt"?, options}
    POST /v1/vqa                same, with "question"
    GET  /                      the web page (no auth: it asks for the key itself), assets under /static

Every error is `{"error": {"message", "type", "code"}}` with a 4xx/5xx status; no request can stop the server.
The model loads in a background thread so the port opens at once and `/healthz` can say "loading".
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..defaults import VQA_MAX_NEW_TOKENS, ServerSettings
from ..engines import eos_ids
from ..errors import Blip2Error, GenerationError
from ..processing import chat_prompt
from . import images as img
from .batcher import MicroBatcher, QueueFull
from .continuous import Continuous, Disconnected, until_disconnected
from .limits import BodyLimit
from .openai import (
    CONTEXT_TOKENS,
    DEFAULT_MAX_TOKENS,
    Chunks,
    chat_chunks,
    chat_options,
    chat_response,
    finish_reason,
    parse_conversation,
    simple_options,
    simple_response,
)
from .schema import ApiError, ChatRequest, SimpleRequest, error_body

log = logging.getLogger("blip2.server")
STATIC = Path(__file__).parent / "static"


@dataclass
class State:
    settings: ServerSettings
    status: str = "loading"  # loading | ok | failed
    error: str = ""
    model: Any = None
    counter: Any = None  # a private tokenizer copy for counting, so the worker thread's tokenizer is never shared
    eos_ids: set[int] = field(default_factory=set)
    batcher: MicroBatcher | Continuous | None = None


def load_in_background(state: State, loader: Callable[[], Any], on_error: Callable[[BaseException], None]) -> None:
    def work() -> None:
        started = time.perf_counter()
        try:
            m = loader()
            state.counter = copy.deepcopy(m.tokenizer)
            state.eos_ids = getattr(m, "eos_ids", None) or eos_ids(
                m.tokenizer, getattr(m.model.language_model, "generation_config", None)
            )
            state.model = m
            state.status = "ok"
            log.info("model %s loaded in %.1f s", state.settings.model, time.perf_counter() - started)
        except BaseException as e:  # noqa: BLE001 - reported on /healthz and to the CLI, which exits
            state.status, state.error = "failed", f"{type(e).__name__}: {e}"
            log.error("could not load %s: %s", state.settings.model, state.error)
            on_error(e)

    threading.Thread(target=work, name="blip2-load", daemon=True).start()


def create_app(
    settings: ServerSettings,
    loader: Callable[[], Any] | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> Any:
    """The ASGI app (FastAPI inside a body-size guard). `loader` defaults to `blip2.load(settings.model, ...)`."""
    if loader is None:

        def loader() -> Any:
            from ..pipeline import load

            return load(settings.model, device=settings.device, dtype=settings.dtype, engine=settings.engine)

    state = State(settings)

    def generate(images, prompts, options):  # runs in the batcher's worker thread
        return state.model.generate(images, prompts, options)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.engine == "vllm":  # vLLM batches continuously: each request goes to it as it comes
            state.batcher = Continuous(lambda: state.model, settings.max_queue)
        else:
            state.batcher = MicroBatcher(generate, settings.max_batch_size, settings.max_wait_ms, settings.max_queue)
        state.batcher.start()
        load_in_background(state, loader, on_load_error or (lambda e: None))
        yield
        await state.batcher.stop()

    app = FastAPI(title="BLIP-2", version="0.1.0", lifespan=lifespan)
    app.state.blip2 = state
    install_error_handlers(app)
    auth = [Depends(api_key_checker(settings.api_key))]
    add_routes(app, state, auth)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return BodyLimit(app, int(settings.max_body_mb * 1024 * 1024))


# ---- auth and errors ------------------------------------------------------------------------------------------------


def api_key_checker(key: str | None) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                "invalid_api_key",
                {"WWW-Authenticate": "Bearer"},
            )

    return check


def validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        if e.get("type") == "json_invalid":
            return f"invalid JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}"
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        code = "invalid_json" if any(e.get("type") == "json_invalid" for e in errors) else "invalid_request"
        message = validation_message(errors)
        if any(tuple(e.get("loc", ())) == ("body",) for e in errors):  # FastAPI saw no JSON object at all
            message = "the request body must be a JSON object (send Content-Type: application/json)"
        return JSONResponse(error_body(400, message, code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(exc.status_code, str(exc.detail), code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(
            error_body(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error"), status_code=500
        )


# ---- shared request steps -------------------------------------------------------------------------------------------


def ready_model(state: State) -> Any:
    if state.status != "ok":
        what = "is still loading" if state.status == "loading" else f"failed to load ({state.error})"
        raise ApiError(503, f"the model {what}", "model_not_ready", {"Retry-After": "5"})
    return state.model


async def image_from_url(state: State, url: str, field: str) -> Any:
    s = state.settings
    if url.startswith("data:"):
        data = img.decode_data_uri(url, field)
    elif not s.allow_remote_images:
        raise ApiError(
            400,
            f"{field}: only data: URIs are accepted (send the image base64-encoded); this server "
            "was not started with --allow-remote-images",
            "remote_images_disabled",
        )
    else:
        data = await run_in_threadpool(img.fetch, url, int(s.max_image_mb * 1024 * 1024), s.remote_timeout_s)
    return await pixels_of(state, data, field)


async def pixels_of(state: State, data: bytes, field: str) -> Any:
    """Decode once, in a worker thread: (3, S, S) pixels are what the batcher batches and the model caches."""
    transform = state.model.transform
    return await run_in_threadpool(img.image_pixels, data, field, state.settings.max_image_pixels, transform)


async def run_generation(state: State, image: Any, prompt: str, options: Any, request: Request) -> list[Any]:
    """The request's generations; a client that disconnects meanwhile cancels its request (and frees its slot)."""
    try:
        return await until_disconnected(request.receive, state.batcher.submit(image, prompt, options))
    except Disconnected as e:  # nobody reads this answer; nginx's code for it
        raise ApiError(499, str(e), "client_disconnected") from e
    except (QueueFull, Blip2Error) as e:
        raise api_error(e) from e


def api_error(e: BaseException) -> ApiError:
    """A generation's failure as the answer the client gets."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFull):
        return ApiError(503, f"server busy: {e}; retry shortly", "queue_full", {"Retry-After": "1"})
    if isinstance(e, GenerationError):
        return ApiError(400, str(e), "invalid_options")
    if isinstance(e, Blip2Error):
        return ApiError(400, str(e), "invalid_request")
    log.error("a streamed generation failed: %s: %s", type(e).__name__, e)
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", "internal_error")


def open_stream(model: Any, image: Any, prompt: str, options: Any) -> Any:
    """The one place a streamed answer starts (in the batcher's worker thread): an iterator of text pieces with a
    thread-safe `cancel()` and, once read to its end, `result` (the `Generation`)."""
    return model.stream(image, prompt, options)


def stream_in_worker(
    state: State, image: Any, prompt: str, options: Any, put: Callable[..., None]
) -> Callable[[], None]:
    """`Continuous.submit_stream` for our engine: the stream runs alone in the micro-batcher's worker thread, in
    arrival order with the batched requests; cancelling drops it if not started, else stops it at the next step,
    which frees the worker."""
    opened: list[Any] = []  # the stream, once open
    cancelled = threading.Event()

    def run() -> None:  # the worker thread
        try:
            stream = open_stream(state.model, image, prompt, options)
            opened.append(stream)
            if cancelled.is_set():  # set before `opened` was filled: `cancel` below did not see the stream
                stream.cancel()
            put("start")
            for piece in stream:
                put("piece", piece)
            put("end", stream.result)
        except Exception as e:  # noqa: BLE001 - answered to its client
            put("error", e)

    future = state.batcher.submit_alone(run)

    def failed(f: asyncio.Future) -> None:  # e.g. the server stopping before the call ran
        if not f.cancelled() and f.exception() is not None:
            put("error", f.exception())

    future.add_done_callback(failed)

    def cancel() -> None:
        cancelled.set()
        future.cancel()
        for stream in opened:
            stream.cancel()

    return cancel


async def stream_chat(
    state: State, image: Any, prompt: str, options: Any, prompt_tokens: int, include_usage: bool
) -> StreamingResponse:
    """One answer streamed token by token, with either engine: ours streams it in the micro-batcher's worker
    (`stream_in_worker`), vLLM as it adds its tokens to the running batch (`Continuous.submit_stream`). A client that
    goes away cancels it (ours: dropped, or stopped at the next step; vLLM: the request is aborted)."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()  # ("start" | "piece" | "end" | "error", value), from any thread

    def put(kind: str, value: Any = None) -> None:
        loop.call_soon_threadsafe(items.put_nowait, (kind, value))

    start = state.batcher.submit_stream if isinstance(state.batcher, Continuous) else partial(stream_in_worker, state)
    try:
        cancel = start(image, prompt, options, put)
    except QueueFull as e:
        raise api_error(e) from e
    kind, value = await items.get()
    if kind == "error":  # before any text: an HTTP error status
        raise api_error(value)

    async def events() -> AsyncIterator[str]:
        chunks = Chunks(state.settings.name)
        try:
            yield chunks.role(0)
            while True:
                kind, value = await items.get()
                if kind == "piece":
                    yield chunks.content(0, value)
                    continue
                if kind == "error":
                    yield chunks.error(api_error(value))
                else:
                    yield chunks.finish(0, finish_reason(value, options, state.eos_ids))
                    if include_usage:
                        yield chunks.usage(prompt_tokens, [value])
                break
            yield Chunks.DONE
        finally:  # the end, or the client went away (the response is cancelled)
            cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def count_tokens(state: State, text: str) -> int:
    return len(state.counter(text).input_ids)


# ---- routes ---------------------------------------------------------------------------------------------------------


def add_routes(app: FastAPI, state: State, auth: list[Any]) -> None:
    s = state.settings

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        body: dict[str, Any] = {"status": state.status, "model": s.name}
        if state.status == "failed":
            body["error"] = state.error
        if state.batcher is not None:
            stats = state.batcher.stats
            body["queued"] = state.batcher.queued
            body["batches"] = {"batches": stats.batches, "requests": stats.requests, "largest": stats.largest}
        return JSONResponse(body, status_code=200 if state.status == "ok" else 503)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        entry = {"id": s.name, "object": "model", "created": 0, "owned_by": "blip2"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        m = ready_model(state)
        conversation = parse_conversation(body, s.max_history_turns)
        options = chat_options(body, s.max_tokens_limit)
        image = await image_from_url(state, conversation.image_url, conversation.image_field)
        if conversation.question:
            budget = CONTEXT_TOKENS - m.config.num_query_tokens
            prompt = chat_prompt(conversation.history, conversation.question, lambda t: count_tokens(state, t), budget)
        else:  # an empty question asks for a caption, with no history
            prompt = m.caption_prompt()
        prompt_tokens = m.config.num_query_tokens + count_tokens(state, prompt)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        one_sequence = options.num_return_sequences == 1 and options.num_beams == 1
        if body.stream and one_sequence:
            return await stream_chat(state, image, prompt, options, prompt_tokens, include_usage)
        gens = await run_generation(state, image, prompt, options, request)
        reasons = [finish_reason(g, options, state.eos_ids) for g in gens]
        if body.stream:  # several answers or beam search: each answer whole, as one content chunk
            return StreamingResponse(
                chat_chunks(s.name, gens, reasons, prompt_tokens, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return chat_response(s.name, gens, reasons, prompt_tokens)

    @app.post("/v1/caption", dependencies=auth)
    async def caption(request: Request) -> dict[str, Any]:
        return await simple_route(state, request, "caption")

    @app.post("/v1/vqa", dependencies=auth)
    async def vqa(request: Request) -> dict[str, Any]:
        return await simple_route(state, request, "vqa")


async def read_simple(request: Request) -> tuple[SimpleRequest, bytes | None, str]:
    """Multipart (`file` + fields) or JSON -> (fields, uploaded bytes or None, image name for messages)."""
    content_type = request.headers.get("content-type", "").lower()
    upload: bytes | None = None
    name = "image"
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1, max_fields=32)
        except Exception as e:  # noqa: BLE001 - starlette's multipart errors have no common base class
            raise ApiError(400, f"malformed multipart body ({e})", "invalid_multipart") from e
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "file":
                    raise ApiError(400, f"unexpected file field {key!r}; upload the image as 'file'", "invalid_request")
                upload, name = await value.read(), f"file ({value.filename})" if value.filename else "file"
            elif value != "":  # an empty form field means "not given", as browsers send unfilled inputs
                fields[key] = value
    elif content_type.startswith("application/json") or not content_type:
        try:
            fields = await request.json()
        except ValueError as e:
            raise ApiError(400, f"invalid JSON body: {e}", "invalid_json") from e
        if not isinstance(fields, dict):
            raise ApiError(400, "JSON body must be an object", "invalid_request")
    else:
        raise ApiError(
            415,
            f"unsupported content type {content_type!r}; send multipart/form-data or JSON",
            "unsupported_media_type",
        )
    try:
        body = SimpleRequest.model_validate(fields)
    except ValidationError as e:
        raise ApiError(400, validation_message(e.errors()), "invalid_request") from e
    return body, upload, name


async def simple_route(state: State, request: Request, kind: str) -> dict[str, Any]:
    started = time.perf_counter()
    m = ready_model(state)
    s = state.settings
    body, data, name = await read_simple(request)
    if data is None:
        if not body.image:
            raise ApiError(400, "no image: upload a 'file' (multipart) or send 'image' (base64) in JSON", "no_image")
        data = img.decode_base64(body.image)
    if kind == "vqa":
        question = (body.question or "").strip()
        if not question:
            raise ApiError(400, "vqa needs a non-empty 'question'", "no_question")
        prompt, default_max = m.question_prompt(question), VQA_MAX_NEW_TOKENS  # as the API
    else:
        prompt, default_max = m.caption_prompt(body.prompt), DEFAULT_MAX_TOKENS
    options = simple_options(body, default_max, s.max_tokens_limit)
    image = await pixels_of(state, data, name)
    gens = await run_generation(state, image, prompt, options, request)
    reasons = [finish_reason(g, options, state.eos_ids) for g in gens]
    prompt_tokens = m.config.num_query_tokens + count_tokens(state, prompt)
    return simple_response(kind, s.name, gens, reasons, prompt_tokens, time.perf_counter() - started)
