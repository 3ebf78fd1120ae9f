"""Blip2Model: tensors in, tensors out.

    pixel_values (B, 3, S, S) -> vision_model (B, N, Dv) -> qformer queries (B, Nq, Dq)
        -> language_projection (B, Nq, d_lm) -> frozen LM with the prompt tokens -> logits / token ids
    (retrieval layout)  queries -> vision_projection (B, Nq, E);  text CLS -> text_projection (B, E);  itm_head
    (InstructBLIP)      the Q-Former reads [queries; instruction tokens]; only the query rows go on to the LM

Attribute names are those of `transformers`' `Blip2ForConditionalGeneration`, `Blip2ForImageTextRetrieval` and
`InstructBlipForConditionalGeneration`, so a HF state dict loads without renaming. Images, tokens and prompts live
in `processing`/`pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import build_vision
from .config import Blip2Config
from .language import build_language_model
from .qformer import QFormer, TextEmbeddings

CPU_VISION_CHUNK = 4  # images per pass of the vision encoder on a CPU (encode_image)


@dataclass
class Blip2Output:
    logits: torch.Tensor  # causal: (B, Nq + T, V); seq2seq: (B, T_dec, V)
    loss: torch.Tensor | None = None


def scored_generate(lm: nn.Module, **kwargs) -> tuple:
    """`lm.generate(**kwargs, return_dict_in_generate=True)` and one score per sequence: the beam score with beam
    search, else the summed log-probability of the chosen tokens (a finished sequence's padding counts 0).

    Greedy search records each step's chosen log-probability as it goes (`_ChosenLogProbs`); the other modes keep
    every step's (B, V) scores until the end (`output_scores`), which for a batch of 32 and 100 new tokens over
    OPT's 50272 words is 640 MB."""
    from transformers import LogitsProcessorList

    kwargs = {**kwargs, "return_dict_in_generate": True}
    if not _is_greedy(lm, kwargs):
        out = lm.generate(**kwargs, output_scores=True)
        return out, sequence_scores(lm, out)
    recorder = _ChosenLogProbs()
    kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), recorder])
    out = lm.generate(**kwargs, output_scores=False)
    steps = recorder.finish(out.sequences)
    prompt = kwargs.get("input_ids")
    if prompt is not None and not lm.config.is_encoder_decoder:
        new = out.sequences.shape[1] - prompt.shape[1]
        if steps.shape[1] != new:  # a decoding loop that skipped the processors: no score to give
            raise RuntimeError(f"greedy search recorded {steps.shape[1]} scores for {new} new tokens")
    return out, _summed(lm, out.sequences[:, out.sequences.shape[1] - steps.shape[1] :], steps)


def _is_greedy(lm: nn.Module, kwargs: dict) -> bool:
    """Whether `lm.generate(**kwargs)` runs greedy search with no processor after the caller's ones (transformers
    appends sampling warpers and a watermark after them): the generation config as `generate` builds it."""
    import copy

    from transformers.generation import GenerationMode

    config = copy.deepcopy(kwargs.get("generation_config") or lm.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
    mode = config.get_generation_mode(kwargs.get("assistant_model"))
    custom = kwargs.get("custom_generate") is not None  # a decoding loop of its own: its processors are its own
    return mode == GenerationMode.GREEDY_SEARCH and config.watermarking_config is None and not custom


class _ChosenLogProbs:
    """A logits processor, last in greedy search's list: it keeps the current step's final scores, and at the next
    step, whose ids end with the token chosen from them, their log-probability of that token (B, 1). One step's
    scores are held at a time."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []
        self.scores: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1:])
        self.scores = scores
        return scores

    def _take(self, chosen: torch.Tensor) -> None:
        if self.scores is not None:
            self.steps.append(_log_prob_of(self.scores, chosen))
            self.scores = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """(B, T_new) log-probabilities, the last step's token read from the finished `sequences`."""
        self._take(sequences[:, -1:])
        return _steps(self.steps, sequences)


def _log_prob_of(scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """(B, V) scores and (B, 1) chosen ids -> (B, 1) log-probabilities of the chosen ids."""
    return scores.log_softmax(-1).gather(1, chosen)


def _steps(columns: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """(B, 1) per-step log-probabilities side by side: (B, T), (B, 0) for no step."""
    return torch.cat([*columns, tokens.new_zeros(tokens.shape[0], 0, dtype=torch.float)], dim=1)


def sequence_scores(lm: nn.Module, out) -> torch.Tensor:
    """One score per generated sequence from a `generate(..., return_dict_in_generate=True, output_scores=True)`."""
    if getattr(out, "sequences_scores", None) is not None:
        return out.sequences_scores
    beam_indices = getattr(out, "beam_indices", None)
    tokens = out.sequences[:, out.sequences.shape[1] - len(out.scores) :]  # (B, T_new)
    if beam_indices is not None:
        steps = lm.compute_transition_scores(out.sequences, out.scores, beam_indices, normalize_logits=True)
    else:  # the same log-probabilities step by step: no (B, V, T) copy of every step's scores, no strided softmax
        steps = _steps([_log_prob_of(s, tokens[:, t, None]) for t, s in enumerate(out.scores)], tokens)
    return _summed(lm, tokens, steps)


def _summed(lm: nn.Module, tokens: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(B, T) chosen tokens and their log-probabilities -> (B,) sums over each sequence up to its end of sequence."""
    eos = lm.generation_config.eos_token_id
    is_eos = torch.isin(tokens, torch.tensor(eos if isinstance(eos, list) else [eos], device=tokens.device))
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # padding a finished sequence carries no score
    return steps.masked_fill(after_eos | torch.isinf(steps), 0.0).sum(dim=1)


class Blip2Model(nn.Module):
    def __init__(self, cfg: Blip2Config) -> None:
        super().__init__()
        self.config = cfg
        q = cfg.qformer_config
        self.vision_model = build_vision(cfg.vision_config)  # EVA ViT, or a `transformers` tower (backbones.py)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, q.hidden_size))
        self.qformer = QFormer(q, instruct=cfg.is_instruct)
        self.language_model: nn.Module | None = None
        self.compile_decoding = False  # `generate` decodes with a static KV cache and a compiled step (pipeline.load)
        self.kv_storage: torch.dtype | None = None  # the LM key/value cache dtype, if not the arithmetic (kv_cache)
        if cfg.has_text_side:
            self.embeddings = TextEmbeddings(q)
        if cfg.architecture == "Blip2ForImageTextRetrieval":
            self.vision_projection = nn.Linear(q.hidden_size, cfg.image_text_hidden_size)
            self.text_projection = nn.Linear(q.hidden_size, cfg.image_text_hidden_size)
            self.itm_head = nn.Linear(q.hidden_size, 2)
        if cfg.has_language_model:
            lm = build_language_model(cfg)
            self.language_projection = nn.Linear(q.hidden_size, lm.config.hidden_size)
            self.language_model = lm

    @property
    def is_encoder_decoder(self) -> bool:
        return self.language_model is not None and bool(self.language_model.config.is_encoder_decoder)

    # ---- image side -------------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, Dv) vision features (after the encoder's final LayerNorm).

        On a CPU, without gradients, at most `CPU_VISION_CHUNK` images go through the encoder at a time: its
        products are at full speed from a few hundred rows on, and larger ones only spill the caches (EVA ViT-g,
        AVX512-BF16 EPYC: 1.57 s per image in one pass of 32 images, 1.34 s in passes of 8 or of 4; in fp32, as the
        int8 route runs, passes of 4 take 10% less than of 8). The encoder's
        activations then stay those of a chunk, whatever the batch."""
        n = CPU_VISION_CHUNK
        if pixel_values.device.type != "cpu" or torch.is_grad_enabled() or pixel_values.shape[0] <= n:
            return self.vision_model(pixel_values)
        features = None
        for i in range(0, pixel_values.shape[0], n):  # each chunk's output straight into its rows: no list to cat
            out = self.vision_model(pixel_values[i : i + n])
            if features is None:
                features = out.new_empty(pixel_values.shape[0], *out.shape[1:])
            features[i : i + n] = out
            del out
        return features

    def query_output(
        self,
        image_embeds: torch.Tensor,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, N, Dv) -> (B, Nq, Dq): the learned queries after cross-attending to the image (fp32).

        InstructBLIP: the instruction's Q-Former tokens (B, T) (`qformer_input_ids`, mask `qformer_attention_mask`)
        follow the queries, bidirectionally; the queries' rows are returned.
        """
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        n = queries.shape[1]
        if not self.config.is_instruct:
            return self.qformer(queries, n, image_embeds=image_embeds)
        if instruction_ids is None:
            raise ValueError("an InstructBLIP Q-Former reads the instruction: give instruction_ids")
        text = self.qformer.embeddings(instruction_ids).to(queries.dtype)  # (B, T, Dq)
        mask = torch.ones_like(instruction_ids) if instruction_mask is None else instruction_mask
        h = self.qformer(torch.cat([queries, text], dim=1), n, text_mask=mask, image_embeds=image_embeds)
        return h[:, :n]

    def image_prefix(
        self,
        pixel_values: torch.Tensor,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 3, S, S) -> (B, Nq, d_lm): the soft prompt the LM sees. BLIP-2: computed once per image and
        reusable; InstructBLIP: once per (image, instruction)."""
        return self.features_prefix(self.encode_image(pixel_values), instruction_ids, instruction_mask)

    def features_prefix(
        self,
        image_embeds: torch.Tensor,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`image_prefix` from vision features (B, N, Dv) already computed (an InstructBLIP image under several
        instructions runs the vision encoder once)."""
        q = self.query_output(image_embeds, instruction_ids, instruction_mask)
        return self.language_projection(q.to(image_embeds.dtype))  # as the reference: back to the vision dtype

    # ---- language side ----------------------------------------------------------------------------------------
    def lm_inputs(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """`[prefix; embed(ids)]` and its mask; the queries come first, before any left padding and BOS. Public: a
        chat (pipeline.Chat) builds its first turn's LM input with it."""
        embed = self.language_model.get_input_embeddings()
        text = embed(input_ids)  # (B, T, d)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ones = torch.ones(prefix.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        inputs_embeds = torch.cat([prefix.to(text.dtype), text], dim=1)  # (B, Nq + T, d)
        return inputs_embeds, torch.cat([ones, attention_mask], dim=1)

    def placeholder_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The reference's full id sequence, `[<image>] * Nq + ids`: logits processors see these ids."""
        image_id = self.config.image_token_index
        if image_id is None:  # configs before transformers 4.47: no image token; pad is never generated
            image_id = self.language_model.config.pad_token_id or 0
        n = self.config.num_query_tokens
        fill = torch.full((input_ids.shape[0], n), image_id, dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([fill, input_ids], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> Blip2Output:
        """LM logits for an image (`pixel_values`, or a precomputed `prefix`) and text.

        `labels` (B, T) align with `input_ids` (causal LM; -100 ignored) or are the decoder targets (seq2seq).
        `instruction_ids`/`instruction_mask`: InstructBLIP's Q-Former tokens, as `query_output`.
        """
        if prefix is None:
            if pixel_values is None:
                raise ValueError("give pixel_values or prefix")
            prefix = self.image_prefix(pixel_values, instruction_ids, instruction_mask)
        inputs_embeds, mask = self.lm_inputs(prefix, input_ids, attention_mask)
        if self.is_encoder_decoder:
            out = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                labels=labels,
            )
            return Blip2Output(logits=out.logits, loss=out.loss)
        logits = self.language_model(inputs_embeds=inputs_embeds, attention_mask=mask).logits
        loss = None
        if labels is not None:
            shifted = logits[:, -labels.shape[1] : -1].float()  # (B, T-1, V) predicts labels[:, 1:]
            loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return Blip2Output(logits=logits, loss=loss)

    @torch.no_grad()
    def generate(
        self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **gen
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate from `[prefix; input_ids]`.

        `gen` goes to `transformers`' `generate` (num_beams, do_sample, max_new_tokens, ...) exactly as the reference
        passes it. Returns the new tokens (B * num_return_sequences, T_new) and one score per sequence: the beam
        score with beam search, else the summed log-probability of the chosen tokens.
        """
        inputs_embeds, mask = self.lm_inputs(prefix, input_ids, attention_mask)
        gen = {**self._decoding_kwargs(), **gen}
        lm = self.language_model
        if self.is_encoder_decoder:
            out, scores = scored_generate(lm, inputs_embeds=inputs_embeds, attention_mask=mask, **gen)
            return out.sequences, scores
        full_ids = self.placeholder_ids(input_ids)
        if "cache" not in gen and "cache_implementation" not in gen:
            gen["cache"] = self.new_cache(full_ids.shape[1], gen)
        out, scores = scored_generate(lm, input_ids=full_ids, inputs_embeds=inputs_embeds, attention_mask=mask, **gen)
        return out.sequences[:, full_ids.shape[1] :], scores

    def new_cache(self, prompt_positions: int, gen: dict | None = None):
        """The LM's key/value cache for a generation from a prompt of `prompt_positions` positions with the options
        `gen` (room for its `max_new_tokens` is reserved; kv_cache.ReservedCache, stored in `kv_storage`), or None:
        `transformers` makes its own (encoder-decoder and sliding-window LMs)."""
        from .kv_cache import reserved_cache

        gen = gen or {}
        new = gen.get("max_new_tokens") or self.language_model.generation_config.max_new_tokens or 0
        return reserved_cache(self.language_model, prompt_positions + new, self.kv_storage)

    def _decoding_kwargs(self) -> dict:
        """With `compile_decoding`: `transformers`' static KV cache, whose fixed shapes let its `generate` run each
        decoding step through `torch.compile` (the prompt's prefill stays eager). "reduce-overhead" (CUDA graphs)
        on a GPU; on a CPU, where there are no graphs to replay, inductor's default mode."""
        if not self.compile_decoding:
            return {}
        from transformers import CompileConfig

        device = self.language_model.device
        config = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default")
        config._compile_all_devices = True  # transformers compiles on CUDA only unless told
        return {"cache_implementation": "static", "compile_config": config}

    # ---- retrieval side (ITC / ITM) ------------------------------------------------------------------------------
    def image_embeddings(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) -> (B, Nq, E) L2-normalised query embeddings for ITC."""
        q = self.query_output(image_embeds)
        return F.normalize(self.vision_projection(q.to(self.vision_projection.weight.dtype)), dim=-1)

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) BERT ids -> (B, E) L2-normalised CLS embeddings for ITC (text-only mode)."""
        h = self.qformer(self.embeddings(input_ids), 0, text_mask=attention_mask)
        return F.normalize(self.text_projection(h[:, 0].to(self.text_projection.weight.dtype)), dim=-1)

    def itm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pairs (image_embeds[i], text i) -> (B, 2) match logits: `itm_head` on the query rows, averaged."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        text = self.embeddings(input_ids)
        embeds = torch.cat([queries, text.to(queries.dtype)], dim=1)  # (B, Nq + T, Dq)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        n = queries.shape[1]
        h = self.qformer(embeds, n, text_mask=attention_mask, image_embeds=image_embeds)  # bidirectional
        return self.itm_head(h[:, :n].to(self.itm_head.weight.dtype)).mean(dim=1)
