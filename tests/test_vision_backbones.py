"""BLIP-2 on a `transformers` image tower (CLIP, SigLIP, DINOv2): shapes, preprocessing, save/load, captioning."""

from __future__ import annotations

import json

import fixtures
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import blip2
from blip2.backbones import FAMILIES, HFVisionTower, load_tower, save_tower, tower_config
from blip2.checkpoint import save_model
from blip2.config import TOWER_TYPES, Blip2Config
from blip2.errors import ConfigError
from blip2.model import Blip2Model
from blip2.processing import ImageTransform

VIT = {"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
TOWERS = {
    "clip_vision_model": {**VIT, "intermediate_size": 37},
    "siglip_vision_model": {**VIT, "intermediate_size": 37},
    "dinov2": {**VIT, "mlp_ratio": 2},
}


def spec(model_type: str) -> dict:
    return {"model_type": model_type, **TOWERS[model_type]}


def tiny_blip2(folder, model_type: str) -> Blip2Model:
    """A tiny BLIP-2 (Q-Former + OPT from fixtures) on a random tower, saved with its tokenizer."""
    tok = fixtures.make_opt_tokenizer(folder)
    text = fixtures.tiny_opt_config(fixtures._round8(len(tok)), eos_token_id=fixtures.newline_id(tok))
    cfg = Blip2Config.from_dict(
        {
            "vision_config": tower_config(spec(model_type)).to_dict(),
            "qformer_config": fixtures.TINY_QFORMER,
            "text_config": text.to_dict(),
            "num_query_tokens": 4,
            "image_token_index": tok.convert_tokens_to_ids(fixtures.IMAGE_TOKEN),
        }
    )
    torch.manual_seed(0)
    model = Blip2Model(cfg).eval()
    fixtures.rerandomise(model, 0)
    save_model(model, folder)
    return model


def test_every_tower_type_has_a_family():
    """If this fails, a vision_config model_type is accepted by config.py but has no tower to build."""
    assert tuple(FAMILIES) == TOWER_TYPES


@pytest.mark.parametrize("model_type", TOWER_TYPES)
def test_tower_feeds_the_qformer_at_its_width(model_type):
    """If this fails, the Q-Former's cross-attention is sized for EVA, not for the tower it reads."""
    cfg = Blip2Config.from_dict({"vision_config": spec(model_type), "qformer_config": fixtures.TINY_QFORMER})
    assert cfg.qformer_config.encoder_hidden_size == 24
    model = Blip2Model(cfg).eval()
    assert isinstance(model.vision_model, HFVisionTower)
    feats = model.encode_image(torch.randn(2, 3, 32, 32))
    tokens = 16 if model_type == "siglip_vision_model" else 17  # SigLIP has no CLS token
    assert feats.shape == (2, tokens, 24)
    assert model.query_output(feats).shape == (2, cfg.num_query_tokens, 32)


def test_clip_features_are_layer_normed_on_every_token():
    """If this fails, CLIP's patch tokens reach the Q-Former without the final LayerNorm (transformers applies
    `post_layernorm` to the pooled token only)."""
    tower = load_tower(spec("clip_vision_model"))
    x = torch.randn(1, 3, 32, 32)
    raw = tower.tower(pixel_values=x).last_hidden_state
    assert torch.allclose(tower(x), tower.tower.post_layernorm(raw))
    assert not torch.allclose(tower(x), raw)


@pytest.mark.parametrize("model_type", TOWER_TYPES)
def test_preprocessing_equals_the_towers_image_processor(model_type, tmp_path):
    """If this fails, images reach the tower resized, cropped or normalised otherwise than its own processor."""
    from transformers import AutoImageProcessor

    tower = load_tower(spec(model_type))
    save_tower(tower, tmp_path)
    ours = tower_config(tmp_path).transform()
    theirs = AutoImageProcessor.from_pretrained(tmp_path)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    assert torch.equal(ours([img]), theirs([img], return_tensors="pt").pixel_values)
    expected = {"clip_vision_model": 32, "siglip_vision_model": None, "dinov2": 37}[model_type]
    assert ours.size == 32 and ours.shortest_edge == expected


def test_clip_preprocessing_bit_equal_to_clip_image_processor():
    """If this fails, a CLIP checkpoint's images are not the pixels it was trained on (resize + centre crop)."""
    from transformers import CLIPImageProcessor

    ref = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    ours = ImageTransform.from_dict(ref.to_dict())
    assert ours.shortest_edge == 40 and ours.size == 32
    rng = np.random.default_rng(1)
    for shape in ((50, 70, 3), (90, 41, 3), (33, 33, 3)):
        img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))
        assert torch.equal(ours([img]), ref([img], return_tensors="pt").pixel_values)


def test_bad_tower_configs_are_named():
    """If this fails, a typo in vision_config builds EVA silently or fails deep inside transformers."""
    with pytest.raises(ConfigError, match="'vit'"):
        Blip2Config.from_dict({"vision_config": {"model_type": "vit"}})
    with pytest.raises(ConfigError, match="crop_size"):
        ImageTransform.from_dict({"do_center_crop": True, "size": {"shortest_edge": 40}})
    with pytest.raises(ConfigError, match="shortest_edge"):
        ImageTransform(size=32, shortest_edge=16)


@pytest.mark.parametrize("model_type", TOWER_TYPES)
def test_save_load_caption_round_trip(model_type, tmp_path):
    """If this fails, a BLIP-2 on a CLIP/SigLIP/DINOv2 tower does not come back from disk as it was saved."""
    model = tiny_blip2(tmp_path, model_type)
    m = blip2.load(tmp_path, device="cpu", dtype="fp32")
    assert m.transform == model.config.image_transform()  # not EVA's 224 / CLIP mean-std
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["model_type"] == model_type
    images = fixtures.make_images(tmp_path / "imgs")
    pixels = m.pixel_values([images["rgb"]])
    with torch.no_grad():
        assert torch.equal(m.model.image_prefix(pixels), model.image_prefix(pixels))
    caption = m.caption(images["rgb"], max_new_tokens=5)
    assert isinstance(caption, str)
    assert m.ask(images["rgb"], "what is it?", max_new_tokens=3) is not None
    assert m.caption([images["rgb"], images["l"]], max_new_tokens=5)[0] == caption  # batching changes nothing


def test_cli_captions_with_a_tower_model(tmp_path):
    """If this fails, `blip2 caption` cannot use a model built on a transformers tower."""
    from blip2.cli import main

    tiny_blip2(tmp_path / "m", "clip_vision_model")
    images = fixtures.make_images(tmp_path / "imgs")
    expected = blip2.load(tmp_path / "m", device="cpu", dtype="fp32").caption(images["rgb"], max_new_tokens=5)
    out = CliRunner().invoke(
        main,
        ["caption", str(images["rgb"]), "--model", str(tmp_path / "m"), "--dtype", "fp32", "--max-new-tokens", "5"],
    )
    assert out.exit_code == 0, out.output
    assert expected.strip() in out.output
