"""Fine-tuning a BLIP-2 checkpoint on captions or questions: the Q-Former (as LAVIS), optionally LoRA on the LM.

Checks what fine-tuning users trip over: which LM layers get adapters (per family; never the Q-Former), that only
the intended weights change, that the adapters save, load and merge into a checkpoint `transformers` reads with the
same logits, and that a non-finite loss in half precision is skipped and reported, not trained on.
"""

from __future__ import annotations

import json
import math
import warnings

import fixtures
import pytest
import torch
from click.testing import CliRunner
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration, Blip2Processor, GPTNeoXConfig, GPTNeoXForCausalLM

import blip2
from blip2.adapter import apply_adapter
from blip2.checkpoint import load_model
from blip2.cli import main
from blip2.errors import CheckpointError, ConfigError, TrainingError
from blip2.processing import load_image
from blip2.train import TrainConfig, train
from blip2.train.lora import TARGET_MODULES, target_modules
from blip2.train.models import Stage2Model
from blip2.train.trainer import build_model

FAMILIES = {"opt": "make_opt_checkpoint", "t5": "make_t5_checkpoint", "llama": "make_llama_checkpoint"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return {lm: getattr(fixtures, builder)(root / lm) for lm, builder in FAMILIES.items()}


@pytest.fixture(scope="module")
def manifests(tiny, tmp_path_factory):
    """Four captions and four questions (the same four images), each in its own JSONL file."""
    root = tmp_path_factory.mktemp("manifests")
    rows = [json.loads(line) for line in tiny.manifest.read_text().splitlines()]
    out = {}
    for kind, key in (("caption", "caption"), ("vqa", "question")):
        mine = [{**r, "image": str(tiny.root / r["image"])} for r in rows if key in r][:4]
        out[kind] = root / f"{kind}.jsonl"
        out[kind].write_text("".join(json.dumps(r) + "\n" for r in mine))
    return out


def _cfg(ckpt, data, out, **kw) -> dict:
    cfg = {
        "stage": 2,
        "init": str(ckpt),
        "out": str(out),
        "data": [{"kind": "jsonl", "path": str(data)}],
        "steps": 2,
        "batch_size": 4,
        "warmup_steps": 0,
        "lr": 3e-3,
        "min_lr": 3e-3,
        "augment": False,
        "lora": {"r": 4, "dropout": 0.0},
        "progress": False,
        "cpu": True,
    }
    return {**cfg, **kw}


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


# ---- which layers get adapters --------------------------------------------------------------------------------------
@pytest.mark.parametrize("lm", FAMILIES)
def test_adapters_on_the_family_layers_of_the_lm_only(ckpts, lm):
    """If this fails, LoRA adapts the wrong layers for this LM family, or reaches into the Q-Former or ViT (whose
    `query`/`value` layers a careless target list also matches) instead of leaving them to full training."""
    model, _ = build_model(TrainConfig.from_dict(_cfg(ckpts[lm], "unused", "unused")))
    adapted = [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert adapted and all(name.startswith("blip.language_model.") for name in adapted)
    assert {name.rpartition(".")[2] for name in adapted} == set(TARGET_MODULES[lm])
    # query and value of every attention: OPT, LLaMA 2 layers; T5 2 encoder layers, 2 decoder layers with cross-attn
    assert len(adapted) == {"opt": 2 * 2, "llama": 2 * 2, "t5": 2 * 2 + 2 * 4}[lm]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lm_trainable = {n for n in trainable if n.startswith("blip.language_model.")}
    assert lm_trainable and all(".lora_A." in n or ".lora_B." in n for n in lm_trainable)
    assert not any(n.startswith("blip.vision_model.") for n in trainable)
    assert any(n.startswith("blip.qformer.") for n in trainable) and "blip.query_tokens" in trainable


def test_unknown_family_asks_for_target_modules():
    """If this fails, a user with another LM gets peft's guess (or nothing adapted) instead of being told to name
    the layers, with the names to choose from."""
    lm = GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20)
    )
    with pytest.raises(ConfigError, match=r"'gpt_neox'.*lora.target_modules.*query_key_value"):
        target_modules(lm)
    assert target_modules(lm, ["query_key_value"]) == ["query_key_value"]
    with pytest.raises(ConfigError, match=r"\['q_proj'\] not among .*query_key_value"):
        target_modules(lm, ["q_proj", "dense"])


def test_lora_settings_errors_name_the_value():
    with pytest.raises(ConfigError, match="needs stage: 2"):
        TrainConfig(stage=1, lora={})
    with pytest.raises(ConfigError, match=r"lora: unknown settings \['rank'\]"):
        TrainConfig(stage=2, lora={"rank": 4})
    assert TrainConfig(stage=2, lora=True).lora.r == 8 and TrainConfig(stage=2, lora=False).lora is None


# ---- training: what learns, what stays ----------------------------------------------------------------------------
@pytest.mark.parametrize(("lm", "kind"), [("opt", "caption"), ("t5", "vqa"), ("llama", "caption"), ("llama", "vqa")])
def test_finetune_learns_and_leaves_frozen_weights_alone(ckpts, manifests, tmp_path, lm, kind):
    """If this fails, fine-tuning on a user's captions or questions does not lower their loss, or it changes the
    image encoder or the LM's own weights (which must stay as released; only the adapters learn there)."""
    result = train(_cfg(ckpts[lm], manifests[kind], tmp_path / "run", steps=30))
    losses = _losses(tmp_path / "run")
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses  # the Q-Former's dropout makes single steps noisy
    before, after = _weights(ckpts[lm]), _weights(result.model)
    assert before.keys() == after.keys()
    for name in before:
        same = torch.equal(before[name], after[name])
        if name.startswith(("vision_model.", "language_model.")):
            assert same, f"{name} changed"
        elif name.startswith(("qformer.encoder.layer.0.attention.", "query_tokens", "language_projection.")):
            assert not same, f"{name} did not train"
    adapter = load_file(result.model / "adapter" / "adapter_model.safetensors")
    assert adapter and any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())


def test_without_lora_no_adapter_and_the_lm_unchanged(ckpts, manifests, tmp_path):
    result = train(_cfg(ckpts["opt"], manifests["caption"], tmp_path / "run", lora=None))
    assert not (result.model / "adapter").exists()
    before, after = _weights(ckpts["opt"]), _weights(result.model)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("language_model."))


def test_killed_and_resumed_lora_run_logs_the_same_losses(ckpts, manifests, tmp_path):
    """If this fails, resuming a LoRA run loses the adapters' weights or optimizer state."""
    kw = {"steps": 4, "save_every": 2}
    train(_cfg(ckpts["opt"], manifests["vqa"], tmp_path / "whole", **kw))
    train(_cfg(ckpts["opt"], manifests["vqa"], tmp_path / "resumed", stop_at_step=2, **kw))
    train(_cfg(ckpts["opt"], manifests["vqa"], tmp_path / "resumed", **kw))
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "whole")


# ---- adapters: load, merge ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(ckpts, manifests, tmp_path_factory):
    """A LoRA fine-tune per family and its merged checkpoint (written by the CLI)."""
    out = {}
    for lm in FAMILIES:
        run = tmp_path_factory.mktemp(f"lora-{lm}")
        model = train(_cfg(ckpts[lm], manifests["caption"], run / "run", steps=4)).model
        cli = CliRunner().invoke(main, ["train", "merge", str(model), str(run / "merged")])
        assert cli.exit_code == 0, cli.output
        out[lm] = (model, run / "merged")
    return out


def _inputs(folder, lm, images):
    proc = Blip2Processor.from_pretrained(folder)
    proc.tokenizer.padding_side = "right" if lm == "t5" else "left"
    prompts = ["", "a photo of"]
    return proc(images=images, text=prompts, padding=True, return_tensors="pt"), prompts


@pytest.mark.parametrize("lm", FAMILIES)
def test_merged_checkpoint_gives_transformers_the_adapted_logits(trained, tiny, lm):
    """If this fails, the merged checkpoint is not the fine-tuned model: transformers (or any tool reading the
    plain HF layout) would run something else than what was trained and evaluated here."""
    model, merged = trained[lm]
    images = [load_image(p) for p in tiny.images[:2]]
    ours = blip2.load(model, device="cpu", dtype="fp32")  # applies model/adapter, merged while loading
    adapted, _ = load_model(model)
    apply_adapter(adapted, model / "adapter", merge=False)  # the LoRA layers as in training
    base, _ = load_model(model)
    ref, info = Blip2ForConditionalGeneration.from_pretrained(merged, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    inputs, prompts = _inputs(merged, lm, images)
    ids, mask = ours.tokenize(prompts)
    pixels = ours.pixel_values(images)
    kw = {"decoder_input_ids": torch.tensor([[0, 5, 9, 17]] * 2)} if lm == "t5" else {}
    with torch.no_grad():
        expected = ref.eval()(**inputs, **kw).logits
        got = {
            name: m(ids, mask, pixel_values=pixels, **kw).logits
            for name, m in (("unmerged", adapted), ("loaded", ours.model), ("base", base))
        }
    real = torch.cat([torch.ones(2, ours.config.num_query_tokens), mask], 1).bool()
    if lm != "t5":  # padded positions' logits are meaningless
        expected, got = expected[real], {k: v[real] for k, v in got.items()}
    # merging sums (W + s B A) x where training summed W x + s B A x: fp32 rounding grows with the logits' size
    torch.testing.assert_close(got["unmerged"], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["loaded"], expected, atol=1e-4, rtol=1e-4)
    assert (got["base"] - expected).abs().max() > 1e-3  # the adapter changes the output: the check above has teeth
    assert not list(merged.glob("adapter*")) and (merged / "tokenizer.json").is_file()


def test_adapter_errors_name_the_folder(trained, ckpts, tmp_path):
    """If this fails, a wrong or missing adapter loads silently (or as a traceback) instead of a one-line error."""
    model, _ = trained["opt"]
    with pytest.raises(CheckpointError, match="not a LoRA adapter folder"):
        blip2.load(ckpts["opt"], device="cpu", dtype="fp32", adapter=tmp_path)
    with pytest.raises(CheckpointError, match="does not fit this language model"):
        blip2.load(ckpts["t5"], device="cpu", dtype="fp32", adapter=model / "adapter")
    with pytest.raises(ConfigError, match="int8"):
        blip2.load(model, device="cpu", dtype="int8")
    bad = CliRunner().invoke(main, ["train", "merge", str(ckpts["opt"]), str(tmp_path / "out")])
    assert bad.exit_code == 2 and "no adapter/ folder" in bad.output


def test_cli_finetune(ckpts, manifests, tmp_path):
    out = tmp_path / "ft"
    args = ["train", "finetune", str(ckpts["opt"]), str(manifests["caption"]), str(manifests["vqa"]), "--lora"]
    args += ["--steps", "1", "--batch-size", "2", "--out", str(out), "--set", "cpu=true", "--set", "progress=false"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"model in {out / 'model'}" in result.output and (out / "model" / "adapter").is_dir()
    assert json.loads((out / "config.json").read_text())["lora"]["r"] == 8


# ---- precision and non-finite losses ------------------------------------------------------------------------------
@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision setting per process; a test that changes it starts and ends clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_bf16_frozen_lm_keeps_fp32_adapters_and_finite_losses(ckpts, manifests, tmp_path, fresh_accelerator_state):
    """If this fails, training with the LM frozen in bf16 (LAVIS' memory saving) puts the adapters in bf16 too,
    where small updates vanish, or gives non-finite losses."""
    cfg = _cfg(ckpts["opt"], manifests["caption"], tmp_path / "run", frozen_dtype="bf16", mixed_precision="bf16")
    model, _ = build_model(TrainConfig.from_dict(cfg))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if ".lora_" in n or n.startswith("blip.qformer."))
    assert dtypes["blip.language_model.model.decoder.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    result = train({**cfg, "steps": 4})
    assert all(math.isfinite(v) for v in _losses(tmp_path / "run")) and result.model is not None


def _nan_on_calls(monkeypatch, calls: set[int] | None) -> None:
    """Make Stage2Model's loss NaN on the given forward calls (1-based; None: always), as an fp16 overflow does."""
    original, count = Stage2Model.forward, [0]

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        count[0] += 1
        if calls is None or count[0] in calls:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Stage2Model, "forward", forward)


def test_nan_loss_skips_the_update_and_says_so(ckpts, manifests, tmp_path, monkeypatch):
    """If this fails, one NaN loss in half precision silently turns every trained weight into NaN."""
    cfg = _cfg(ckpts["opt"], manifests["caption"], tmp_path / "one", stop_at_step=1, steps=3)
    train(cfg)
    _nan_on_calls(monkeypatch, {2})
    with pytest.warns(UserWarning, match="step 2: the loss is nan; the update was skipped"):
        train({**cfg, "out": str(tmp_path / "two"), "stop_at_step": 2})
    one = load_file(tmp_path / "one" / "checkpoint" / "trainable.safetensors")
    two = load_file(tmp_path / "two" / "checkpoint" / "trainable.safetensors")
    assert all(torch.equal(one[k], two[k]) for k in one)  # step 2 changed nothing
    rows = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in rows] == [None, 1] and math.isnan(rows[1]["loss"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train({**cfg, "out": str(tmp_path / "two"), "stop_at_step": None})
    assert result.step == 3 and math.isfinite(result.last["loss"])
    assert all(torch.isfinite(v).all() for v in _weights(result.model).values())


def test_a_loss_that_stays_nan_stops_the_run_with_advice(ckpts, manifests, tmp_path, monkeypatch):
    """If this fails, a run whose loss is always NaN goes on to the end and exports an untrained model."""
    _nan_on_calls(monkeypatch, None)
    cfg = _cfg(ckpts["opt"], manifests["caption"], tmp_path / "run", steps=5, max_skipped_steps=2)
    with warnings.catch_warnings(), pytest.raises(TrainingError, match="2 optimizer steps in a row.*bf16"):
        warnings.simplefilter("ignore")
        train(cfg)
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision (a loss scaler) needs a GPU")
def test_fp16_loss_scaler_skips_an_overflowing_step(ckpts, manifests, tmp_path, monkeypatch, fresh_accelerator_state):
    """If this fails, fp16 training on a GPU applies an update whose gradients overflowed."""
    _nan_on_calls(monkeypatch, {2})
    cfg = _cfg(ckpts["opt"], manifests["caption"], tmp_path / "run", steps=3, mixed_precision="fp16", cpu=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows[1].get("skipped") == 1 and math.isfinite(result.last["loss"])
    assert all(torch.isfinite(v).all() for v in _weights(result.model).values())
