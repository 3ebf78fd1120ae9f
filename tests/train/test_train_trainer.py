"""The training loop: schedule, weight decay, exact resume, logs, the CLI, and a trained model in the HF layout."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

import blip2
from blip2.cli import main
from blip2.errors import ConfigError
from blip2.train import TrainConfig, train
from blip2.train.trainer import lr_at, param_groups


def _losses(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "sec"} for r in rows]


def test_lr_warmup_then_cosine():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1e-4, min_lr=1e-5, warmup_lr=1e-6)
    assert lr_at(0, cfg) == pytest.approx(1e-6)
    assert lr_at(5, cfg) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert lr_at(10, cfg) == pytest.approx(1e-4)
    assert lr_at(60, cfg) == pytest.approx(1e-5 + 0.5 * (1e-4 - 1e-5) * (1 + math.cos(math.pi / 2)))
    assert lr_at(110, cfg) == pytest.approx(1e-5) and lr_at(500, cfg) == pytest.approx(1e-5)


def test_no_weight_decay_on_norms_biases_and_temperature():
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(3, 3)
    model.norm = torch.nn.LayerNorm(3)
    model.temp = torch.nn.Parameter(torch.tensor(0.07))
    model.query_tokens = torch.nn.Parameter(torch.zeros(1, 2, 3))
    model.frozen = torch.nn.Linear(3, 3).requires_grad_(False)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert sorted(decay["names"]) == ["lin.weight", "query_tokens"]
    assert sorted(no_decay["names"]) == ["lin.bias", "norm.bias", "norm.weight", "temp"]


def test_killed_and_resumed_run_logs_the_same_losses(tiny, tmp_path):
    """If this fails, resuming after a crash silently changes training (data order, RNG, optimizer or schedule)."""
    kw = {"steps": 5, "save_every": 2, "grad_accum": 2, "batch_size": 3, "warmup_steps": 2}
    whole = train(tiny.stage1(tmp_path / "whole", **kw))
    stopped = train(tiny.stage1(tmp_path / "resumed", stop_at_step=3, **kw))
    assert stopped.model is None and stopped.step == 3
    with (tmp_path / "resumed" / "log.jsonl").open("a") as f:  # a line the killed run wrote after its checkpoint
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    resumed = train(tiny.stage1(tmp_path / "resumed", **kw))
    assert resumed.step == 5 and resumed.model is not None
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "whole")
    assert len({r["itm"] for r in _losses(tmp_path / "whole")}) == 5  # the losses really change step to step
    assert whole.last["loss"] == resumed.last["loss"]


def test_resume_refuses_other_settings(tiny, tmp_path):
    train(tiny.stage1(tmp_path / "run", stop_at_step=1))
    with pytest.raises(ConfigError, match="other settings"):
        train(tiny.stage1(tmp_path / "run", lr=0.5))


def test_logs_tensorboard_and_exported_model(tiny, tmp_path):
    result = train(tiny.stage1(tmp_path / "run", steps=2, log_every=1))
    rows = _losses(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert {"loss", "itc", "itm", "itg", "lr", "temp"} <= set(rows[0])
    assert rows[0]["loss"] == pytest.approx(rows[0]["itc"] + rows[0]["itm"] + rows[0]["itg"], rel=1e-5)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert {"config.json", "model.safetensors", "itg_head.safetensors"} <= {p.name for p in result.model.iterdir()}
    sim = blip2.load(result.model, dtype="fp32").similarity([tiny.images[0]], ["a photo of a red cat"])
    assert sim.shape == (1, 1)


def test_frozen_towers_in_bf16(tiny, stage1_model, tmp_path):
    """If this fails, the LAVIS-style half-precision frozen ViT and LLM break stage 2."""
    cfg = _stage2(tiny, stage1_model, tmp_path / "bf16", "opt", frozen_dtype="bf16", steps=1)
    result = train(cfg)
    assert math.isfinite(result.last["loss"])
    assert blip2.load(result.model, dtype="fp32").caption(tiny.images[0], max_new_tokens=3) is not None


def test_config_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="unknown settings \\['stpes'\\]"):
        TrainConfig.from_dict({"stpes": 3})
    with pytest.raises(ConfigError, match="stage must be 1 or 2"):
        TrainConfig(stage=3)
    with pytest.raises(ConfigError, match="QFormerConfig fields \\['hiden_size'\\]"):
        TrainConfig(qformer={"hiden_size": 3})
    with pytest.raises(ConfigError, match="needs 'vision'"):
        train(TrainConfig(out=str(tmp_path), data=[{"kind": "jsonl", "path": "x"}]))


def test_cli_train(tiny, tmp_path):
    cfg = tiny.stage1(tmp_path / "ignored")
    (tmp_path / "run.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["train", str(tmp_path / "run.yaml"), "--out", str(out), "--set", "steps=1"])
    assert result.exit_code == 0, result.output
    assert f"trained 1 steps; model in {out / 'model'}" in result.output
    bad = CliRunner().invoke(main, ["train", str(tmp_path / "run.yaml"), "--set", "stage=7"])
    assert bad.exit_code == 2 and "stage must be 1 or 2" in bad.output


@pytest.fixture(scope="module")
def stage1_model(tiny, tmp_path_factory):
    return train(tiny.stage1(tmp_path_factory.mktemp("s1") / "run", steps=1)).model


def _stage2(tiny, stage1_model, out, lm, **kw) -> dict:
    cfg = {
        "stage": 2,
        "out": str(out),
        "stage1": str(stage1_model),
        "language_model": str(getattr(tiny, lm)),
        "data": [{"kind": "jsonl", "path": str(tiny.manifest)}],
        "steps": 2,
        "batch_size": 4,
        "warmup_steps": 1,
        "lr": 1e-3,
        "progress": False,
    }
    return {**cfg, **kw}


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_trained_stage2_generates_like_transformers(tiny, stage1_model, tmp_path, lm):
    """If this fails, a model trained here is not usable by transformers, or gives other text there."""
    folder = train(_stage2(tiny, stage1_model, tmp_path / lm, lm)).model
    ours = blip2.load(folder, device="cpu", dtype="fp32")
    ref, info = Blip2ForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    proc = Blip2Processor.from_pretrained(folder)
    proc.tokenizer.padding_side = "right" if lm == "t5" else "left"
    images = [Image.open(p).convert("RGB") for p in tiny.images[:3]]
    prompts = ["", "a photo of", "Question: what color is the cat? Answer:"]
    with torch.no_grad():
        inputs = proc(images=images, text=prompts, padding=True, return_tensors="pt")
        out = ref.eval().generate(**inputs, max_new_tokens=8)
    if lm == "opt":
        out = out[:, inputs.input_ids.shape[1] :]
    expected = [t.strip() for t in proc.tokenizer.batch_decode(out, skip_special_tokens=True)]
    got = [g.text for g in ours.generate(images, prompts, max_new_tokens=8)]
    assert got == expected
    assert len(set(got)) > 1  # the outputs depend on the inputs
