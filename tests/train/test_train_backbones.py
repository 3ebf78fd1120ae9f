"""Stage 1 and stage 2 training on a frozen `transformers` image tower (a CLIP folder, a SigLIP config dict)."""

from __future__ import annotations

import json

import pytest
import torch

import blip2
from blip2.backbones import HFVisionTower, load_tower, save_tower
from blip2.train.trainer import train

CLIP = {
    "model_type": "clip_vision_model",
    "hidden_size": 24,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    torch.manual_seed(0)
    return save_tower(load_tower(CLIP), tmp_path_factory.mktemp("clip"))


def test_stage1_and_stage2_on_a_clip_tower(tiny, tmp_path, clip_folder):
    """If this fails, BLIP-2 cannot be trained on a CLIP tower, or the trained model does not load and caption."""
    # one repeated batch (batch_size covers the manifest's captions): the loss must fall on it
    common = {"steps": 8, "batch_size": 12, "shuffle": False, "augment": False, "warmup_steps": 0, "lr": 1e-3}
    s1 = train(tiny.stage1(tmp_path / "s1", vision=str(clip_folder), **common))
    l1 = losses(tmp_path / "s1")
    assert all(torch.isfinite(torch.tensor(l1))) and l1[-1] < l1[0]
    stage2 = {
        "stage": 2,
        "out": str(tmp_path / "s2"),
        "stage1": str(s1.model),
        "language_model": str(tiny.opt),
        "data": [{"kind": "jsonl", "path": str(tiny.manifest)}],
        "max_text_length": 16,
        "progress": False,
        "cpu": True,
        **common,
    }
    s2 = train(stage2)
    l2 = losses(tmp_path / "s2")
    assert all(torch.isfinite(torch.tensor(l2))) and l2[-1] < l2[0]
    m = blip2.load(s2.model, device="cpu", dtype="fp32")
    assert isinstance(m.model.vision_model, HFVisionTower)
    tower = load_tower(clip_folder)
    pixels = m.pixel_values([tiny.images[0]])
    with torch.no_grad():  # the tower stayed frozen: its features are the folder's
        assert torch.equal(m.model.encode_image(pixels), tower(pixels))
    assert m.transform == tower.config.transform()
    assert isinstance(m.caption(tiny.images[0], max_new_tokens=4), str)


def test_stage1_from_a_tower_config_dict(tiny, tmp_path):
    """If this fails, `vision: {model_type: siglip_vision_model, ...}` in a training config is refused."""
    siglip = {**CLIP, "model_type": "siglip_vision_model"}
    result = train(tiny.stage1(tmp_path / "s1", vision=siglip))
    cfg = json.loads((result.model / "config.json").read_text())
    assert cfg["vision_config"]["model_type"] == "siglip_vision_model"
    assert cfg["qformer_config"]["encoder_hidden_size"] == 24
    pre = json.loads((result.model / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == [0.5, 0.5, 0.5]  # SigLIP's normalisation, not CLIP's
