"""Tiny materials for the training tests: an image encoder, tokenizers, two LMs, images and manifests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import fixtures
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import OPTForCausalLM, T5ForConditionalGeneration

QFORMER = {**fixtures.TINY_QFORMER, "num_hidden_layers": 2}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train several times faster on one thread when the machine is busy; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Tiny:
    root: Path
    vision: Path  # a BLIP-2 checkpoint whose ViT (32 px, patch 8, width 32) is the image encoder
    bert: Path  # Q-Former tokenizer with [DEC]
    opt: Path  # OPT LM + tokenizer
    t5: Path  # T5 LM + tokenizer
    manifest: Path  # 12 captions + 12 questions
    images: list[Path]

    def stage1(self, out: Path, **kw) -> dict:
        cfg = {
            "stage": 1,
            "out": str(out),
            "vision": str(self.vision),
            "tokenizer": str(self.bert),
            "qformer": dict(QFORMER),
            "num_query_tokens": 4,
            "embed_dim": 16,
            "data": [{"kind": "jsonl", "path": str(self.manifest)}],
            "steps": 2,
            "batch_size": 4,
            "warmup_steps": 1,
            "max_text_length": 16,
            "progress": False,
            "cpu": True,
        }
        cfg.update(kw)
        return cfg


def _opt_lm(folder: Path) -> None:
    tok = fixtures.make_opt_tokenizer(folder)
    lm = OPTForCausalLM(fixtures.tiny_opt_config(fixtures._round8(len(tok))))
    fixtures.rerandomise(lm, 1)  # peaked logits: generated text differs between images
    lm.save_pretrained(folder)


def _t5_lm(folder: Path) -> None:
    tok = fixtures.make_t5_tokenizer(folder)
    lm = T5ForConditionalGeneration(fixtures.tiny_t5_config(fixtures._round8(len(tok)), feed_forward_proj="relu"))
    fixtures.rerandomise(lm, 2)
    lm.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    root = tmp_path_factory.mktemp("train")
    vision = fixtures.make_itm_checkpoint(root / "itm")
    fixtures.make_bert_tokenizer(root / "bert")
    _opt_lm(root / "opt")
    _t5_lm(root / "t5")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    lines, images = [], []
    for i in range(12):
        path = root / "imgs" / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        images.append(path)
        colour, obj = fixtures.COLOURS[i % 10], fixtures.OBJECTS[i % 13]
        lines.append({"image": f"imgs/{i}.png", "caption": f"a photo of a {colour} {obj}"})
        lines.append({"image": f"imgs/{i}.png", "question": f"what color is the {obj}?", "answer": colour})
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return Tiny(root, vision, root / "bert", root / "opt", root / "t5", manifest, images)
