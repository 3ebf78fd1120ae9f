"""InstructBLIP checkpoints load into the same model and pipeline, and give what `transformers`'
`InstructBlipForConditionalGeneration` gives: the same logits and the same greedy / beam-search tokens, with the
instruction read by the Q-Former (its own BERT tokens after the queries) and by the LM."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from instruct_checkpoints import make_instruct_llama_checkpoint, make_instruct_t5_checkpoint
from safetensors.torch import load_file
from test_checkpoint import _to_lavis
from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

import blip2
from blip2.checkpoint import is_lavis_instruct, lavis_instruct_to_hf, load_model
from blip2.cli import main
from blip2.cli.options import one_line
from blip2.config import KNOWN_MODELS, Blip2Config
from blip2.defaults import INSTRUCT_CAPTION_PROMPT
from blip2.errors import ConfigError
from blip2.processing import load_image

# Mixed instructions of different lengths, so a batch pads both the LM prompt and the Q-Former instruction.
PROMPTS = ["what is it?", "Question: what color is the cat on the table? Short Answer:", "a photo of"]


@pytest.fixture(scope="module", params=["t5", "llama"])
def instruct_ckpt(request, tmp_path_factory):
    make = make_instruct_t5_checkpoint if request.param == "t5" else make_instruct_llama_checkpoint
    return make(tmp_path_factory.mktemp(f"instruct_{request.param}"))


@pytest.fixture(scope="module")
def pair(instruct_ckpt):
    """(our model, reference model, reference processor) on the same tiny InstructBLIP checkpoint."""
    ours = blip2.load(instruct_ckpt, device="cpu", dtype="fp32")
    ref = InstructBlipForConditionalGeneration.from_pretrained(instruct_ckpt, dtype=torch.float32).eval()
    proc = InstructBlipProcessor.from_pretrained(instruct_ckpt)
    proc.tokenizer.padding_side = "right" if ours.model.is_encoder_decoder else "left"
    return ours, ref, proc


def _images(images, n):
    return [load_image(images[k]) for k in ["rgb", "large", "rgba"][:n]]


def _reference_inputs(proc, imgs, prompts):
    """The processor's inputs, the instruction's Q-Former tokens padded on the right as LAVIS pads them.

    `InstructBlipProcessor` pads them on the LM tokenizer's side, left for Vicuna: the instruction's position
    embeddings then shift with its padding, so an answer would depend on the other prompts of its batch."""
    inputs = proc(images=imgs, text=prompts, padding=True, return_tensors="pt")
    qformer = proc.qformer_tokenizer(prompts, padding=True, padding_side="right", return_tensors="pt")
    inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = qformer.input_ids, qformer.attention_mask
    return inputs


def _reference_tokens(ref, proc, imgs, prompts, **gen) -> list[list[int]]:
    inputs = _reference_inputs(proc, imgs, prompts)
    with torch.no_grad():
        out = ref.generate(**inputs, **gen)
    if not ref.config.text_config.is_encoder_decoder:
        out = out[:, inputs.input_ids.shape[1] :]
    specials = set(proc.tokenizer.all_special_ids)
    return [[t for t in row if t not in specials] for row in out.tolist()]


def test_config_reads_as_instructblip(pair):
    """If this fails, an InstructBLIP checkpoint loads as BLIP-2 and its Q-Former ignores the instruction."""
    ours, _, _ = pair
    assert ours.config.is_instruct and not ours.config.has_text_side
    assert ours.qformer_tokenizer is not None


@pytest.mark.parametrize("n", [1, 3])
def test_logits_match_reference(pair, images, n):
    """If this fails, InstructBLIP answers differ from transformers' for the same checkpoint."""
    ours, ref, proc = pair
    imgs, prompts = _images(images, n), PROMPTS[:n]
    inputs = _reference_inputs(proc, imgs, prompts)
    ids, mask = ours.tokenize(prompts)
    qids, qmask = ours.instruction_ids(prompts)
    assert torch.equal(qids, inputs.qformer_input_ids) and torch.equal(qmask, inputs.qformer_attention_mask)
    kw = {"decoder_input_ids": torch.tensor([[0, 5, 9, 17]] * n)} if ours.model.is_encoder_decoder else {}
    with torch.no_grad():
        expected = ref(**inputs, **kw).logits
        got = ours.model(
            ids, mask, pixel_values=ours.pixel_values(imgs), instruction_ids=qids, instruction_mask=qmask, **kw
        ).logits
    assert got.shape == expected.shape
    if not ours.model.is_encoder_decoder:  # padded positions' logits are meaningless in both
        real = torch.cat([torch.ones(n, ours.config.num_query_tokens), mask], 1).bool()
        got, expected = got[real], expected[real]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("beams", [1, 3])
def test_generation_matches_reference(pair, images, n, beams):
    """If this fails, greedy or beam-search InstructBLIP outputs differ from transformers' token for token."""
    ours, ref, proc = pair
    imgs, prompts = _images(images, n), PROMPTS[:n]
    expected = _reference_tokens(ref, proc, imgs, prompts, max_new_tokens=12, num_beams=beams)
    got = ours.generate(imgs, prompts, max_new_tokens=12, num_beams=beams)
    assert [g.tokens for g in got] == expected
    assert [g.text for g in got] == [proc.tokenizer.decode(t, skip_special_tokens=True).strip() for t in expected]
    assert len({g.text for g in got}) == n  # the fixture model really distinguishes inputs


def test_qformer_reads_the_instruction(pair, images):
    """If this fails, the Q-Former's queries do not depend on the instruction (InstructBLIP run as BLIP-2)."""
    ours, _, _ = pair
    img = _images(images, 1)[0]
    a, b = ours.image_prefix([img, img], ["what is it?", "a photo of"])
    assert not torch.allclose(a, b, atol=1e-3)


def test_batch_and_pixels_route_equal_one_by_one(pair, images):
    """If this fails, batch captioning (preprocessed pixels, mixed instructions) differs from one image at a time."""
    ours, _, _ = pair
    imgs = _images(images, 3)
    alone = [ours.generate([im], [p], max_new_tokens=12)[0] for im, p in zip(imgs, PROMPTS)]
    batched = ours.generate(imgs, PROMPTS, max_new_tokens=12)
    pixels = ours.generate_pixels(ours.pixel_values(imgs), PROMPTS, max_new_tokens=12)
    assert [g.tokens for g in batched] == [g.tokens for g in alone] == [g.tokens for g in pixels]
    # A padded instruction changes the order of the Q-Former's sums (its outputs move by ~1e-6 relative), which the
    # tiny random LM amplifies in the scores; the tokens are the same.
    for b, a in zip(batched, alone):
        assert b.score == pytest.approx(a.score, rel=1e-3, abs=1e-4)


def test_caption_and_ask_use_instruction_prompts(pair, images):
    """If this fails, `caption` sends InstructBLIP no instruction (or `ask` a BLIP-2 template) and answers change."""
    ours, ref, proc = pair
    img = _images(images, 1)
    caption = _reference_tokens(ref, proc, img, [INSTRUCT_CAPTION_PROMPT], max_new_tokens=12)[0]
    assert ours.caption(img[0], max_new_tokens=12) == proc.tokenizer.decode(caption, skip_special_tokens=True).strip()
    assert ours.generate(img, [""], max_new_tokens=12)[0].tokens == caption  # the batch/server caption route
    answer = _reference_tokens(ref, proc, img, ["Question: what is it? Short Answer:"], max_new_tokens=10)[0]
    assert ours.ask(img[0], "what is it?") == proc.tokenizer.decode(answer, skip_special_tokens=True).strip()


def test_chat_turns_use_their_own_instruction(pair, images):
    """If this fails, a chat's later turns reuse the first turn's Q-Former output (a stale prefix or LM cache)."""
    ours, _, _ = pair
    img = _images(images, 1)[0]
    chat = ours.chat(img)
    for question in ["what is it?", "what color is the cat?"]:
        prompt = chat.prompt_for(question)
        expected = ours.generate([img], [prompt], max_new_tokens=8)[0]
        assert chat.ask(question, max_new_tokens=8) == expected.text
        assert chat.last.tokens == expected.tokens


def test_missing_qformer_tokenizer_is_named(instruct_ckpt, tmp_path):
    """If this fails, a checkpoint without its Q-Former tokenizer fails later with an obscure error."""
    folder = tmp_path / "no_qformer_tokenizer"
    shutil.copytree(instruct_ckpt, folder, ignore=shutil.ignore_patterns("qformer_tokenizer"))
    with pytest.raises(ConfigError, match="qformer_tokenizer"):
        blip2.load(folder, device="cpu", dtype="fp32")


def test_config_round_trips_as_instructblip(instruct_ckpt):
    """If this fails, a saved InstructBLIP model is read back (by us or transformers) as a BLIP-2 model."""
    cfg = Blip2Config.from_json_file(instruct_ckpt / "config.json")
    out = cfg.to_dict()
    assert out["model_type"] == "instructblip" and out["architectures"] == ["InstructBlipForConditionalGeneration"]
    assert Blip2Config.from_dict(json.loads(json.dumps(out))).is_instruct
    unnamed = {k: v for k, v in out.items() if k != "architectures"}  # old configs: model_type alone decides
    assert Blip2Config.from_dict(unnamed).is_instruct


def _to_lavis_instruct(state: dict, lm: str) -> dict:
    """HF InstructBLIP keys -> LAVIS `blip2_*_instruct` keys: the Q-Former embeddings by hand, the rest as BLIP-2."""
    embeddings = {
        "qformer.embeddings.layernorm.": "Qformer.bert.embeddings.LayerNorm.",
        "qformer.embeddings.word_embeddings.": "Qformer.bert.embeddings.word_embeddings.",
        "qformer.embeddings.position_embeddings.": "Qformer.bert.embeddings.position_embeddings.",
    }
    out = {}
    for key, value in _to_lavis({k: v for k, v in state.items() if not k.startswith("qformer.embeddings.")}).items():
        out[key.replace("opt_proj.", f"{lm}_proj.").replace("opt_model.", f"{lm}_model.")] = value
    for key, value in state.items():
        for hf, lavis in embeddings.items():
            if key.startswith(hf):
                out[lavis + key[len(hf) :]] = value
    return out


def test_lavis_instruct_state_dict_loads(instruct_ckpt, tmp_path):
    """If this fails, LAVIS `blip2_t5_instruct` / `blip2_vicuna_instruct` checkpoints cannot be used."""
    state = load_file(instruct_ckpt / "model.safetensors")
    lm = "t5" if "t5" in instruct_ckpt.name else "llm"
    lavis = _to_lavis_instruct(state, lm)
    assert is_lavis_instruct(list(lavis))
    assert lavis_instruct_to_hf(lavis).keys() == state.keys()
    folder = tmp_path / "lavis"
    shutil.copytree(instruct_ckpt, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"model": lavis}, folder / f"blip2_{lm}_instruct.pth")
    got = dict(load_model(folder)[0].named_parameters())
    want = dict(load_model(instruct_ckpt)[0].named_parameters())
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key.endswith("self_attn.qkv.bias"):  # LAVIS has no k-bias: the fused bias holds zeros there
            d = value.shape[0] // 3
            value = torch.cat([value[:d], torch.zeros(d), value[2 * d :]])
        assert torch.equal(got[key], value), key


def test_cli_caption_and_ask(pair, instruct_ckpt, images):
    """If this fails, `blip2 caption` / `blip2 ask` on an InstructBLIP checkpoint do not print what the API gives."""
    ours, _, _ = pair
    path = str(images["rgb"])
    runner = CliRunner()
    caption = runner.invoke(main, ["caption", path, "--model", str(instruct_ckpt), "--dtype", "fp32"])
    assert caption.exit_code == 0, caption.output
    assert caption.stdout == f"{path}\t{one_line(ours.caption(load_image(path)))}\n"
    ask = runner.invoke(main, ["ask", path, "what is it?", "--model", str(instruct_ckpt), "--dtype", "fp32"])
    assert ask.exit_code == 0, ask.output
    assert ask.stdout == ours.ask(load_image(path), "what is it?") + "\n"


def test_models_lists_instructblip():
    """If this fails, `blip2 models` does not show the InstructBLIP checkpoints users can load."""
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    for name in ["flan-t5-xl", "flan-t5-xxl", "vicuna-7b", "vicuna-13b"]:
        assert f"Salesforce/instructblip-{name}" in KNOWN_MODELS
        assert f"Salesforce/instructblip-{name} " in result.stdout
