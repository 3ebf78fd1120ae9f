"""The miniature's second-tower phase runs end to end beside the committed model (a few steps, tiny sets)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click
import pytest
import torch
from safetensors.torch import load_file

from blip2.train.miniature import Recipe, second_tower

FIRST = Path(__file__).resolve().parents[2] / "examples" / "miniature"
TINY = Recipe(
    train_images=32,
    test_images=8,
    novel_images=8,
    vision_steps=3,
    lm_steps=1,
    stage1_steps=2,
    stage2_steps=2,
    short_stage2_steps=1,
    batch_size=8,
)


@pytest.mark.skipif(not (FIRST / "results.json").is_file(), reason="examples/miniature is not in this checkout")
def test_second_tower_reports_both_towers_on_the_same_sets(tmp_path):
    """If this fails, `blip2 miniature tower` breaks (its tower, stages or evaluation), its figures file lacks the
    first tower's figures or the second's, or the second model is not built on a CLIP tower and the first's LM."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = second_tower(FIRST, tmp_path, TINY)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(out))
    assert set(out["towers"]) == {"eva", "clip_vision_model"}
    for name, t in out["towers"].items():
        assert set(t["retrieval"]) == set(t["stage2"]) == {"test", "novel"}, name
        for split in ("test", "novel"):
            assert 0 <= t["stage2"][split]["caption"]["all_four_correct"] <= 1
            assert 0 <= t["stage2"][split]["vqa"]["accuracy"] <= 1
            assert 0 <= t["retrieval"][split]["image_to_text_R@1_itc"] <= 1
    first = json.loads((FIRST / "results.json").read_text())
    assert out["towers"]["eva"]["stage2"] == first["stage2"]  # the first's figures, as committed
    config = json.loads((tmp_path / "stage2" / "model" / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    mine, theirs = (load_file(m / "model.safetensors") for m in (tmp_path / "stage2" / "model", FIRST / "model"))
    lm = [k for k in theirs if k.startswith("language_model.")]
    assert lm and all(torch.equal(mine[k], theirs[k]) for k in lm)  # the same frozen LM as the first


def test_second_tower_needs_a_first_model_with_results(tmp_path):
    with pytest.raises(click.ClickException, match="results.json"):
        second_tower(tmp_path / "nothing", tmp_path / "work", TINY)
