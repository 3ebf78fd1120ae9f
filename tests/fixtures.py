"""Builders of tiny random BLIP-2 checkpoints, tokenizers and images for parity tests against `transformers`.

Everything is built offline from a built-in corpus and a fixed seed, so the same arguments give the same files.
The models are re-randomised after construction because the Hugging Face init (std 0.02, zero query tokens) gives
near-uniform logits, under which a broken re-implementation can still agree with `transformers` by accident.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessor,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
)

IMAGE_TOKEN = "<image>"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
BICUBIC = 3

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "pink", "gray"]
OBJECTS = ["cat", "dog", "car", "bus", "bird", "horse", "table", "chair", "man", "woman", "boat", "train", "cake"]
PLACES = [
    "on a wooden table",
    "in a park",
    "on the street",
    "near the beach",
    "in a kitchen",
    "on a couch",
    "under a tree",
    "in the snow",
    "at the station",
    "by the river",
]
VERBS = ["sitting", "standing", "running", "sleeping", "eating", "jumping", "walking", "playing"]
QUESTIONS = [
    "what color is the {o}?",
    "what is the {o} doing?",
    "where is the {o}?",
    "how many {o}s are there?",
    "is there a {o} in the picture?",
    "what is it?",
]


def corpus() -> list[str]:
    """A few hundred caption / VQA sentences, enough for small BPE, Unigram and WordPiece vocabularies."""
    lines: list[str] = []
    for i, obj in enumerate(OBJECTS):
        for j, colour in enumerate(COLOURS):
            place = PLACES[(i + j) % len(PLACES)]
            verb = VERBS[(i * 3 + j) % len(VERBS)]
            lines.append(f"a photo of a {colour} {obj} {place}")
            if j % 3 == 0:
                lines.append(f"a {colour} {obj} is {verb} {place}.")
                lines.append(f"There are two {colour} {obj}s {verb} {place}")
        for k, q in enumerate(QUESTIONS):
            answer = COLOURS[(i + k) % len(COLOURS)] if "color" in q else ("yes" if k % 2 else str(k + 1))
            lines.append(f"Question: {q.format(o=obj)} Answer: {answer}")
    lines += ["Question: what is it? Answer:", "a photo of", "A picture of\nsomething new.", "1 2 3 4 5 6 7 8 9 0"]
    return lines


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


def _wrap(tok: Tokenizer, folder: Path, padding_side: str, **special: str) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers` object, add the `<image>` special token last and save it to `folder`."""
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side=padding_side, **special)
    fast.add_tokens([IMAGE_TOKEN], special_tokens=True)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def make_opt_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Byte-level BPE with OPT's special ids (`<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3) and `</s>` prepended as BOS."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B:1", special_tokens=[("</s>", 2)]
    )
    fast = _wrap(tok, Path(folder), "left", bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    assert [fast.convert_tokens_to_ids(t) for t in specials] == [0, 1, 2, 3]
    return fast


def newline_id(tokenizer: PreTrainedTokenizerFast) -> int:
    """Id of "\\n": the blip2-opt checkpoints use it as eos_token_id, so captions stop at the end of a line."""
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, ids
    return ids[0]


def make_t5_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Unigram + Metaspace with T5's ids (`<pad>`=0 `</s>`=1 `<unk>`=2) and `</s>` appended to every text."""
    specials = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=[("</s>", 1)]
    )
    fast = _wrap(tok, Path(folder), "right", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    assert [fast.convert_tokens_to_ids(t) for t in specials] == [0, 1, 2]
    return fast


def make_bert_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Lower-case WordPiece like bert-base-uncased, plus `[DEC]` as bos_token as LAVIS adds it for the Q-Former."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        padding_side="right",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
    )
    fast.add_special_tokens({"bos_token": "[DEC]"})
    fast.add_tokens([IMAGE_TOKEN], special_tokens=True)
    Path(folder).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


# ---- tiny model configs: every test's tiny towers have these sizes (one place to change them) ----------------------
# Width 32, 4 heads, an FFN of 37 (not a multiple of anything, so a transposed weight cannot fit by accident).
TINY_QFORMER = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 37}


def _vision_config(image_size: int) -> Blip2VisionConfig:
    return Blip2VisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=8,
        image_size=image_size,
        qkv_bias=True,
    )


def _qformer_config(**extra: object) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(**TINY_QFORMER, cross_attention_frequency=2, **extra)


# vLLM's CPU attention takes head sizes of 32 and up: a 2-head OPT of width 64.
# the widths vLLM's CPU attention accepts, and room for answers long enough to leave in the middle of
VLLM_OPT = {"hidden_size": 64, "word_embed_proj_dim": 64, "num_attention_heads": 2, "max_position_embeddings": 2048}


def tiny_opt_config(vocab_size: int, **overrides: object) -> OPTConfig:
    """A 2-layer OPT of width 32 (bos 2, pad 1, eos 2 as OPT's tokenizer, unless overridden)."""
    kw: dict[str, object] = {
        "hidden_size": 32,
        "word_embed_proj_dim": 32,
        "ffn_dim": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "bos_token_id": 2,
        "pad_token_id": 1,
        "eos_token_id": 2,
    }
    return OPTConfig(vocab_size=vocab_size, **{**kw, **overrides})


def tiny_t5_config(vocab_size: int, **overrides: object) -> T5Config:
    """A 2+2-layer T5 of width 32, untied lm_head as flan-t5 (pad 0, eos 1, decoder start 0, unless overridden)."""
    kw: dict[str, object] = {
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 37,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "tie_word_embeddings": False,
    }
    return T5Config(vocab_size=vocab_size, **{**kw, **overrides})


def _processor(tokenizer: PreTrainedTokenizerFast, image_size: int, num_query_tokens: int) -> Blip2Processor:
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size},
        resample=BICUBIC,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)


@torch.no_grad()
def rerandomise(model: nn.Module, seed: int, std: float = 0.5, scale: dict[str, float] | None = None) -> None:
    """Overwrite every parameter so that logits differ clearly between tokens and between images.

    Weights ~ N(0, std), norm weights ~ 1 + N(0, 0.1), biases ~ N(0, 0.05); tied parameters are drawn once.
    `scale` multiplies the weights whose names end with a key (std 0.5 was chosen so that greedy decoding of the
    fixtures yields varied tokens rather than one repeated token; 0.2 often collapsed).
    """
    gen = torch.Generator().manual_seed(seed)
    norm_params: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__:
            if getattr(module, "weight", None) is not None:
                norm_params.add(id(module.weight))
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if id(param) in norm_params:
            value = 1.0 + 0.1 * noise
        elif name.endswith("bias"):
            value = 0.05 * noise
        else:
            value = std * noise * next((f for suffix, f in (scale or {}).items() if name.endswith(suffix)), 1.0)
        param.copy_(value.to(param.dtype))


def _save(model: nn.Module, folder: Path, *, safe: bool = True, max_shard_size: str | int | None = None) -> None:
    """Save weights; transformers 5 only writes safetensors, so `.bin` files are converted from them here."""
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    if safe:
        return
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        renames = {
            f: f.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
            for f in set(data["weight_map"].values())
        }
        for src, dst in renames.items():
            torch.save(load_file(folder / src), folder / dst)
            (folder / src).unlink()
        data["weight_map"] = {k: renames[v] for k, v in data["weight_map"].items()}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        index.unlink()
    else:
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()


def _drop_image_token_index(folder: Path) -> None:
    """Rewrite config.json as pre-4.47 checkpoints had it: no `image_token_index` key."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key in ("image_token_index", "image_token_id"):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def make_opt_checkpoint(
    folder: str | os.PathLike,
    *,
    image_size: int = 32,
    num_query_tokens: int = 8,
    safe: bool = True,
    max_shard_size: str | int | None = None,
    image_token: bool = True,
    seed: int = 0,
    text: dict[str, object] | None = None,
) -> Path:
    """Tiny random blip2-opt checkpoint (weights, config, tokenizer, processor); eos is "\\n" as in blip2-opt-2.7b.

    `text` overrides the OPT config (`VLLM_OPT`: the widths vLLM's CPU attention accepts)."""
    folder = Path(folder)
    tokenizer = make_opt_tokenizer(folder)
    text_config = tiny_opt_config(
        _round8(len(tokenizer)),
        **{"max_position_embeddings": 512, "eos_token_id": newline_id(tokenizer), "prefix": "</s>", **(text or {})},
    )
    config = Blip2Config(
        vision_config=_vision_config(image_size),
        qformer_config=_qformer_config(),
        text_config=text_config,
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    model = Blip2ForConditionalGeneration(config).eval()
    rerandomise(model, seed)
    _save(model, folder, safe=safe, max_shard_size=max_shard_size)
    _processor(tokenizer, image_size, num_query_tokens).save_pretrained(folder)
    if not image_token:
        _drop_image_token_index(folder)
    return folder


def make_t5_checkpoint(
    folder: str | os.PathLike, *, image_size: int = 32, num_query_tokens: int = 8, seed: int = 0
) -> Path:
    """Tiny random blip2-flan-t5 checkpoint; untied lm_head as flan-t5 (HF turns gated-gelu into gelu_new)."""
    folder = Path(folder)
    tokenizer = make_t5_tokenizer(folder)
    text_config = tiny_t5_config(_round8(len(tokenizer)), feed_forward_proj="gated-gelu", bos_token_id=1)
    config = Blip2Config(
        vision_config=_vision_config(image_size),
        qformer_config=_qformer_config(),
        text_config=text_config,
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    model = Blip2ForConditionalGeneration(config).eval()
    # T5 attention has no 1/sqrt(d_kv) factor: fold it into the query weights or attention saturates and loops.
    q_scale = text_config.d_kv**-0.5
    rerandomise(model, seed, scale={"SelfAttention.q.weight": q_scale, "EncDecAttention.q.weight": q_scale})
    _save(model, folder)
    _processor(tokenizer, image_size, num_query_tokens).save_pretrained(folder)
    return folder


def make_itm_checkpoint(
    folder: str | os.PathLike, *, image_size: int = 32, num_query_tokens: int = 8, seed: int = 0
) -> Path:
    """Tiny random blip2-itm checkpoint laid out like Salesforce/blip2-itm-vit-g.

    `Blip2Processor` prepends `num_query_tokens` `<image>` ids whenever it has `num_query_tokens` and images, and
    `Blip2ForImageTextRetrieval` slices exactly that many ids off `input_ids` (and the mask, for ITC) when
    `image_token_index` is set.  So the config sets `image_token_index` and the processor `num_query_tokens`, and the
    Q-Former vocabulary stops at `[DEC]`: `<image>` (the last id) is never embedded.
    """
    folder = Path(folder)
    tokenizer = make_bert_tokenizer(folder)
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    qformer_config = _qformer_config(
        use_qformer_text_input=True,
        vocab_size=image_token_index,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config=_vision_config(image_size),
        qformer_config=qformer_config,
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=16,
        image_token_index=image_token_index,
    )
    model = Blip2ForImageTextRetrieval(config).eval()
    rerandomise(model, seed)
    _save(model, folder)
    _processor(tokenizer, image_size, num_query_tokens).save_pretrained(folder)
    return folder


def make_llama_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerFast:
    """BPE + Metaspace with LLaMA's ids (`<unk>`=0 `<s>`=1 `</s>`=2), `<s>` prepended; pad is `<unk>`, as the
    LLaMA-based BLIP-2 checkpoints ship it (LLaMA's own tokenizer has none)."""
    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", 1)])
    fast = _wrap(tok, Path(folder), "left", bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    assert [fast.convert_tokens_to_ids(t) for t in specials] == [0, 1, 2]
    return fast


def tiny_llama_config(vocab_size: int, **overrides: object) -> LlamaConfig:
    """A 2-layer LLaMA of width 32 with grouped-query attention (4 heads, 2 key/value heads), bos 1, eos 2."""
    kw: dict[str, object] = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    return LlamaConfig(vocab_size=vocab_size, **{**kw, **overrides})


def make_llama_checkpoint(
    folder: str | os.PathLike, *, image_size: int = 32, num_query_tokens: int = 8, seed: int = 0
) -> Path:
    """Tiny random BLIP-2 checkpoint with a LLaMA language model (the family of Vicuna, InstructBLIP's LM)."""
    folder = Path(folder)
    tokenizer = make_llama_tokenizer(folder)
    config = Blip2Config(
        vision_config=_vision_config(image_size),
        qformer_config=_qformer_config(),
        text_config=tiny_llama_config(_round8(len(tokenizer))),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    model = Blip2ForConditionalGeneration(config).eval()
    rerandomise(model, seed)
    _save(model, folder)
    _processor(tokenizer, image_size, num_query_tokens).save_pretrained(folder)
    return folder


def _jpeg_bytes(image: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def make_images(folder: str | os.PathLike) -> dict[str, Path]:
    """Small deterministic images in the modes and formats a loader must handle, plus three broken files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:50]
    rgb = np.stack([xx * 5, yy * 6, (xx + yy) * 3], axis=-1) + rng.integers(0, 40, (40, 50, 3))
    base = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    alpha = Image.fromarray(((xx * 5) % 256).astype(np.uint8), "L")
    rgba = base.copy()
    rgba.putalpha(alpha)
    large_arr = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    large_arr[:, :150] //= 2
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    rgb_jpeg = _jpeg_bytes(base)
    files: dict[str, tuple[str, bytes | Image.Image]] = {
        "rgb": ("rgb.jpg", rgb_jpeg),
        "rgba": ("rgba.png", rgba),
        "l": ("l.png", base.convert("L")),
        "p": ("p.png", base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)),
        "cmyk": ("cmyk.jpg", _jpeg_bytes(base.convert("CMYK"))),
        "i16": ("i16.png", Image.fromarray((xx * 1000 + yy * 300).astype(np.uint16))),
        "tiny": ("tiny.png", Image.new("RGB", (1, 1), (200, 30, 60))),
        "exif_rot": ("exif_rot.jpg", _jpeg_bytes(base, exif=exif.tobytes())),
        "large": ("large.png", Image.fromarray(large_arr, "RGB")),
        "empty": ("empty.jpg", b""),
        "truncated": ("truncated.jpg", rgb_jpeg[: len(rgb_jpeg) // 2]),
        "not_image": ("not_image.png", b"this is not an image\n"),
    }
    out: dict[str, Path] = {}
    for key, (name, content) in files.items():
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content.save(path)
        out[key] = path
    return out
