"""The tiny checkpoints load into `transformers` and are lively enough for parity tests to catch mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import IMAGE_TOKEN, newline_id
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor

PROMPTS = ["a photo of", "Question: what is it? Answer:"]


def _two_images(images: dict[str, Path]) -> list[Image.Image]:
    return [Image.open(images["rgb"]).convert("RGB"), Image.open(images["large"]).convert("RGB")]


def _generate(folder: Path, images: dict[str, Path], text: list[str] | None) -> torch.Tensor:
    """Greedy new tokens from transformers for the two test images (prompt stripped for decoder-only models)."""
    processor = Blip2Processor.from_pretrained(folder)
    model = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    kwargs = {"text": text, "padding": True} if text else {}
    inputs = processor(images=_two_images(images), return_tensors="pt", **kwargs)
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False, num_beams=1)
    if model.config.use_decoder_only_language_model:
        prompt_len = inputs["input_ids"].shape[1] if text else model.config.num_query_tokens + 1
        return out[:, prompt_len:]
    return out[:, 1:]  # decoder_start_token


def _assert_lively(new_tokens: torch.Tensor) -> None:
    assert new_tokens.shape[0] == 2 and new_tokens.shape[1] >= 3, new_tokens
    assert not torch.equal(new_tokens[0], new_tokens[1]), new_tokens
    for row in new_tokens:
        assert len(set(row.tolist())) >= 3, new_tokens


@pytest.mark.parametrize("text", [PROMPTS, None], ids=["prompt", "caption"])
@pytest.mark.parametrize("kind", ["opt_ckpt", "t5_ckpt"])
def test_generation_is_lively(
    kind: str, text: list[str] | None, images: dict[str, Path], request: pytest.FixtureRequest
) -> None:
    _assert_lively(_generate(request.getfixturevalue(kind), images, text))


def test_token_ids(opt_ckpt: Path, t5_ckpt: Path, itm_ckpt: Path) -> None:
    opt = Blip2Processor.from_pretrained(opt_ckpt).tokenizer
    cfg = json.loads((opt_ckpt / "config.json").read_text())
    assert (opt.bos_token_id, opt.pad_token_id, opt.eos_token_id) == (2, 1, 2)
    assert cfg["text_config"]["eos_token_id"] == newline_id(opt)
    assert cfg["image_token_index"] == opt.convert_tokens_to_ids(IMAGE_TOKEN) == len(opt) - 1
    assert opt("a cat")["input_ids"][0] == 2
    assert cfg["text_config"]["vocab_size"] % 8 == 0 and cfg["text_config"]["vocab_size"] >= len(opt)

    t5 = Blip2Processor.from_pretrained(t5_ckpt).tokenizer
    assert (t5.pad_token_id, t5.eos_token_id) == (0, 1)
    assert t5("a cat")["input_ids"][-1] == 1

    bert = Blip2Processor.from_pretrained(itm_ckpt).tokenizer
    ids = bert("A Cat")["input_ids"]
    assert ids[0] == bert.cls_token_id and ids[-1] == bert.sep_token_id
    assert bert.convert_ids_to_tokens(bert.bos_token_id) == "[DEC]" and bert.pad_token_id == 0


def test_itm(itm_ckpt: Path, images: dict[str, Path]) -> None:
    processor = Blip2Processor.from_pretrained(itm_ckpt)
    model = Blip2ForImageTextRetrieval.from_pretrained(itm_ckpt, dtype=torch.float32).eval()
    image = Image.open(images["rgb"]).convert("RGB")
    texts = ["a photo of a red cat", "two dogs running in the snow"]
    inputs = processor(images=[image, image], text=texts, padding=True, return_tensors="pt")
    n = model.config.num_query_tokens
    assert (inputs["input_ids"][:, :n] == model.config.image_token_index).all()
    with torch.no_grad():
        itm = model(**inputs, use_image_text_matching_head=True)
        itc = model(**inputs, use_image_text_matching_head=False)
    assert itm.logits_per_image.shape == (2, 2)
    probs = itm.logits_per_image.softmax(dim=1)[:, 1]
    assert abs(probs[0] - probs[1]) > 1e-3, probs
    assert itc.logits_per_image.shape == (2, 2)
    assert itc.image_embeds.shape == (2, n, 16) and itc.text_embeds.shape == (2, 16)
    assert abs(itc.logits_per_image[0, 0] - itc.logits_per_image[0, 1]) > 1e-3


def test_variants(opt_ckpt: Path, opt_ckpt_old: Path, opt_ckpt_sharded: Path, opt_ckpt_bin: Path) -> None:
    assert "image_token_index" not in json.loads((opt_ckpt_old / "config.json").read_text())
    shards = sorted(opt_ckpt_sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (opt_ckpt_sharded / "model.safetensors.index.json").exists()
    assert not list(opt_ckpt_bin.glob("*.safetensors")) and (opt_ckpt_bin / "pytorch_model.bin").exists()
    ref = Blip2ForConditionalGeneration.from_pretrained(opt_ckpt).state_dict()
    for folder in (opt_ckpt_sharded, opt_ckpt_bin):
        other = Blip2ForConditionalGeneration.from_pretrained(folder).state_dict()
        assert ref.keys() == other.keys()
        assert all(torch.equal(ref[k], other[k]) for k in ref)


def test_images(images: dict[str, Path]) -> None:
    expected = {
        "rgb": "RGB",
        "rgba": "RGBA",
        "l": "L",
        "p": "P",
        "cmyk": "CMYK",
        "i16": "I;16",
        "tiny": "RGB",
        "exif_rot": "RGB",
        "large": "RGB",
    }
    for key, mode in expected.items():
        assert Image.open(images[key]).mode == mode, key
    assert Image.open(images["exif_rot"]).getexif()[0x0112] == 6
    assert images["empty"].stat().st_size == 0
    for key in ("empty", "not_image"):
        with pytest.raises(OSError):
            Image.open(images[key])
    with pytest.raises(OSError):
        Image.open(images["truncated"]).load()
