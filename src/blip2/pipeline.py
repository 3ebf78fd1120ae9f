"""`Blip2`: the user-facing object. Images and strings in, strings and scores out.

    m = blip2.load("Salesforce/blip2-opt-2.7b")
    m.caption("cat.jpg"); m.caption("cat.jpg", prompt="a photo of"); m.ask("cat.jpg", "what is it?")
    chat = m.chat("cat.jpg"); chat.ask("what is it?"); chat.ask("what colour is it?")

The image side (vision encoder + Q-Former + projection) runs once per distinct image: its output is kept in a small
LRU cache keyed by the image's content, so a chat, or several questions about one image, reuse it. A chat with a
decoder-only LM also keeps the LM's key/value cache of the conversation so far and only runs the new tokens.

InstructBLIP checkpoints (`Salesforce/instructblip-*`) load into the same object: their Q-Former also reads the
prompt (the instruction, in its own BERT tokens), so the cache keeps the vision features and the Q-Former runs for
each (image, prompt). Their prompts are instructions (docs/instructblip.md): `caption` asks "A short image caption."
and `ask` uses "Question: {} Short Answer:", as LAVIS evaluates them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .adapter import apply_adapter, find_adapter
from .checkpoint import freed_memory_returned, load_model
from .defaults import (
    BATCH_SIZE,
    CONTEXT_TOKENS,
    GENERATION,
    INSTRUCT_CAPTION_PROMPT,
    INSTRUCT_VQA_TEMPLATE,
    INSTRUCTION_TOKENS,
    VQA_MAX_NEW_TOKENS,
    VQA_TEMPLATE,
)
from .dtype_policy import cache_storage, kv_cache_choice, placement
from .errors import ConfigError, GenerationError
from .model import Blip2Model, scored_generate
from .processing import QFORMER_TEXT_TOKENS, ImageTransform, chat_prompt, load_image, vqa_prompt
from .quant import bf16_sums_in_fp32, pack_bf16, pack_int8
from .scoring import itc_similarity, itm_logits, match_probability
from .streaming import TextStream

# A path, encoded bytes, a PIL image, or pixels already prepared by `Blip2.transform`: a (3, S, S) float tensor (the
# server and the batch engines decode each image once, in their own threads or workers, and pass the pixels).
ImageInput = str | os.PathLike | bytes | Image.Image | torch.Tensor


@dataclass(frozen=True)
class GenerationOptions:
    """Every generation option, in one place. Defaults: `blip2.defaults.GENERATION` (greedy; LAVIS uses 5 beams)."""

    max_new_tokens: int = GENERATION["max_new_tokens"]
    min_new_tokens: int = GENERATION["min_new_tokens"]
    num_beams: int = GENERATION["num_beams"]
    do_sample: bool = GENERATION["do_sample"]
    top_p: float = GENERATION["top_p"]
    temperature: float = GENERATION["temperature"]
    repetition_penalty: float = GENERATION["repetition_penalty"]
    length_penalty: float = GENERATION["length_penalty"]
    no_repeat_ngram_size: int = GENERATION["no_repeat_ngram_size"]
    num_return_sequences: int = GENERATION["num_return_sequences"]
    seed: int | None = GENERATION["seed"]

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.min_new_tokens >= 0, "min_new_tokens must be >= 0"),
            (self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be <= max_new_tokens"),
            (self.num_beams >= 1, "num_beams must be >= 1"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.temperature > 0.0, "temperature must be > 0"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0"),
            (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be >= 0"),
            (1 <= self.num_return_sequences, "num_return_sequences must be >= 1"),
            (
                self.do_sample or self.num_return_sequences <= self.num_beams,
                "num_return_sequences must be <= num_beams unless do_sample",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationError(f"{message}; got {self}")

    def hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `transformers`' `generate`."""
        kw = asdict(self)
        kw.pop("seed")
        if not self.do_sample:  # sampling-only options would only trigger warnings
            kw.pop("top_p")
            kw.pop("temperature")
        return kw


VQA_OPTIONS = GenerationOptions(max_new_tokens=VQA_MAX_NEW_TOKENS)


@dataclass
class Generation:
    text: str
    tokens: list[int]
    score: float  # log-probability of the tokens (beam search: the length-penalised beam score)


def _image_key(image: ImageInput) -> str:
    h = hashlib.sha1()
    if isinstance(image, torch.Tensor):
        pixels = image.detach().to("cpu", torch.float32).contiguous()
        h.update(f"pixels{tuple(pixels.shape)}".encode())
        h.update(pixels.numpy().tobytes())
    elif isinstance(image, Image.Image):
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
    elif isinstance(image, bytes):
        h.update(image)
    else:
        path = Path(image)
        stat = path.stat() if path.exists() else None
        h.update(f"{path.resolve()}:{stat and stat.st_size}:{stat and stat.st_mtime_ns}".encode())
    return h.hexdigest()


class Blip2:
    """A loaded BLIP-2 (or InstructBLIP) checkpoint with its tokenizer(s) and image transform."""

    engine = "ours"  # blip2.engines: the engine that generates

    def __init__(
        self,
        model: Blip2Model,
        tokenizer,
        transform: ImageTransform,
        device: torch.device,
        name: str = "",
        image_cache_size: int = 64,
        qformer_tokenizer=None,
    ) -> None:
        if model.config.is_instruct and qformer_tokenizer is None:
            raise ConfigError(f"{name}: an InstructBLIP model needs its Q-Former tokenizer (qformer_tokenizer/)")
        self.model = model
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        if qformer_tokenizer is not None:  # as LAVIS: BERT pads on the right and keeps an instruction's end
            qformer_tokenizer.padding_side, qformer_tokenizer.truncation_side = "right", "left"
        self.transform = transform
        self.device = device
        self.name = name
        self.dtype = model.vision_model.dtype
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = image_cache_size
        if tokenizer is not None and model.language_model is not None:
            # OPT pads on the left so every prompt ends where generation starts; T5's encoder is padded right.
            tokenizer.padding_side = "right" if model.is_encoder_decoder else "left"

    @property
    def config(self):
        return self.model.config

    # ---- images ---------------------------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(B, 3, S, S): each image decoded once (`blip2.images.load_image`) and transformed; prepared pixels as
        they are."""
        pixels = [im if isinstance(im, torch.Tensor) else self.transform([load_image(im)])[0] for im in images]
        for im in pixels:
            if im.shape != (3, self.transform.size, self.transform.size):
                raise ConfigError(
                    f"pixels of shape {tuple(im.shape)}; this model takes (3, {self.transform.size}, "
                    f"{self.transform.size}) from its transform"
                )
        return torch.stack(pixels).to(self.device, self.dtype)

    @torch.no_grad()
    def image_prefix(self, images: Sequence[ImageInput], prompts: Sequence[str] | None = None) -> torch.Tensor:
        """(B, Nq, d_lm) soft prompts, computed once per distinct image and then taken from the cache.

        InstructBLIP: the Q-Former also reads `prompts` (one per image, as given to the LM), so the cache holds the
        vision features and the Q-Former runs for each (image, prompt)."""
        if not self.config.is_instruct:
            return self._per_image(images, self.model.image_prefix)
        if prompts is None or len(prompts) != len(images):
            raise ValueError("an InstructBLIP prefix needs one prompt (its instruction) per image")
        features = self._per_image(images, self.model.encode_image)  # (B, N, Dv)
        return self.model.features_prefix(features, *self.instruction_ids(prompts))

    def _per_image(self, images: Sequence[ImageInput], compute) -> torch.Tensor:
        """`compute(pixels)` for each distinct image, through the LRU cache, stacked in the order of `images`."""
        keys = [_image_key(im) for im in images]
        todo = {k: im for k, im in zip(keys, images) if k not in self._cache}
        if todo:
            fresh = compute(self.pixel_values(list(todo.values())))
            for k, p in zip(todo, fresh):
                self._cache[k] = p
        out = torch.stack([self._cache[k] for k in keys])
        for k in keys:
            self._cache.move_to_end(k)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    # ---- text: the public processor of prompts, tokens and texts --------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """LM prompts -> (ids, attention mask), both (B, T) on the model's device, padded on the side the LM
        expects (left for decoder-only LMs, so every prompt ends where generation starts)."""
        enc = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def instruction_ids(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """InstructBLIP prompts -> the Q-Former's (ids, attention mask) (B, T) (`qformer_input_ids`): its BERT
        tokens, padded right, cut to their last `INSTRUCTION_TOKENS` as LAVIS."""
        enc = self.qformer_tokenizer(
            list(prompts), padding=True, truncation=True, max_length=INSTRUCTION_TOKENS, return_tensors="pt"
        )
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def caption_prompt(self, prompt: str | None = None) -> str:
        """The prompt a caption is asked with: `prompt` if given; else nothing (BLIP-2 captions from the image
        alone) or `INSTRUCT_CAPTION_PROMPT` (InstructBLIP is asked for one)."""
        if prompt:
            return prompt
        return INSTRUCT_CAPTION_PROMPT if self.config.is_instruct else ""

    def question_prompt(self, question: str) -> str:
        """The VQA prompt: "Question: {} Answer:" (BLIP-2) or "Question: {} Short Answer:" (InstructBLIP)."""
        return vqa_prompt(question, INSTRUCT_VQA_TEMPLATE if self.config.is_instruct else VQA_TEMPLATE)

    def decode(self, tokens: torch.Tensor, scores: torch.Tensor) -> list[Generation]:
        """Generated ids (B, T) and their scores (B,) -> one `Generation` per row: special tokens dropped, the text
        stripped."""
        out = []
        specials = set(self.tokenizer.all_special_ids)
        for row, score in zip(tokens.tolist(), scores.tolist()):
            kept = [t for t in row if t not in specials]
            out.append(Generation(text=self.text(kept), tokens=kept, score=float(score)))
        return out

    def text(self, tokens: list[int]) -> str:
        """The answer's text of generated token ids: special tokens dropped, stripped."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def require_text_side(self) -> None:
        """Raise `ConfigError` unless the checkpoint has a Q-Former text side (ITC/ITM: blip2-itm-vit-g, stage 1)."""
        if not hasattr(self.model, "itm_head"):
            raise ConfigError(f"{self.name}: this checkpoint has no Q-Former text side (use e.g. blip2-itm-vit-g)")

    def text_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts for the Q-Former's text side -> (ids, attention mask) (B, T) on the model's device, truncated to
        `QFORMER_TEXT_TOKENS` as LAVIS's retrieval models."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=QFORMER_TEXT_TOKENS, return_tensors="pt"
        )
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    # ---- generation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        images: Sequence[ImageInput],
        prompts: Sequence[str] | None = None,
        options: GenerationOptions | None = None,
        batch_size: int = BATCH_SIZE,
        **gen: Any,
    ) -> list[Generation]:
        """One generation per (image, prompt) pair (x num_return_sequences), in batches of `batch_size` pairs.

        A batch gives what each pair gives alone: prompts are padded on the side the LM expects and masked. An empty
        prompt asks for a caption (`caption_prompt`).
        """
        if self.model.language_model is None:
            raise ConfigError(f"{self.name}: a retrieval checkpoint has no language model; use similarity/match")
        opts = replace(options or GenerationOptions(), **gen)
        images = list(images)
        prompts = [self.caption_prompt(p) for p in ([""] * len(images) if prompts is None else prompts)]
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chunks = range(0, len(images), batch_size)
        with self._seeded(opts.seed):
            return [
                g
                for i in chunks
                for g in self._generate(
                    self.image_prefix(images[i : i + batch_size], prompts[i : i + batch_size]),
                    prompts[i : i + batch_size],
                    opts,
                )
            ]

    @torch.no_grad()
    def generate_pixels(
        self, pixel_values: torch.Tensor, prompts: Sequence[str], options: GenerationOptions | None = None, **gen: Any
    ) -> list[Generation]:
        """`generate` for images already preprocessed by `self.transform` (B, 3, S, S), e.g. in worker processes."""
        opts = replace(options or GenerationOptions(), **gen)
        prompts = [self.caption_prompt(p) for p in prompts]
        instruction = self.instruction_ids(prompts) if self.config.is_instruct else ()
        with self._seeded(opts.seed):
            prefix = self.model.image_prefix(pixel_values.to(self.device, self.dtype), *instruction)
            return self._generate(prefix, prompts, opts)

    def _generate(self, prefix: torch.Tensor, prompts: list[str], opts: GenerationOptions) -> list[Generation]:
        ids, mask = self.tokenize(prompts)
        return self.decode(*self.model.generate(prefix, ids, mask, **opts.hf_kwargs()))

    @contextlib.contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        """A scope whose random state starts at `seed` (when given) and is restored afterwards."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            yield

    def caption(self, image: ImageInput | Sequence[ImageInput], prompt: str | None = None, **gen: Any):
        """A caption, or with `prompt` the continuation of it. A list of images gives a list of strings."""
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        texts = [g.text for g in self.generate(images, [self.caption_prompt(prompt)] * len(images), **gen)]
        return texts[0] if single else texts

    def stream(
        self, image: ImageInput, prompt: str | None = None, options: GenerationOptions | None = None, **gen: Any
    ) -> TextStream:
        """`caption(image, prompt, **gen)` as text pieces, given out as the tokens are generated: joined, they are
        that caption exactly (`blip2.streaming`). Beam search gives the answer as one piece when it is done.

        The image is read and encoded now (a bad one raises here); the generation starts at the first `next()`, in
        a thread. One stream or other call on a model at a time: close a stream (or read it to its end) first.
        """
        opts = self._stream_options(options, gen)
        prompt = self.caption_prompt(prompt)
        prefix = self.image_prefix([image], [prompt])  # (1, Nq, d)
        ids, mask = self.tokenize([prompt])

        def run(hooks: dict[str, Any]) -> Generation:
            with self._seeded(opts.seed):
                return self.decode(*self.model.generate(prefix, ids, mask, **opts.hf_kwargs(), **hooks))[0]

        return TextStream(run, self.text, streamable=opts.num_beams == 1)

    def _stream_options(self, options: GenerationOptions | None, gen: dict[str, Any]) -> GenerationOptions:
        if self.model.language_model is None:
            raise ConfigError(f"{self.name}: a retrieval checkpoint has no language model; use similarity/match")
        opts = replace(options or GenerationOptions(), **gen)
        if opts.num_return_sequences != 1:
            raise GenerationError(f"a stream gives one answer: num_return_sequences must be 1; got {opts}")
        return opts

    def ask(self, image: ImageInput | Sequence[ImageInput], question: str | Sequence[str], **gen: Any):
        """Visual question answering with the `question_prompt` template."""
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        questions = [question] * len(images) if isinstance(question, str) else list(question)
        prompts = [self.question_prompt(q) for q in questions]
        texts = [g.text for g in self.generate(images, prompts, VQA_OPTIONS, **gen)]
        return texts[0] if single else texts

    def chat(self, image: ImageInput, context: int = CONTEXT_TOKENS) -> Chat:
        return Chat(self, image, context=context)

    # ---- retrieval ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(B, Nq, E) normalised query embeddings."""
        self.require_text_side()
        return self.model.image_embeddings(self.model.encode_image(self.pixel_values(list(images)))).float()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, E) normalised text embeddings."""
        self.require_text_side()
        return self.model.text_embeddings(*self.text_ids(texts)).float()

    @torch.no_grad()
    def similarity(self, images: Sequence[ImageInput], texts: Sequence[str]) -> torch.Tensor:
        """ITC (Ni, Nt): cosine similarity, max over the query embeddings (`scoring.itc_similarity`)."""
        return itc_similarity(self.embed_images(images), self.embed_texts(texts))

    @torch.no_grad()
    def match(self, images: Sequence[ImageInput], texts: Sequence[str]) -> torch.Tensor:
        """ITM (Ni, Nt): probability that each text describes each image (`scoring.match_probability`)."""
        self.require_text_side()
        image_embeds = self.model.encode_image(self.pixel_values(list(images)))  # (Ni, N, Dv)
        ids, mask = self.text_ids(texts)
        ni, nt = image_embeds.shape[0], ids.shape[0]
        pairs_img = image_embeds.repeat_interleave(nt, dim=0)  # (Ni*Nt, N, Dv): image i with every text
        logits = itm_logits(self.model, pairs_img, ids.repeat(ni, 1), mask.repeat(ni, 1))  # (Ni*Nt, 2)
        return match_probability(logits).reshape(ni, nt)


def load(
    model: str | os.PathLike,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    image_cache_size: int = 64,
    compile: bool = False,
    adapter: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    engine: str = "ours",
    kv_cache: str | None = None,
    **engine_options: Any,
) -> Blip2:
    """Load a checkpoint (Hub id or local folder) with its tokenizer and image preprocessing.

    `adapter`: a LoRA adapter folder for the LM (peft's layout), merged in as the model loads; by default the
    checkpoint's own `adapter/` folder, which a fine-tuning run with LoRA writes (blip2.adapter).

    A LAVIS `.pth` file holds only the weights LAVIS trained: `base` (Hub id or folder) is the checkpoint whose
    frozen ViT and LM complete it, and whose tokenizer and preprocessing it uses; without one, the base is found
    from the LAVIS model type in the file (docs/architecture.md, "LAVIS checkpoints").

    `compile=True` decodes with a static KV cache and a `torch.compile`d step (model.Blip2Model._decoding_kwargs):
    the first generation compiles (tens of seconds on a CPU), the first of another length once more, with dynamic
    shapes; later ones reuse that.
    `kv_cache`: the dtype the LM's key/value cache is stored in while generating: "auto" (the route's: int8 on the
    CPU int8/int4 routes, else the arithmetic's, as `transformers`), "int8" (a quarter of fp32's memory: larger
    batches), "bf16", "fp16" or "fp32"; by default `BLIP2_KV_CACHE`, else "auto" (dtype_policy.cache_storage;
    docs/dtypes.md).
    `engine="vllm"` runs the checkpoint on vLLM instead (`blip2.engines.vllm.VllmBlip2`; `engine_options`: python,
    url, args), with the same generation calls; docs/engines.md."""
    from transformers import AutoTokenizer, GenerationConfig

    from .engines import check_engine

    kv_cache = kv_cache_choice(kv_cache)
    if check_engine(engine) == "vllm":
        from .engines.vllm import load as load_vllm

        if compile or str(device).startswith("mps") or kv_cache != "auto":
            raise ConfigError(
                f"engine 'vllm' takes neither compile, kv_cache {kv_cache!r} nor device {device!r}: those are engine "
                "'ours'"
            )
        return load_vllm(model, dtype=str(dtype), **engine_options)
    if engine_options:
        raise TypeError(f"options of engine 'vllm' given to engine 'ours': {', '.join(sorted(engine_options))}")

    where = placement(device, dtype)  # device, dtypes and kernels: dtype_policy decides them all
    kv_storage = cache_storage(where, kv_cache)
    if compile and kv_cache != "auto":
        raise ConfigError(f"kv_cache {kv_cache!r} with compile: compiled decoding keeps transformers' static cache")
    dev = where.device
    pack = where.pack_bf16 and not compile  # a compiled graph prepacks its own weights
    m, folder = load_model(model, where.dtype, where.quantize, base, mmap=not pack)
    adapter = adapter if adapter is not None else find_adapter(folder)
    if adapter is not None:
        apply_adapter(m, adapter)
    if m.language_model is not None and (folder / "generation_config.json").is_file():
        m.language_model.generation_config = GenerationConfig.from_pretrained(folder)
    m.to(dev)
    m.compile_decoding = compile
    m.kv_storage = None if compile else kv_storage  # compiled decoding: transformers' static cache
    if where.bf16_sums_in_fp32:
        bf16_sums_in_fp32(m)  # same arithmetic as the emulated bf16 kernel, faster (quant.StoredLinear, docs/dtypes.md)
    if pack:  # the same products, bit for bit, without a reorder of each weight per call (quant.PackedLinear)
        with freed_memory_returned():
            pack_bf16(m)
    if where.pack_int8 and not compile:  # the same, for int8 activations (quant.PackedInt8Linear)
        with freed_memory_returned():
            pack_int8(m)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{folder}: no usable tokenizer ({e})") from e
    return Blip2(
        m,
        tokenizer,
        ImageTransform.from_pretrained(folder),
        dev,
        name=str(model),
        image_cache_size=image_cache_size,
        qformer_tokenizer=_qformer_tokenizer(folder) if m.config.is_instruct else None,
    )


def _qformer_tokenizer(folder: Path):
    """An InstructBLIP checkpoint's Q-Former (BERT) tokenizer, in `qformer_tokenizer/` as `InstructBlipProcessor`
    saves it."""
    from transformers import AutoTokenizer

    where = folder / "qformer_tokenizer"
    if not where.is_dir():
        raise ConfigError(f"{folder}: an InstructBLIP checkpoint needs its Q-Former tokenizer in {where.name}/")
    try:
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: no usable Q-Former tokenizer ({e})") from e


class Chat:
    """A conversation about one image; `ask` keeps the history as `Question: q Answer: a.` turns.

    The prompt fits a context budget (default `CONTEXT_TOKENS`, counting the query tokens); the oldest turns go first
    and the current question is never cut. With a decoder-only LM and greedy or sampled decoding (one sequence),
    the key/value cache of the previous turn is kept: the next turn runs only the tokens after the longest common
    prefix, so the image and the shared history are not recomputed. InstructBLIP's Q-Former reads each turn's prompt,
    so each turn has a new prefix (from the cached image features) and runs the LM on the whole prompt.
    """

    def __init__(self, model: Blip2, image: ImageInput, context: int = CONTEXT_TOKENS) -> None:
        self.m = model
        self.context = context
        self.history: list[tuple[str, str]] = []
        self.set_image(image)

    def set_image(self, image: ImageInput) -> None:
        self.image = image
        # (1, Nq, d): raises ImageError now, not at the first question. InstructBLIP's depends on the prompt too:
        # each turn makes its own from the cached image features.
        self.prefix = self.m.image_prefix([image], [self.m.caption_prompt()])
        self.reset()

    def reset(self) -> None:
        self.history = []
        self.last: Generation | None = None
        self._kv = None
        self._kv_ids: list[int] = []

    def prompt_for(self, question: str) -> str:
        budget = self.context - self.m.config.num_query_tokens
        return chat_prompt(self.history, question, lambda s: len(self.m.tokenizer(s).input_ids), budget)

    @torch.no_grad()
    def ask(self, question: str, **gen: Any) -> str:
        generation = self._turn(question, replace(GenerationOptions(), **gen))({})
        self._record(question, generation)
        return generation.text

    def stream(self, question: str, **gen: Any) -> TextStream:
        """`ask(question, **gen)` as text pieces, given out as the tokens are generated (`Blip2.stream`); the turn
        joins the history when the whole answer has been read. A stream closed before its end leaves the history
        as it was (the kept key/value cache stays consistent: the next turn reuses what it shares)."""
        opts = self.m._stream_options(None, gen)
        return TextStream(
            self._turn(question, opts), self.m.text, opts.num_beams == 1, lambda g: self._record(question, g)
        )

    def _turn(self, question: str, opts: GenerationOptions) -> Callable[[dict[str, Any]], Generation]:
        """Builds the turn's prompt now; returns the function that generates its answer, passing `hooks` (a
        streamer, stopping criteria) on to `transformers`' `generate`."""
        prompt = self.prompt_for(question)
        ids, mask = self.m.tokenize([prompt])
        instruct = self.m.config.is_instruct  # a new prefix each turn: the LM's cache of the last turn does not apply
        prefix = self.m.image_prefix([self.image], [prompt]) if instruct else self.prefix

        def run(hooks: dict[str, Any]) -> Generation:
            with self.m._seeded(opts.seed):
                if instruct or self.m.model.is_encoder_decoder or opts.num_beams > 1 or opts.num_return_sequences > 1:
                    tokens, scores = self.m.model.generate(prefix, ids, mask, **opts.hf_kwargs(), **hooks)
                else:
                    tokens, scores = self._generate_cached(ids, opts, hooks)
            return self.m.decode(tokens, scores)[0]

        return run

    def _record(self, question: str, generation: Generation) -> None:
        self.last = generation  # the full Generation (tokens, score) of this answer
        self.history.append((question.strip(), generation.text))

    def _generate_cached(
        self, ids: torch.Tensor, opts: GenerationOptions, hooks: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.m.model
        full = model.placeholder_ids(ids)  # (1, Nq + T)
        full_list = full[0].tolist()
        n_query = self.m.config.num_query_tokens
        common = 0
        for a, b in zip(self._kv_ids, full_list):
            if a != b:
                break
            common += 1
        keep = min(common, len(full_list) - 1)  # generate needs at least one uncached token
        gen = {**opts.hf_kwargs(), **hooks}
        ones = torch.ones_like(full)
        if self._kv is not None and keep >= n_query:
            self._kv.crop(keep - self._kv.get_seq_length())  # negative: drop the tail after the common prefix
            out, scores = scored_generate(
                model.language_model, input_ids=full, attention_mask=ones, cache=self._kv, **gen
            )
        else:
            embeds, _ = model.lm_inputs(self.prefix, ids, None)
            cache = model.new_cache(full.shape[1], gen)  # later turns grow it
            out, scores = scored_generate(
                model.language_model, input_ids=full, inputs_embeds=embeds, attention_mask=ones, cache=cache, **gen
            )
        self._kv = out.cache
        self._kv_ids = out.sequences[0, : self._kv.get_seq_length()].tolist()
        return out.sequences[:, full.shape[1] :], scores
