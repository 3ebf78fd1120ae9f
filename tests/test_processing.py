"""Images and prompts: pixel parity with transformers' BlipImageProcessor, loud image errors, prompt layout."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from blip2.errors import ConfigError, ImageError
from blip2.processing import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VQA_TEMPLATE,
    ImageTransform,
    chat_prompt,
    load_image,
    vqa_prompt,
)

transformers = pytest.importorskip("transformers")


def _rng_pixels(h: int, w: int, c: int, seed: int = 0, dtype=np.uint8, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=(h, w, c) if c else (h, w), dtype=dtype)


def _reference(images: list[Image.Image], size: int) -> torch.Tensor:
    """transformers' PIL-backed BLIP processor, configured as the BLIP-2 hub checkpoints are."""
    # BlipImageProcessorPil is what BlipImageProcessor is without torchvision; pin the PIL backend explicitly.
    cls = getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor
    logging.getLogger("transformers").setLevel(logging.ERROR)
    proc = cls(
        size={"height": size, "width": size},
        resample=3,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )
    return proc(images, return_tensors="pt").pixel_values


def _modes() -> dict[str, Image.Image]:
    rgb = _rng_pixels(37, 53, 3, seed=1)
    rgba = np.dstack([rgb, _rng_pixels(37, 53, 0, seed=2)])
    p_trans = Image.fromarray(rgb).quantize(16)
    p_trans.info["transparency"] = 3
    i16 = _rng_pixels(29, 41, 0, seed=3, dtype=np.uint16, high=65536)
    i16[:3] = np.arange(41, dtype=np.uint16)  # some values under 255 so the clip is not the whole picture
    return {
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(rgba),
        "L": Image.fromarray(_rng_pixels(40, 30, 0, seed=4)),
        "P": Image.fromarray(rgb).quantize(32),
        "P+transparency": p_trans,
        "LA": Image.fromarray(rgba).convert("LA"),
        "CMYK": Image.frombytes("CMYK", (53, 37), np.dstack([rgb, rgb[..., :1]]).tobytes()),
        # 16-bit PNG: PIL's "I;16" -> "RGB" clips every value above 255 to 255 (no scaling), and transformers
        # inherits that; we match it because parity is the contract, even though it whitens most 16-bit images.
        "I;16": Image.fromarray(i16),
        "1x1": Image.fromarray(_rng_pixels(1, 1, 3, seed=5)),
    }


@pytest.mark.parametrize("size", [224, 364, 32])
def test_pixels_equal_transformers_for_every_mode(size: int) -> None:
    """Otherwise captions differ from transformers' for the same weights (PNG logos, grey scans, CMYK, 16-bit)."""
    images = list(_modes().values())
    ours = ImageTransform(size=size)(images)
    ref = _reference(images, size)
    assert ours.dtype == torch.float32
    assert ours.shape == (len(images), 3, size, size)
    for name, a, b in zip(_modes(), ours, ref, strict=True):
        assert torch.equal(a, b), f"{name}: max diff {(a - b).abs().max().item()}"


def test_pixels_equal_for_a_large_image_and_for_load_image_output(tmp_path: Path) -> None:
    """A big photo, loaded from disk, still gives transformers' exact pixels (no drift from our loader)."""
    big = Image.fromarray(_rng_pixels(1500, 2100, 3, seed=6))
    rgba = Image.fromarray(np.dstack([_rng_pixels(64, 48, 3, seed=7), _rng_pixels(64, 48, 0, seed=8)]))
    paths = [tmp_path / "big.jpg", tmp_path / "logo.png"]
    big.save(paths[0], quality=90)
    rgba.save(paths[1])
    raw = [Image.open(p) for p in paths]
    ref = _reference(raw, 224)
    ours = ImageTransform()([load_image(p) for p in paths])
    assert torch.equal(ours, ref)


def test_rgba_is_composited_on_white() -> None:
    """Transparent PNGs would otherwise be captioned as if on black."""
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(load_image(clear)).min() == 255


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    """Phone photos would be captioned lying on their side."""
    img = Image.fromarray(_rng_pixels(20, 40, 3, seed=9))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    expected = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert np.array_equal(np.asarray(loaded), np.asarray(expected))
    assert torch.equal(ImageTransform(size=32)([loaded]), _reference([expected], 32))


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    """An animated GIF would otherwise be captioned from an arbitrary (or the last) frame."""
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert tuple(np.asarray(load_image(path))[0, 0]) == (255, 0, 0)
    assert tuple(np.asarray(load_image(path.read_bytes()))[0, 0]) == (255, 0, 0)
    moved = Image.open(path)
    moved.seek(2)  # a PIL image is taken at the frame its owner chose
    assert tuple(np.asarray(load_image(moved))[0, 0]) == (0, 255, 0)


def test_bytes_and_pathlike_and_pil_inputs_agree(tmp_path: Path) -> None:
    """Uploads (bytes), paths and PIL images must be the same picture to the model."""
    path = tmp_path / "x.png"
    Image.fromarray(_rng_pixels(12, 10, 3, seed=10)).save(path)
    by_path = np.asarray(load_image(path))
    assert np.array_equal(by_path, np.asarray(load_image(str(path))))
    assert np.array_equal(by_path, np.asarray(load_image(path.read_bytes())))
    assert np.array_equal(by_path, np.asarray(load_image(Image.open(path))))
    assert load_image(path).mode == "RGB"


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(_rng_pixels(64, 64, 3, seed=11)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("missing.jpg", lambda p: None, "no such file"),
        ("empty.jpg", lambda p: p.write_bytes(b""), "empty"),
        ("half.jpg", _truncated_jpeg, "truncated"),
        ("notes.png", lambda p: p.write_text("this is not a picture\n"), "not an image"),
        ("folder.jpg", lambda p: p.mkdir(), "directory"),
    ],
)
def test_bad_files_raise_image_error_naming_the_file(tmp_path: Path, name: str, make, reason: str) -> None:
    """A bad file in a batch must say which file and why, in one line, not crash with a PIL traceback."""
    path = tmp_path / name
    make(path)
    with pytest.raises(ImageError) as info:
        load_image(path)
    message = str(info.value)
    assert name in message and reason in message and "\n" not in message


def test_image_over_max_pixels_is_refused(tmp_path: Path) -> None:
    """A decompression bomb would otherwise eat the server's memory."""
    path = tmp_path / "bomb.png"
    Image.new("L", (200, 100)).save(path)
    with pytest.raises(ImageError, match=r"bomb\.png: too many pixels \(limit 10000\)"):
        load_image(path, max_pixels=10_000)
    assert load_image(path, max_pixels=20_000).size == (200, 100)


def test_pil_decompression_bomb_error_becomes_image_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL's own bomb limit must surface as our ImageError, not as a PIL exception."""
    buf = io.BytesIO()
    Image.new("L", (100, 100)).save(buf, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL errors above twice this
    with pytest.raises(ImageError, match="<bytes>.*decompression bomb"):
        load_image(buf.getvalue())


def test_empty_bytes_and_garbage_bytes_name_bytes() -> None:
    """Bad uploads have no file name; the message must still say what was wrong."""
    with pytest.raises(ImageError, match="<bytes>: empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="<bytes>: not an image"):
        load_image(b"hello")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    """A permission problem must be told apart from a corrupt image."""
    path = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(path)
    path.chmod(0)
    with pytest.raises(ImageError, match=r"secret\.png: unreadable"):
        load_image(path)


def test_permission_error_is_reported_even_as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same as above where chmod cannot deny (root, CI containers): the open() failure is still named."""
    import blip2.images as images

    path = tmp_path / "locked.png"
    Image.new("RGB", (4, 4)).save(path)

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images, "open", deny, raising=False)
    with pytest.raises(ImageError, match=r"locked\.png: unreadable \(permission denied\)"):
        load_image(path)


def test_from_pretrained_reads_hub_style_config(tmp_path: Path) -> None:
    """A -coco checkpoint (364 px) would otherwise be fed 224-px images."""
    cfg = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "image_processor_type": "BlipImageProcessor",
        "processor_class": "Blip2Processor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": 364, "width": 364},
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    assert ImageTransform.from_pretrained(tmp_path) == ImageTransform(size=364)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 32}))
    assert ImageTransform.from_pretrained(tmp_path).size == 32


def test_from_pretrained_defaults_without_config_and_names_bad_json(tmp_path: Path) -> None:
    """Folders without a preprocessor config still work; a broken one says which file."""
    assert ImageTransform.from_pretrained(tmp_path) == ImageTransform()
    path = tmp_path / "preprocessor_config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="preprocessor_config.json"):
        ImageTransform.from_pretrained(tmp_path)
    path.write_text(json.dumps({"size": {"height": 224, "width": 300}}))
    with pytest.raises(ConfigError, match="square"):
        ImageTransform.from_pretrained(tmp_path)


def test_vqa_prompt_format() -> None:
    """VQA answers degrade if the template differs from the one BLIP-2 was evaluated with."""
    assert VQA_TEMPLATE == "Question: {} Answer:"
    assert vqa_prompt("  what is he holding? \n") == "Question: what is he holding? Answer:"
    with pytest.raises(ValueError, match="question"):
        vqa_prompt("   ")


def _words(text: str) -> int:
    return len(text.split())


def test_chat_prompt_exact_format() -> None:
    """The chat model sees history exactly as 'Question: q Answer: a.' turns, space-joined."""
    history = [(" what is this? ", "a dog "), ("what colour?", "brown")]
    got = chat_prompt(history, " is it happy? ", _words, budget=1000)
    assert (
        got
        == "Question: what is this? Answer: a dog. Question: what colour? Answer: brown. Question: is it happy? Answer:"
    )
    assert chat_prompt([], "hi", _words, budget=1000) == "Question: hi Answer:"


def test_chat_prompt_drops_oldest_turns_first() -> None:
    """Long chats must forget the start of the conversation, not the latest turns."""
    history = [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]
    # each history turn is 4 words, the current question 3 words
    assert (
        chat_prompt(history, "q4", _words, budget=11)
        == "Question: q2 Answer: a2. Question: q3 Answer: a3. Question: q4 Answer:"
    )
    assert chat_prompt(history, "q4", _words, budget=7) == "Question: q3 Answer: a3. Question: q4 Answer:"


def test_chat_prompt_never_cuts_the_current_question() -> None:
    """Even over budget, the user's question must reach the model whole."""
    got = chat_prompt([("q1", "a1")], "a very long question indeed", _words, budget=2)
    assert got == "Question: a very long question indeed Answer:"
    with pytest.raises(ValueError, match="question"):
        chat_prompt([("q1", "a1")], " ", _words, budget=100)
