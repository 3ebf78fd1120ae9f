"""Loading every checkpoint layout, strictly, and saving in the HF layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Blip2ForConditionalGeneration

import blip2
from blip2.checkpoint import hf_keys, lavis_to_hf, load_model, resolve_dtype, save_model
from blip2.config import Blip2Config
from blip2.errors import CheckpointError, ConfigError


def _logits(folder, images):
    m = blip2.load(folder, device="cpu", dtype="fp32")
    ids, mask = m.tokenize(["a photo of"])
    with torch.no_grad():
        return m.model(ids, mask, pixel_values=m.pixel_values([images["rgb"]])).logits


@pytest.fixture(scope="module")
def reference_logits(opt_ckpt, images):
    return _logits(opt_ckpt, images)


@pytest.mark.parametrize("variant", ["opt_ckpt_sharded", "opt_ckpt_bin", "opt_ckpt_old"])
def test_layouts_give_the_same_model(variant, request, reference_logits, images):
    """If this fails, a sharded, .bin or pre-4.47 checkpoint loads different (or no) weights."""
    folder = request.getfixturevalue(variant)
    torch.testing.assert_close(_logits(folder, images), reference_logits, atol=0, rtol=0)


def test_old_config_without_image_token_generates(opt_ckpt_old, opt_ckpt, images):
    """If this fails, checkpoints published before transformers 4.47 cannot caption (transformers 5 cannot)."""
    old = blip2.load(opt_ckpt_old, dtype="fp32").caption(images["rgb"], max_new_tokens=8)
    new = blip2.load(opt_ckpt, dtype="fp32").caption(images["rgb"], max_new_tokens=8)
    assert old == new


def _copy_with_state(src, dst, edit):
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_and_unexpected_keys_are_listed(opt_ckpt, tmp_path):
    """If this fails, a wrong checkpoint loads silently with random weights (LAVIS' strict=False bug)."""

    def edit(state):
        state.pop("qformer.layernorm.weight")
        state["qformer.extra.weight"] = torch.zeros(2)

    folder = _copy_with_state(opt_ckpt, tmp_path / "broken", edit)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert "missing keys: qformer.layernorm.weight" in str(e.value)
    assert "unexpected keys: qformer.extra.weight" in str(e.value)
    assert str(folder) in str(e.value)


def test_shape_mismatch_is_reported(opt_ckpt, tmp_path):
    """If this fails, a checkpoint for another architecture crashes deep inside torch instead of saying why."""
    folder = _copy_with_state(opt_ckpt, tmp_path / "shape", lambda s: s.update(query_tokens=torch.zeros(1, 3, 32)))
    with pytest.raises(CheckpointError, match=r"query_tokens: checkpoint \(1, 3, 32\)"):
        load_model(folder)


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: (f / "model.safetensors").write_bytes(b"not a safetensors file"),
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
        lambda f: (f / "model.safetensors").unlink(),
        lambda f: (f / "config.json").write_text("{broken"),
        lambda f: (f / "config.json").write_text('{"model_type": "bert"}'),
    ],
    ids=["garbage", "truncated", "no-weights", "bad-json", "not-blip2"],
)
def test_damaged_checkpoint_gives_one_clear_error(opt_ckpt, tmp_path, damage):
    """If this fails, a broken download gives a traceback from deep inside safetensors or json."""
    folder = tmp_path / "ckpt"
    shutil.copytree(opt_ckpt, folder)
    damage(folder)
    with pytest.raises((CheckpointError, ConfigError)) as e:
        blip2.load(folder, dtype="fp32")
    assert str(folder) in str(e.value)


def test_missing_shard_is_named(opt_ckpt_sharded, tmp_path):
    """If this fails, an interrupted sharded download loads partially or fails obscurely."""
    folder = tmp_path / "sharded"
    shutil.copytree(opt_ckpt_sharded, folder)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(folder)


def test_offline_hub_miss_names_model_and_remedy(monkeypatch, tmp_path):
    """If this fails, an offline user gets a network traceback instead of 'download it first'."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        blip2.load("Salesforce/blip2-opt-2.7b")
    msg = str(e.value)
    assert "Salesforce/blip2-opt-2.7b" in msg and "hf download" in msg and "\n" not in msg


def test_not_a_folder_or_hub_id(tmp_path):
    """If this fails, a typo in a local path triggers a Hub lookup."""
    with pytest.raises(CheckpointError, match="no such folder"):
        blip2.load(str(tmp_path / "nope" / "deeper"))


def test_saved_model_loads_in_transformers_and_here(opt_ckpt, tmp_path, images):
    """If this fails, a model we save cannot be used with transformers (or with us) again."""
    m, _ = load_model(opt_ckpt)
    out = save_model(m, tmp_path / "saved", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").is_file()
    for name in ["tokenizer.json", "tokenizer_config.json", "processor_config.json", "generation_config.json"]:
        shutil.copy(opt_ckpt / name, out / name)
    ours = blip2.load(out, dtype="fp32").caption(images["rgb"], max_new_tokens=8)
    assert ours == blip2.load(opt_ckpt, dtype="fp32").caption(images["rgb"], max_new_tokens=8)
    ref = Blip2ForConditionalGeneration.from_pretrained(out)
    original = Blip2ForConditionalGeneration.from_pretrained(opt_ckpt)
    for (k, a), (_, b) in zip(ref.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), k


def test_saving_again_into_a_folder_replaces_its_shards(opt_ckpt, tmp_path):
    """If this fails, a single-file save over a sharded one leaves the old index behind, and loading reads the old
    shards instead of the new file."""
    m, _ = load_model(opt_ckpt)
    folder = save_model(m, tmp_path / "saved", max_shard_bytes=100_000)
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        m.query_tokens.add_(1.0)
    save_model(m, folder)
    assert sorted(f.name for f in folder.glob("model*")) == ["model.safetensors"]
    again, _ = load_model(folder)
    assert torch.equal(again.query_tokens, m.query_tokens)
    with safe_open(folder / "model.safetensors", framework="pt") as st:
        assert st.metadata() == {"format": "pt"}  # as transformers writes it


def _to_lavis(state: dict) -> dict:
    """The inverse of the LAVIS->HF map, written independently here so the test can fail."""
    out = {}
    for k, v in state.items():
        if k.endswith("self_attn.qkv.bias"):
            i = k.split(".")[3]
            d = v.shape[0] // 3
            out[f"visual_encoder.blocks.{i}.attn.q_bias"] = v[:d]
            out[f"visual_encoder.blocks.{i}.attn.v_bias"] = v[2 * d :]
            continue
        k2 = (
            k.replace("vision_model.embeddings.class_embedding", "visual_encoder.cls_token")
            .replace("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed")
            .replace("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj.")
            .replace("vision_model.encoder.layers.", "visual_encoder.blocks.")
            .replace(".layer_norm1.", ".norm1.")
            .replace(".layer_norm2.", ".norm2.")
            .replace(".self_attn.qkv.", ".attn.qkv.")
            .replace(".self_attn.projection.", ".attn.proj.")
            .replace("vision_model.post_layernorm.", "ln_vision.")
            .replace("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm.")
            .replace(".attention.attention.", ".attention.self.")
            .replace(".crossattention.attention.", ".crossattention.self.")
            .replace("qformer.", "Qformer.bert.")
            .replace("language_projection.", "opt_proj.")
            .replace("language_model.", "opt_model.")
        )
        out[k2] = v
    out["temp"] = torch.tensor(0.07)
    return out


def test_lavis_state_dict_loads_through_one_map(opt_ckpt, tmp_path):
    """If this fails, LAVIS `blip2_opt` checkpoints cannot be used."""
    state = load_file(opt_ckpt / "model.safetensors")
    lavis = _to_lavis(state)
    assert lavis_to_hf(lavis).keys() == state.keys()  # `temp` dropped, q/v biases fused, everything renamed
    folder = tmp_path / "lavis"
    folder.mkdir()
    for f in opt_ckpt.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    torch.save({"model": lavis}, folder / "blip2_opt.pth")
    got = dict(load_model(folder)[0].named_parameters())
    want = dict(load_model(opt_ckpt)[0].named_parameters())
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key.endswith("self_attn.qkv.bias"):  # LAVIS has no k-bias: the fused bias holds zeros there
            d = value.shape[0] // 3
            value = torch.cat([value[:d], torch.zeros(d), value[2 * d :]])
        assert torch.equal(got[key], value), key


def test_unfused_vision_biases_are_fused():
    """If this fails, HF checkpoints converted with separate q/v biases load with a wrong k-bias."""
    q, v = torch.ones(4), torch.full((4,), 2.0)
    state = hf_keys(
        {"vision_model.encoder.layers.0.self_attn.q_bias": q, "vision_model.encoder.layers.0.self_attn.v_bias": v}
    )
    assert torch.equal(state["vision_model.encoder.layers.0.self_attn.qkv.bias"], torch.cat([q, torch.zeros(4), v]))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_qformer_dtype_follows_the_reference(opt_ckpt, images, dtype):
    """If this fails, half-precision inference drifts from transformers', which keeps the Q-Former and its queries
    in fp32 under fp16 only (we once kept it fp32 in bf16 too: 0.22 off the reference's logits on the tiny model)."""
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    ref = Blip2ForConditionalGeneration.from_pretrained(opt_ckpt, dtype=torch_dtype)
    m = blip2.load(opt_ckpt, dtype=dtype)
    assert m.model.query_tokens.dtype == ref.query_tokens.dtype
    assert {p.dtype for p in m.model.qformer.parameters()} == {p.dtype for p in ref.qformer.parameters()}
    assert m.model.vision_model.embeddings.patch_embedding.weight.dtype == torch_dtype
    assert m.model.language_model.get_input_embeddings().weight.dtype == torch_dtype
    if dtype == "bf16":  # fp16 matmuls on a CPU are too slow to caption with here
        assert isinstance(m.caption(images["rgb"], max_new_tokens=4), str)


def test_dtype_auto_and_bad_dtype():
    """If this fails, dtype='auto' picks a type the device cannot run fast, or a typo passes silently."""
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) in (torch.bfloat16, torch.float32)
    with pytest.raises(ConfigError, match="int3"):
        resolve_dtype("int3", torch.device("cpu"))


def test_config_round_trip_keeps_unknown_keys(opt_ckpt):
    """If this fails, saving a model drops config fields transformers needs."""
    raw = json.loads((opt_ckpt / "config.json").read_text())
    cfg = Blip2Config.from_dict(raw)
    again = cfg.to_dict()
    assert again["image_token_index"] == raw["image_token_index"]
    assert again["text_config"]["eos_token_id"] == raw["text_config"]["eos_token_id"]
    assert again["num_query_tokens"] == raw["num_query_tokens"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="page-fault counts: Linux")
def test_after_loading_freed_activations_are_reused_not_faulted_in_again():
    """If this fails, every activation freed during inference goes back to the system and is faulted in again at
    the next layer (glibc with fixed thresholds trims at 128 KB): millions of page faults and seconds of system
    time per batch on a CPU."""
    import resource

    from blip2.checkpoint.loading import freed_memory_returned, glibc_mallopt

    if glibc_mallopt() is None:
        pytest.skip("not glibc")

    with freed_memory_returned():
        pass

    def faults_of_an_activation() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(100 << 18)  # 100 MB, touched
        del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_an_activation()
    # fresh pages each time (an mmap per activation) would be 25,600 faults every time; other tests' threads may
    # grow the heap meanwhile, so the best of three reuses is bounded, at half of that
    assert min(faults_of_an_activation() for _ in range(3)) < 12800
