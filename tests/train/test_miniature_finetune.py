"""The miniature's fine-tuning demonstration runs end to end on the committed model (a few steps, tiny sets)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from blip2.train.miniature import FinetuneRecipe, finetune_pair

MODEL = Path(__file__).resolve().parents[2] / "examples" / "miniature" / "model"


@pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="examples/miniature is not in this checkout")
def test_finetune_pair_reports_before_and_after(tmp_path):
    """If this fails, `blip2 miniature finetune` breaks: its data, the LoRA run or the before/after scores."""
    recipe = FinetuneRecipe(pair_images=8, replay_images=8, test_images=6, steps=2, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = finetune_pair(MODEL, tmp_path, recipe)
    assert (tmp_path / "run" / "model" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "finetune.json").read_text()) == json.loads(json.dumps(out))
    for when in ("before", "after"):
        assert set(out[when]) == {"pair", "seen_pairs"}
        assert all(0 <= out[when][k]["all_four_correct"] <= 1 for k in out[when])
    truths = [e["truth"] for e in out["before"]["pair"]["examples"]]
    assert truths and all("red triangle" in t for t in truths)  # the test set is the chosen pair's


def test_finetune_pair_refuses_a_pair_that_is_not_held_out(tmp_path):
    import click

    with pytest.raises(click.BadParameter, match="not a held-out pair"):
        finetune_pair(MODEL, tmp_path, FinetuneRecipe(pair=("red", "circle")))
