"""Builders of tiny random InstructBLIP checkpoints (Flan-T5 and LLaMA/Vicuna kinds) for parity tests against
`transformers`' `InstructBlipForConditionalGeneration`, made the way `fixtures` makes the BLIP-2 ones: the model
saved with `save_pretrained`, the LM and Q-Former tokenizers trained with `tokenizers`, and an
`InstructBlipProcessor` (which writes the Q-Former tokenizer to `qformer_tokenizer/`).
"""

from __future__ import annotations

import os
from pathlib import Path

import fixtures
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BlipImageProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
)

IMAGE_SIZE = 32
NUM_QUERY_TOKENS = 8


def make_llama_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerFast:
    """BPE + Metaspace with LLaMA's ids (`<unk>`=0 `<s>`=1 `</s>`=2), `<s>` prepended, and `[PAD]` added as the
    pad token the way the instructblip-vicuna checkpoints add it."""
    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(fixtures.corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["[PAD]"])
    return fixtures._wrap(
        tok, Path(folder), "left", bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="[PAD]"
    )


def _vision_and_qformer(qformer_tokenizer: PreTrainedTokenizerFast) -> dict[str, object]:
    """The tiny towers of `fixtures`; the Q-Former's vocabulary is its tokenizer's (BERT + `[DEC]`, as LAVIS)."""
    qformer = InstructBlipQFormerConfig(
        **fixtures.TINY_QFORMER,
        cross_attention_frequency=2,
        vocab_size=len(qformer_tokenizer),
        max_position_embeddings=64,
        pad_token_id=qformer_tokenizer.pad_token_id,
    )
    return {"vision_config": fixtures._vision_config(IMAGE_SIZE).to_dict(), "qformer_config": qformer.to_dict()}


def _build(folder: Path, tokenizer: PreTrainedTokenizerFast, text_config: PreTrainedConfig, seed: int, **scale):
    qformer_tokenizer = fixtures.make_bert_tokenizer(folder / "qformer_tokenizer")
    config = InstructBlipConfig(
        **_vision_and_qformer(qformer_tokenizer),
        text_config=text_config.to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids(fixtures.IMAGE_TOKEN),
    )
    model = InstructBlipForConditionalGeneration(config).eval()
    fixtures.rerandomise(model, seed, scale=scale or None)
    model.save_pretrained(folder)
    image_processor = BlipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=fixtures.BICUBIC,
        image_mean=fixtures.CLIP_MEAN,
        image_std=fixtures.CLIP_STD,
        do_convert_rgb=True,
    )
    processor = InstructBlipProcessor(image_processor, tokenizer, qformer_tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    processor.save_pretrained(folder)
    return folder


def make_instruct_t5_checkpoint(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny random instructblip-flan-t5 checkpoint (gated-gelu T5, untied head, as flan-t5)."""
    folder = Path(folder)
    tokenizer = fixtures.make_t5_tokenizer(folder)
    text_config = fixtures.tiny_t5_config(
        fixtures._round8(len(tokenizer)), feed_forward_proj="gated-gelu", bos_token_id=1
    )
    # T5 attention has no 1/sqrt(d_kv) factor: fold it into the query weights or attention saturates and loops.
    q_scale = text_config.d_kv**-0.5
    return _build(
        folder, tokenizer, text_config, seed, **{"SelfAttention.q.weight": q_scale, "EncDecAttention.q.weight": q_scale}
    )


def make_instruct_llama_checkpoint(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny random instructblip-vicuna checkpoint: a 2-layer LLaMA of width 32 (bos 1, eos 2, pad `[PAD]`)."""
    folder = Path(folder)
    tokenizer = make_llama_tokenizer(folder)
    text_config = LlamaConfig(
        vocab_size=fixtures._round8(len(tokenizer)),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return _build(folder, tokenizer, text_config, seed)
