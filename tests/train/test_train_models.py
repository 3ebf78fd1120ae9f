"""The trainable wrappers: freezing, the attention masks each loss uses, bridging any LM, export and reload."""

from __future__ import annotations

import random

import fixtures
import pytest
import torch
from conftest import QFORMER
from PIL import Image
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
)

import blip2
from blip2.config import QFormerConfig
from blip2.errors import ConfigError
from blip2.train import VisionAdapter, export, load_stage1, load_vision, new_stage1, new_stage2
from blip2.train.data import Example, Stage1Collate, Stage2Collate, TrainTransform
from blip2.train.models import bert_to_qformer, init_from_bert


def _stage1(tiny, vision=None, qformer=None, **kw):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny.bert)
    vision = vision if vision is not None else load_vision(tiny.vision)
    qcfg = QFormerConfig(**{**QFORMER, **(qformer or {})})
    return new_stage1(vision, tok, qcfg, num_query_tokens=4, embed_dim=16, **kw), tok


def _batch1(tiny, tok, n=3, size=32):
    items = [(Example(str(tiny.images[i]), f"a photo of a {c}"), random.Random(i)) for i, c in enumerate("abc"[:n])]
    return Stage1Collate(tok, TrainTransform(size, augment=False), max_length=12)(items)


def _lm(path):
    auto = AutoModelForSeq2SeqLM if "t5" in path.name else AutoModelForCausalLM
    return auto.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _grads(model: nn.Module) -> tuple[set[str], set[str]]:
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return with_grad, trainable


def test_stage1_gradients_reach_exactly_the_trainable_parameters(tiny):
    """If this fails, stage 1 updates the frozen image encoder or leaves part of the Q-Former untrained."""
    model, tok = _stage1(tiny)
    model.train()
    model(**_batch1(tiny, tok)).loss.backward()
    with_grad, trainable = _grads(model)
    assert trainable == {n for n, _ in model.named_parameters() if not n.startswith("blip.vision_model.")}
    # every trainable tensor learns, except the embedding rows of tokens absent from the batch's texts
    assert with_grad == trainable
    assert all(p.grad is None for p in model.blip.vision_model.parameters())


def test_stage2_gradients_reach_exactly_queries_qformer_projection(tiny):
    """If this fails, stage 2 updates the frozen LLM or image encoder."""
    stage1, _ = _stage1(tiny)
    lm, tok = _lm(tiny.opt)
    model = new_stage2(stage1.blip, lm, tok)
    model.train()
    items = [(Example(str(tiny.images[i]), "a red cat", prompt=p), random.Random(i)) for i, p in enumerate(["", "Q:"])]
    batch = Stage2Collate(tok, TrainTransform(32, augment=False), encoder_decoder=False)(items)
    model(**batch).loss.backward()
    with_grad, trainable = _grads(model)
    trained = ("blip.query_tokens", "blip.qformer.", "blip.language_projection.")
    expected = {n for n, _ in model.named_parameters() if n.startswith(trained)}
    assert trainable == expected and with_grad == expected


def test_train_mode_keeps_frozen_towers_in_eval(tiny):
    """If this fails, dropout runs inside the frozen ViT / LLM during training (LAVIS' `disabled_train`)."""
    stage1, _ = _stage1(tiny)
    lm, tok = _lm(tiny.opt)
    stage2 = new_stage2(stage1.blip, lm, tok)
    for model in (stage1, stage2):
        model.train()
        assert model.blip.qformer.training
        assert not model.blip.vision_model.training
        assert not any(m.training for m in model.blip.vision_model.modules())
    assert not any(m.training for m in stage2.blip.language_model.modules())
    stage2.eval()
    assert not stage2.blip.qformer.training


def test_itg_is_causal_and_queries_never_see_text(tiny):
    """If this fails, ITG text sees the future, or the ITC query features depend on the caption (paper, Fig. 2)."""
    model, tok = _stage1(tiny)
    model.eval()
    batch = _batch1(tiny, tok, n=1)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    changed = ids.clone()
    changed[0, 4] = (changed[0, 4] + 7) % 50 + 5
    with torch.no_grad():
        image = model.blip.encode_image(batch["pixel_values"])
        logits_a, _, queries_a = model.itg_logits(image, ids, mask)
        logits_b, _, queries_b = model.itg_logits(image, changed, mask)
        alone = model.blip.query_output(image)
    torch.testing.assert_close(logits_a[:, :4], logits_b[:, :4], atol=1e-5, rtol=0)
    assert (logits_a[:, 4:] - logits_b[:, 4:]).abs().max() > 1e-4
    torch.testing.assert_close(queries_a, queries_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(queries_a, alone, atol=1e-5, rtol=0)


def test_itm_sees_the_text(tiny):
    """If this fails, ITM classifies pairs without looking at the text (it must use the bidirectional mask)."""
    model, tok = _stage1(tiny)
    fixtures.rerandomise(model.blip.qformer, 3, std=0.3)
    model.eval()
    batch = _batch1(tiny, tok, n=2)
    with torch.no_grad():
        image = model.blip.encode_image(batch["pixel_values"])
        a = model.blip.itm_logits(image[:1], batch["input_ids"][:1], batch["attention_mask"][:1])
        b = model.blip.itm_logits(image[:1], batch["input_ids"][1:], batch["attention_mask"][1:])
    assert (a - b).abs().max() > 1e-4


def test_stage1_export_loads_in_transformers_and_back(tiny, tmp_path):
    """If this fails, a stage-1 model cannot be used for retrieval by transformers or resumed with its ITG head."""
    model, tok = _stage1(tiny)
    for part in (model.blip.qformer, model.blip.embeddings, model.blip.itm_head, model.blip.vision_projection):
        fixtures.rerandomise(part, 4, std=0.3)
    with torch.no_grad():
        model.blip.query_tokens.normal_(0, 1)
        model.temp.fill_(0.05)
        model.itg_head.bias.normal_()
    folder = export(model, tmp_path / "s1", tok)
    ref, info = Blip2ForImageTextRetrieval.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = blip2.load(folder, device="cpu", dtype="fp32")
    proc = Blip2Processor.from_pretrained(folder)
    image, texts = Image.open(tiny.images[0]).convert("RGB"), ["a red cat", "a photo of a dog in the snow"]
    with torch.no_grad():
        inputs = proc(images=[image], text=texts, padding=True, return_tensors="pt")
        expected = ref.eval()(**inputs, use_image_text_matching_head=False).logits_per_image[0]
    got = ours.similarity([image], texts)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert got.std() > 1e-4
    again = load_stage1(folder)
    assert again.temp.item() == pytest.approx(0.05)
    torch.testing.assert_close(again.itg_head.bias, model.itg_head.bias)
    torch.testing.assert_close(again.itg_head.dense.weight, model.itg_head.dense.weight)


class ConvTower(nn.Module):
    """A foreign image tower: a strided conv whose output grid is the token sequence."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, kernel_size=8, stride=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).transpose(1, 2)  # (B, 16, width)


def test_any_vision_tower_through_an_adapter(tiny, tmp_path):
    """If this fails, stage 1 only works with the EVA ViT."""
    adapter = VisionAdapter(ConvTower(), width=24, image_size=32)
    model, tok = _stage1(tiny, vision=adapter)
    assert model.blip.qformer.encoder.layer[0].crossattention.attention.key.in_features == 24
    model.train()
    model(**_batch1(tiny, tok)).loss.backward()
    assert all(p.grad is None for p in adapter.parameters())
    assert model.blip.query_tokens.grad is not None
    with pytest.raises(ConfigError, match="EVA ViT"):
        export(model, tmp_path / "x", tok)
    with pytest.raises(ValueError, match=r"\(B, N, 99\)"):
        VisionAdapter(ConvTower(), width=99)(torch.zeros(1, 3, 32, 32))


def test_stage2_bridges_causal_and_seq2seq_lms(tiny):
    """If this fails, stage 2 cannot use an LM of another width or kind, or transformers cannot find the queries."""
    stage1, _ = _stage1(tiny)
    for path in (tiny.opt, tiny.t5):
        lm, tok = _lm(path)
        model = new_stage2(stage1.blip, lm, tok)
        cfg = model.blip.config
        assert model.blip.language_projection.out_features == lm.config.hidden_size
        assert cfg.image_token_index == tok.convert_tokens_to_ids("<image>")
        assert cfg.image_token_index < lm.get_input_embeddings().weight.shape[0]
        assert not cfg.qformer_config.use_qformer_text_input
        torch.testing.assert_close(model.blip.query_tokens, stage1.blip.query_tokens)
        q1 = stage1.blip.qformer.encoder.layer[1].output_query.dense.weight
        torch.testing.assert_close(model.blip.qformer.encoder.layer[1].output_query.dense.weight, q1)
    assert lm.config.is_encoder_decoder
    opt_lm, opt_tok = _lm(tiny.opt)
    new_stage2(stage1.blip, opt_lm, opt_tok)
    assert opt_lm.generation_config.eos_token_id == fixtures.newline_id(opt_tok)  # captions end at "\n"


def test_fresh_qformer_is_the_no_stage1_baseline(tiny):
    stage1, _ = _stage1(tiny)
    lm, tok = _lm(tiny.opt)
    fresh = new_stage2(stage1.blip, lm, tok, fresh_qformer=True)
    w = fresh.blip.qformer.encoder.layer[0].attention.attention.query.weight
    assert not torch.equal(w, stage1.blip.qformer.encoder.layer[0].attention.attention.query.weight)


def test_qformer_from_bert_equals_bert_on_text(tiny, tmp_path):
    """If this fails, initialising the Q-Former from bert-base-uncased (LAVIS) maps weights to the wrong places."""
    tok = AutoTokenizer.from_pretrained(tiny.bert)
    bert_cfg = BertConfig(vocab_size=len(tok) - 1, **QFORMER, max_position_embeddings=64)  # BERT has no [DEC]
    torch.manual_seed(0)
    bert = BertForMaskedLM(bert_cfg).eval()
    with torch.no_grad():
        bert.bert.embeddings.token_type_embeddings.weight.zero_()  # the Q-Former has no token types
    bert.save_pretrained(tmp_path / "bert")
    model, _ = _stage1(tiny, qformer={"max_position_embeddings": 64})
    random_left = init_from_bert(model, tmp_path / "bert")
    assert any(".crossattention." in n for n in random_left) and "blip.query_tokens" in random_left
    assert not any(".attention.attention." in n or "_query." in n for n in random_left)
    ids = tok(["a red cat on the table"], return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        ours = model.blip.qformer(model.blip.embeddings(ids), 0)
        theirs = bert.bert(ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert set(bert_to_qformer({"bert.encoder.layer.0.output.dense.weight": torch.zeros(1)})) == {
        "blip.qformer.encoder.layer.0.output.dense.weight",
        "blip.qformer.encoder.layer.0.output_query.dense.weight",
    }
