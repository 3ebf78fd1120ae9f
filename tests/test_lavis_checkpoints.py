"""LAVIS `.pth` files as LAVIS' runner saves them (trained parameters only), loaded over a base checkpoint.

Each file is written here the way `RunnerBase._save_checkpoint` writes it: `{"model": state_dict without the
parameters that had requires_grad=False, "config": the run config, "optimizer": ..., "scaler": None, "epoch": n}`,
with LAVIS' key names (renamed by a map written independently of blip2's own).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import blip2
from blip2.checkpoint import load_model, save_model
from blip2.errors import CheckpointError

FROZEN = ("vision_model.embeddings.", "vision_model.encoder.", "language_model.")


def _lavis_name(key: str, lm: str) -> str:
    """HF name -> LAVIS name (`lm`: the LAVIS prefix of the LM and its projection: opt, t5, llm)."""
    for hf, lavis in [
        ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
        ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
        ("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj."),
        ("vision_model.encoder.layers.", "visual_encoder.blocks."),
        (".layer_norm1.", ".norm1."),
        (".layer_norm2.", ".norm2."),
        (".self_attn.qkv.", ".attn.qkv."),
        (".self_attn.projection.", ".attn.proj."),
        ("vision_model.post_layernorm.", "ln_vision."),
        ("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm."),
        ("qformer.embeddings.layernorm.", "Qformer.bert.embeddings.LayerNorm."),  # InstructBLIP
        ("embeddings.word_embeddings.", "Qformer.bert.embeddings.word_embeddings."),
        ("embeddings.position_embeddings.", "Qformer.bert.embeddings.position_embeddings."),
        (".attention.attention.", ".attention.self."),
        (".crossattention.attention.", ".crossattention.self."),
        ("qformer.", "Qformer.bert."),
        ("vision_projection.", "vision_proj."),
        ("text_projection.", "text_proj."),
        ("language_projection.", f"{lm}_proj."),
        ("language_model.", f"{lm}_model."),
    ]:
        if key.startswith(hf) or (hf.startswith(".") and hf in key):
            key = key.replace(hf, lavis, 1)
    return key


def _trained(state: dict[str, torch.Tensor], with_vit: bool = False) -> dict[str, torch.Tensor]:
    """The parameters a LAVIS run trains: all but the frozen ViT (unless `freeze_vit: False`) and LM."""
    frozen = FROZEN[2:] if with_vit else FROZEN
    return {k: v for k, v in state.items() if not k.startswith(frozen)}


def _save_lavis(
    path: Path, trained: dict[str, torch.Tensor], lm: str, config: dict | None = None, stage1: bool = False
) -> Path:
    """A `.pth` as LAVIS' runner writes it, with its buffers, optimizer state and (when given) config."""
    sd: dict[str, torch.Tensor] = {}
    for key, value in trained.items():
        if key.endswith("self_attn.qkv.bias"):  # LAVIS stores the ViT's q and v biases apart, and no k bias
            d = value.shape[0] // 3
            stem = _lavis_name(key, lm).removesuffix("qkv.bias")
            sd[stem + "q_bias"], sd[stem + "v_bias"] = value[:d], value[2 * d :]
        else:
            sd[_lavis_name(key, lm)] = value
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(64)[None]  # a buffer: state_dict keeps it
    if stage1:  # Blip2Qformer also trains its ITC temperature and the BERT LM head of ITG
        sd["temp"] = torch.tensor(0.07)
        sd["Qformer.cls.predictions.bias"] = torch.zeros(8)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    saved = {"model": sd, "optimizer": opt.state_dict(), "scaler": None, "epoch": 3}
    if config is not None:
        saved["config"] = {"model": config, "run": {"task": "captioning", "lr_sched": "linear_warmup_cosine_lr"}}
    torch.save(saved, path)
    return path


def _tuned(base: Path, with_vit: bool = False) -> dict[str, torch.Tensor]:
    """What a LAVIS run trained, with other values than the base's: the base's trainable weights, perturbed."""
    gen = torch.Generator().manual_seed(1)
    trained = _trained(load_file(base / "model.safetensors"), with_vit)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in trained.items()}


def _expected(base: Path, tuned: dict[str, torch.Tensor]):
    """The model a full state dict gives: the base's frozen weights, the tuned ones, LAVIS' eps."""
    m, _ = load_model(base)
    with torch.no_grad():
        for key, p in m.named_parameters():
            if key in tuned:
                p.copy_(tuned[key])
            if key in tuned and key.endswith("self_attn.qkv.bias"):  # no k bias in LAVIS
                d = p.shape[0] // 3
                p[d : 2 * d] = 0
    m.vision_model.post_layernorm.eps = 1e-5
    return m


def _outputs(m) -> list[torch.Tensor]:
    """The image side for every kind, plus LM logits or ITC/ITM outputs."""
    gen = torch.Generator().manual_seed(1)
    px = torch.rand(2, 3, 32, 32, generator=gen)
    ids = torch.randint(3, 40, (2, 5), generator=gen)
    instruction = {"instruction_ids": ids} if m.config.is_instruct else {}
    with torch.no_grad():
        feats = m.encode_image(px)
        out = [feats, m.query_output(feats, **instruction)]
        if m.language_model is not None:
            dec = ids[:, :3] if m.is_encoder_decoder else None
            out.append(m(ids, pixel_values=px, decoder_input_ids=dec, **instruction).logits)
        else:
            out += [m.image_embeddings(feats), m.text_embeddings(ids), m.itm_logits(feats, ids)]
    return out


KINDS = {  # kind: (base fixture, LAVIS prefix, LAVIS config of the run, stage 1)
    "blip2_opt": ("opt_ckpt", "opt", {"arch": "blip2_opt", "model_type": "pretrain_opt2.7b"}, False),
    "blip2_t5": ("t5_ckpt", "t5", {"arch": "blip2_t5", "model_type": "pretrain_flant5xl"}, False),
    "blip2": ("itm_ckpt", "opt", {"arch": "blip2", "model_type": "pretrain"}, True),
    "blip2_t5_instruct": ("instruct_t5_ckpt", "t5", {"arch": "blip2_t5_instruct", "model_type": "flant5xl"}, False),
}


@pytest.fixture(scope="module")
def instruct_t5_ckpt(tmp_path_factory) -> Path:
    from instruct_checkpoints import make_instruct_t5_checkpoint

    return make_instruct_t5_checkpoint(tmp_path_factory.mktemp("instruct_t5"))


@pytest.mark.parametrize("kind", list(KINDS))
def test_trained_only_file_loads_over_its_base(kind, request, tmp_path):
    """If this fails, the .pth files LAVIS writes (no ViT, no LM) cannot be used, or load other weights than a full
    state dict would give."""
    base_name, lm, config, stage1 = KINDS[kind]
    base = request.getfixturevalue(base_name)
    tuned = _tuned(base)
    pth = _save_lavis(tmp_path / "checkpoint_best.pth", tuned, lm, config, stage1)
    got, folder = load_model(pth, base=base)
    assert folder == base  # the tokenizer and preprocessing are the base's
    for a, b in zip(_outputs(got), _outputs(_expected(base, tuned)), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_trained_vit_in_the_file_replaces_the_base_one(opt_ckpt, tmp_path):
    """If this fails, a model fine-tuned with `freeze_vit: False` (LAVIS' COCO captioning) runs the base's ViT."""
    tuned = _tuned(opt_ckpt, with_vit=True)
    pth = _save_lavis(tmp_path / "ft.pth", tuned, "opt")
    got, _ = load_model(pth, base=opt_ckpt)
    for a, b in zip(_outputs(got), _outputs(_expected(opt_ckpt, tuned)), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_ln_vision_keeps_lavis_eps_and_a_saved_copy_reloads_the_same(opt_ckpt, tmp_path, images):
    """If this fails, LAVIS models run their `ln_vision` with the HF eps (1e-6, not LAVIS' 1e-5), or lose it when
    saved in the HF layout and reloaded."""
    pth = _save_lavis(tmp_path / "ft.pth", _tuned(opt_ckpt), "opt")
    m = blip2.load(pth, base=opt_ckpt, dtype="fp32")
    vision = m.model.vision_model
    assert vision.post_layernorm.eps == 1e-5
    assert vision.encoder.layers[0].layer_norm1.eps == 1e-6  # the ViT blocks keep EVA's eps
    out = save_model(m.model, tmp_path / "saved")
    for f in opt_ckpt.iterdir():  # tokenizer and preprocessing
        if not (f.suffix == ".safetensors" or f.name == "config.json"):
            shutil.copy(f, out / f.name)
    assert json.loads((out / "config.json").read_text())["vision_config"]["post_layernorm_eps"] == 1e-5
    again = blip2.load(out, dtype="fp32")
    assert again.model.vision_model.post_layernorm.eps == 1e-5
    assert again.caption(images["rgb"], max_new_tokens=8) == m.caption(images["rgb"], max_new_tokens=8)


def test_base_is_found_from_the_lavis_model_type(opt_ckpt, tmp_path, monkeypatch):
    """If this fails, a LAVIS file whose config names `blip2_opt/pretrain_opt2.7b` still needs --base although
    Salesforce/blip2-opt-2.7b is in the Hugging Face cache."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--Salesforce--blip2-opt-2.7b"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(opt_ckpt, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tuned = _tuned(opt_ckpt)
    pth = _save_lavis(tmp_path / "ft.pth", tuned, "opt", KINDS["blip2_opt"][2])
    got, folder = load_model(pth)
    assert folder == repo / "snapshots" / commit
    torch.testing.assert_close(_outputs(got)[-1], _outputs(_expected(opt_ckpt, tuned))[-1], atol=0, rtol=0)


def test_missing_base_names_the_repo_to_download(opt_ckpt, tmp_path):
    """If this fails, a user with a LAVIS file and no base on disk gets no hint of which checkpoint to fetch."""
    pth = _save_lavis(
        tmp_path / "ft.pth",
        _trained(load_file(opt_ckpt / "model.safetensors")),
        "t5",
        {"arch": "blip2_t5", "model_type": "caption_coco_flant5xl"},
    )
    with pytest.raises(CheckpointError, match=r"ft\.pth.*Salesforce/blip2-flan-t5-xl-coco.*--base"):
        load_model(pth)


def test_file_without_model_type_asks_for_a_base(opt_ckpt, tmp_path):
    """If this fails, a LAVIS file saved without a config fails with an unhelpful error (or a guessed base)."""
    pth = _save_lavis(tmp_path / "ft.pth", _trained(load_file(opt_ckpt / "model.safetensors")), "opt")
    with pytest.raises(CheckpointError, match=r"ft\.pth.*no model type.*base="):
        load_model(pth)


def test_trained_weights_missing_from_the_file_are_listed(opt_ckpt, tmp_path):
    """If this fails, a LAVIS file without its Q-Former or projection loads the base's in their place, silently."""
    trained = _trained(load_file(opt_ckpt / "model.safetensors"))
    del trained["language_projection.weight"], trained["qformer.encoder.layer.1.output_query.dense.bias"]
    pth = _save_lavis(tmp_path / "ft.pth", trained, "opt")
    with pytest.raises(CheckpointError) as e:
        load_model(pth, base=opt_ckpt)
    assert "ft.pth" in str(e.value)
    assert "2 trained weights" in str(e.value)
    assert "language_projection.weight" in str(e.value)
    assert "qformer.encoder.layer.1.output_query.dense.bias" in str(e.value)


def test_a_key_in_neither_source_is_listed(opt_ckpt, tmp_path):
    """If this fails, a base that lacks some frozen LM weight leaves it random (on the meta device) unnoticed."""
    base = tmp_path / "base"
    shutil.copytree(opt_ckpt, base)
    state = load_file(base / "model.safetensors")
    del state["language_model.model.decoder.layers.1.fc2.weight"]
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    pth = _save_lavis(tmp_path / "ft.pth", _trained(state), "opt")
    with pytest.raises(CheckpointError, match=r"ft\.pth.*1 missing keys: language_model\.model\.decoder\.layers\.1"):
        load_model(pth, base=base)


def test_file_of_another_lm_than_the_base_is_refused(t5_ckpt, opt_ckpt, itm_ckpt, tmp_path):
    """If this fails, a blip2_t5 file over an OPT base (or a stage-1 file over a captioning base) loads if the
    shapes happen to agree, and produces nonsense."""
    t5_file = _save_lavis(tmp_path / "t5.pth", _trained(load_file(t5_ckpt / "model.safetensors")), "t5")
    with pytest.raises(CheckpointError, match=r"t5\.pth.*t5_proj.*t5 language model.*opt"):
        load_model(t5_file, base=opt_ckpt)
    stage1 = _save_lavis(tmp_path / "s1.pth", _trained(load_file(itm_ckpt / "model.safetensors")), "opt", stage1=True)
    with pytest.raises(CheckpointError, match=r"s1\.pth.*stage-1.*language model \(opt\)"):
        load_model(stage1, base=opt_ckpt)


@pytest.mark.parametrize(
    "content",
    [b"not a pickle at all", b"PK\x03\x04 truncated zip"],
    ids=["garbage", "truncated"],
)
def test_corrupt_file_is_named(content, opt_ckpt, tmp_path):
    """If this fails, a damaged download gives an unpickling traceback instead of the file's name."""
    pth = tmp_path / "broken.pth"
    pth.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"broken\.pth: cannot read weights"):
        load_model(pth, base=opt_ckpt)


def test_pth_of_something_else_is_named(opt_ckpt, tmp_path):
    """If this fails, a .pth holding no state dict (a list, a dict of numbers) fails deep in loading, unnamed."""
    pth = tmp_path / "other.pth"
    torch.save({"model": {"step": 3}}, pth)
    with pytest.raises(CheckpointError, match=r"other\.pth: expected a state dict of tensors; 'step'"):
        load_model(pth, base=opt_ckpt)
    torch.save([torch.zeros(1)], pth)
    with pytest.raises(CheckpointError, match=r"other\.pth: expected a state dict, got list"):
        load_model(pth, base=opt_ckpt)


def test_base_with_a_checkpoint_folder_is_refused(opt_ckpt):
    """If this fails, `--base` given with an HF folder is silently ignored."""
    with pytest.raises(CheckpointError, match="--base"):
        load_model(opt_ckpt, base=opt_ckpt)


def test_every_lavis_model_type_has_a_base_or_a_reason():
    """If this fails, a LAVIS BLIP-2 model type has neither an HF base nor a message saying none exists."""
    from blip2.checkpoint.lavis import BASE_OF_MODEL_TYPE, NO_HF_BASE

    lavis_types = {  # PRETRAINED_MODEL_CONFIG_DICT keys of lavis/models/blip2_models/*.py
        "blip2_opt": ["pretrain_opt2.7b", "pretrain_opt6.7b", "caption_coco_opt2.7b", "caption_coco_opt6.7b"],
        "blip2_t5": ["pretrain_flant5xl", "pretrain_flant5xl_vitL", "pretrain_flant5xxl", "caption_coco_flant5xl"],
        "blip2": ["pretrain", "pretrain_vitL", "coco"],
        "blip2_t5_instruct": ["flant5xl", "flant5xxl"],
        "blip2_vicuna_instruct": ["vicuna7b", "vicuna13b"],
    }
    for arch, types in lavis_types.items():
        for t in types:
            assert (t in BASE_OF_MODEL_TYPE) != (t in NO_HF_BASE), f"{arch}/{t}"


# ---- the command line: --base ----------------------------------------------------------------------------------------
def _cli(*args: object):
    from click.testing import CliRunner

    from blip2.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_base_gives_the_api_captions(opt_ckpt, tmp_path, images):
    """If this fails, `blip2 caption -m ft.pth --base ...` prints other captions than `blip2.load(ft.pth, base=...)`,
    or ignores --base."""
    pth = _save_lavis(tmp_path / "ft.pth", _tuned(opt_ckpt), "opt")
    want = blip2.load(pth, base=opt_ckpt, dtype="fp32").caption(images["rgb"], max_new_tokens=6)
    result = _cli("caption", "-m", pth, "--base", opt_ckpt, "--dtype", "fp32", "--max-new-tokens", 6, images["rgb"])
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n").split("\t", 1)[1] == want.replace("\n", " ")


def test_cli_batch_with_base_writes_the_api_captions(opt_ckpt, tmp_path, images):
    """If this fails, --base is lost on the way to the batch engine (a folder input), which then cannot load the
    file or uses another base."""
    pth = _save_lavis(tmp_path / "ft.pth", _tuned(opt_ckpt), "opt")
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(images["rgb"], folder / "a.png")
    want = blip2.load(pth, base=opt_ckpt, dtype="fp32").caption(folder / "a.png", max_new_tokens=6)
    out = tmp_path / "out.jsonl"
    args = ("caption", "-m", pth, "--base", opt_ckpt, "--dtype", "fp32", "--max-new-tokens", 6, "--out", out, folder)
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["caption"] for r in rows] == [want]


def test_cli_base_with_a_folder_model_is_refused(opt_ckpt, images):
    """If this fails, `--base` next to an HF checkpoint folder is silently ignored."""
    result = _cli("caption", "-m", opt_ckpt, "--base", opt_ckpt, images["rgb"])
    assert result.exit_code == 2
    assert "--base" in result.stderr and "Traceback" not in result.output


def test_checkpoint_with_base_survives_pickling(opt_ckpt, tmp_path):
    """If this fails, Ray actors (which receive the model name pickled) load a LAVIS file without its base."""
    import pickle

    from blip2.checkpoint.lavis import LavisCheckpoint

    ref = pickle.loads(pickle.dumps(LavisCheckpoint(tmp_path / "ft.pth", opt_ckpt)))
    assert (str(ref), ref.base) == (str(tmp_path / "ft.pth"), str(opt_ckpt))


def test_a_batch_run_on_another_base_is_refused_not_mixed(opt_ckpt, tmp_path, images):
    """If this fails, resuming `blip2 caption --model ft.pth --base A` with `--base B` appends B's captions to A's
    in the same manifest (the same .pth over another base captions otherwise), instead of refusing."""
    from blip2.batch import caption_images
    from blip2.checkpoint.lavis import LavisCheckpoint
    from blip2.errors import ConfigError

    pth = _save_lavis(tmp_path / "ft.pth", _tuned(opt_ckpt), "opt", KINDS["blip2_opt"][2])
    other = shutil.copytree(opt_ckpt, tmp_path / "other-base")
    (tmp_path / "in").mkdir()
    shutil.copy(images["rgb"], tmp_path / "in" / "a.png")
    out = tmp_path / "captions.jsonl"
    done = list(caption_images([tmp_path / "in"], model=LavisCheckpoint(pth, opt_ckpt), out=[out], workers=0))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.status for r in done] == ["done"] and rows[0]["base"] == str(opt_ckpt.resolve())
    with pytest.raises(ConfigError, match="progress"):
        list(caption_images([tmp_path / "in"], model=LavisCheckpoint(pth, other), out=[out], workers=0))
    assert out.read_text().count("\n") == 1  # nothing appended
