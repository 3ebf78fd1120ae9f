"""The trainable wrappers around `Blip2Model`: stage 1 (ITC + ITM + ITG) and stage 2 (generative, any LM).

    Stage1Model(blip)  blip: retrieval layout (vision, queries, Q-Former with text side, projections, itm_head)
                       + itg_head (BERT's `cls.predictions`, decoder tied to the word embeddings) + temp (ITC)
    Stage2Model(blip)  blip: generation layout (vision, queries, Q-Former, language_projection, any HF LM)

Both freeze the image encoder and the LM with `requires_grad_(False)` and keep them in eval mode whatever
`train()` is called with (no dropout in a frozen tower; its statistics never change). The model code stays free of
training concerns: the ITG head and the temperature live here and are saved next to, not inside, the HF layout
(`itg_head.safetensors`), so `Blip2ForImageTextRetrieval.from_pretrained` loads a stage-1 export without
unexpected keys.

Any image tower works for stage 1: our EVA ViT, or any module returning (B, N, D) features wrapped in
`VisionAdapter`. Any causal or seq2seq LM that `transformers` builds works for stage 2: `new_stage2` creates the
projection for its width and adds the `<image>` placeholder token the HF layout needs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..adapter import ADAPTER_DIR
from ..backbones import HFVisionTower, build_vision, load_tower
from ..checkpoint import build_empty, iter_tensors, load_model, save_model, weight_files
from ..config import TOWER_TYPES, Blip2Config, QFormerConfig, VisionConfig
from ..errors import CheckpointError, ConfigError
from ..language import head_takes_contiguous_rows
from ..model import Blip2Model
from ..vision import VisionTransformer
from .lora import base_layers, has_lora, save_adapter, train_adapters_only
from .losses import itc_loss, itg_inputs, itg_loss, itm_loss, itm_triplets, sample_hard_negatives

ITG_HEAD_FILE = "itg_head.safetensors"
VISION_CONFIG_FILE = "vision_config.json"
VISION_WEIGHTS_FILE = "vision_model.safetensors"
IMAGE_TOKEN = "<image>"
INIT_STD = 0.02  # BERT's initializer_range


@dataclass
class TrainOutput:
    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # the separate losses, for logging


# ---- vision towers ------------------------------------------------------------------------------------------------
class VisionAdapter(nn.Module):
    """Any image tower as a BLIP-2 image encoder: pixel_values (B, 3, S, S) -> features (B, N, width).

    `features(tower, pixel_values)` extracts the token features, e.g. for a `transformers` CLIP vision model
    `lambda m, x: m(pixel_values=x).last_hidden_state`; by default the tower is called directly.
    """

    def __init__(
        self,
        tower: nn.Module,
        width: int,
        image_size: int = 224,
        features: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.tower = tower
        self.width = width
        self.image_size = image_size
        self.features = features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.tower(pixel_values) if self.features is None else self.features(self.tower, pixel_values)
        if out.ndim != 3 or out.shape[-1] != self.width:
            raise ValueError(f"vision tower must return (B, N, {self.width}) features, got {tuple(out.shape)}")
        return out


def vision_width(vision: nn.Module) -> int:
    if isinstance(vision, (VisionTransformer, HFVisionTower)):
        return vision.config.hidden_size
    if isinstance(vision, VisionAdapter):
        return vision.width
    raise ConfigError(f"image encoder must be a VisionTransformer or a VisionAdapter, got {type(vision).__name__}")


def save_vision(vision: VisionTransformer, folder: str | Path) -> Path:
    """Write a stand-alone image encoder (`vision_config.json` + `vision_model.safetensors`) for `load_vision`."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / VISION_CONFIG_FILE).write_text(json.dumps(asdict(vision.config), indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in vision.state_dict().items()}
    save_file(state, folder / VISION_WEIGHTS_FILE, metadata={"format": "pt"})
    return folder


def load_vision(spec: str | Path | dict) -> VisionTransformer | HFVisionTower:
    """The image encoder of a BLIP-2 checkpoint (its `vision_model.*` weights), one written by `save_vision`, or a
    `transformers` tower (backbones.py): a CLIP / SigLIP / DINOv2 folder or Hub id, or a config dict (random)."""
    if isinstance(spec, dict):
        return load_tower(spec)
    path = Path(spec)
    if _tower_folder(path) or (not path.exists() and str(spec).count("/") == 1):
        return load_tower(spec)
    if (path / VISION_CONFIG_FILE).is_file():
        cfg = VisionConfig(**json.loads((path / VISION_CONFIG_FILE).read_text()))
        files, prefix = [path / VISION_WEIGHTS_FILE], ""
    elif (path / "config.json").is_file():
        cfg = Blip2Config.from_json_file(path / "config.json").vision_config
        files, prefix = weight_files(path), "vision_model."
    else:
        raise CheckpointError(f"{path}: neither a BLIP-2 checkpoint (config.json) nor an image encoder folder")
    vit = build_vision(cfg)
    state = {k[len(prefix) :]: v for k, v in iter_tensors(files) if k.startswith(prefix)}
    try:
        vit.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: image encoder weights do not fit its config ({e})") from e
    return vit.eval()


def _tower_folder(path: Path) -> bool:
    """A folder of a `transformers` image tower (or a CLIP / SigLIP dual encoder), not a BLIP-2 checkpoint."""
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return model_type in (*TOWER_TYPES, "clip", "siglip")


# ---- initialisation -----------------------------------------------------------------------------------------------
@torch.no_grad()
def init_bert_weights(module: nn.Module) -> None:
    """BERT's initialisation (LAVIS' Q-Former from scratch): N(0, 0.02) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.normal_(0.0, INIT_STD)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()


def _assemble(cfg: Blip2Config, vision: nn.Module, language_model: nn.Module | None = None) -> Blip2Model:
    """A `Blip2Model` for `cfg` that uses the given towers: nothing is allocated twice (the rest is built on the
    meta device, then materialised empty for the caller to initialise or load)."""
    blip = build_empty(cfg)
    blip.vision_model = vision
    if language_model is not None:
        head_takes_contiguous_rows(language_model)  # as for a loaded model: generation during training is fast too
        blip.language_model = language_model
    for name, child in blip.named_children():
        if name not in ("vision_model", "language_model"):
            child.to_empty(device="cpu")
    blip.query_tokens = nn.Parameter(torch.empty(blip.query_tokens.shape))
    return blip


def _freeze(module: nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


class _FrozenTowers(nn.Module):
    """Keeps frozen sub-modules in eval mode: `train()` only switches what is trained."""

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in self.blip.children() if not any(p.requires_grad for p in m.parameters())]

    def train(self, mode: bool = True) -> _FrozenTowers:
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        if has_lora(self):
            train_adapters_only(self.blip.language_model, mode)
        return self

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv); without autograd when the tower is frozen (no activations kept for it)."""
        trainable = any(p.requires_grad for p in self.blip.vision_model.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            return self.blip.encode_image(pixel_values)


# ---- stage 1 ------------------------------------------------------------------------------------------------------
class ItgHead(nn.Module):
    """BERT's `cls.predictions`: dense + activation + LayerNorm, then the word embeddings (tied) and a bias."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = ACT2FN[cfg.hidden_act]
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, T, D) text rows -> (B, T, V) logits."""
        return F.linear(self.LayerNorm(self.act(self.dense(hidden))), word_embeddings, self.bias)


# names in the head file follow BERT / LAVIS (`Qformer.cls.predictions.*`), so a LAVIS head maps one to one
_HEAD_NAMES = {
    "cls.predictions.transform.dense.weight": "dense.weight",
    "cls.predictions.transform.dense.bias": "dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias": "LayerNorm.bias",
    "cls.predictions.bias": "bias",
}


class Stage1Model(_FrozenTowers):
    """Q-Former pretraining: ITC + ITM + ITG, summed with `weights` (a weight of 0 skips that loss)."""

    def __init__(
        self,
        blip: Blip2Model,
        dec_token_id: int,
        pad_token_id: int,
        weights: Mapping[str, float] | None = None,
        gather_with_grad: bool = False,
        head: ItgHead | None = None,
        temp: float = 0.07,
    ) -> None:
        super().__init__()
        if not blip.config.has_text_side or not hasattr(blip, "itm_head"):
            raise ConfigError("stage 1 needs the retrieval layout (Q-Former text side, projections, itm_head)")
        if dec_token_id is None or pad_token_id is None:
            raise ConfigError("the Q-Former tokenizer needs a pad token and `[DEC]` as bos_token (as LAVIS adds it)")
        self.blip = blip
        self.itg_head = head if head is not None else _new_head(blip.config.qformer_config)
        self.temp = nn.Parameter(torch.tensor(float(temp)))  # learnable ITC temperature, LAVIS' init 0.07
        self.dec_token_id, self.pad_token_id = dec_token_id, pad_token_id
        self.weights = {"itc": 1.0, "itm": 1.0, "itg": 1.0, **(weights or {})}
        unknown = set(self.weights) - {"itc", "itm", "itg"}
        if unknown:
            raise ConfigError(f"unknown stage-1 loss names {sorted(unknown)}; use itc, itm, itg")
        self.gather_with_grad = gather_with_grad
        blip.requires_grad_(True)
        _freeze(blip.vision_model)

    def itg_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ITG pass: (logits (B, T, V), labels (B, T), query outputs (B, Nq, D)).

        One causal pass over `[queries; [DEC] text]`: text rows see the queries and earlier text; query rows never
        see text, so they are exactly the queries-only pass that LAVIS runs first and reuses as ITG's cache.
        """
        blip = self.blip
        n = blip.config.num_query_tokens
        queries = blip.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, Nq, D)
        dec_ids, labels = itg_inputs(input_ids, self.dec_token_id, self.pad_token_id)
        embeds = torch.cat([queries, blip.embeddings(dec_ids).to(queries.dtype)], dim=1)
        h = blip.qformer(embeds, n, attention_mask, image_embeds, causal=True)  # (B, Nq + T, D)
        logits = self.itg_head(h[:, n:], blip.embeddings.word_embeddings.weight)  # (B, T, V)
        return logits, labels, h[:, :n]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TrainOutput:
        """Images (B, 3, S, S) and their Q-Former-tokenised texts (B, T) -> the summed loss and its parts."""
        blip, w = self.blip, self.weights
        image_embeds = self.encode_image(pixel_values)  # (B, N, Dv)
        parts: dict[str, torch.Tensor] = {}
        if w["itg"]:
            logits, labels, query_out = self.itg_logits(image_embeds, input_ids, attention_mask)
            parts["itg"] = itg_loss(logits, labels)
        else:
            query_out = blip.query_output(image_embeds)
        image_feats = F.normalize(blip.vision_projection(query_out), dim=-1)  # (B, Nq, E)
        text_feats = blip.text_embeddings(input_ids, attention_mask)  # (B, E): text-only mode, CLS
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)  # BLIP's bounds: keeps a from-scratch run from a negative temperature
        itc = itc_loss(image_feats, text_feats, self.temp, gather_with_grad=self.gather_with_grad)
        if w["itc"]:
            parts["itc"] = itc.loss
        if w["itm"]:
            neg_text, neg_image = sample_hard_negatives(itc.sim_i2t, itc.sim_t2i)
            images, ids, mask = itm_triplets(image_embeds, input_ids, attention_mask, neg_text, neg_image)
            parts["itm"] = itm_loss(blip.itm_logits(images, ids, mask))  # bidirectional mode
        loss = sum(w[k] * v for k, v in parts.items())
        return TrainOutput(loss=loss, parts=parts)


def _new_head(cfg: QFormerConfig) -> ItgHead:
    head = ItgHead(cfg)
    init_bert_weights(head)
    return head


def new_stage1(
    vision: nn.Module,
    tokenizer,
    qformer: QFormerConfig | None = None,
    num_query_tokens: int = 32,
    embed_dim: int = 256,
    **kwargs,
) -> Stage1Model:
    """A stage-1 model with a fresh Q-Former (BERT init) over `vision` (frozen), for a BERT tokenizer with `[DEC]`.

    `vision`: a `VisionTransformer` (exportable in the HF layout) or a `VisionAdapter` around any tower.
    """
    width = vision_width(vision)
    qcfg = replace(
        qformer or QFormerConfig(),
        use_qformer_text_input=True,
        encoder_hidden_size=width,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    if isinstance(vision, (VisionTransformer, HFVisionTower)):
        vcfg = vision.config
    else:  # only the width and size are real; the HF layout cannot hold a foreign tower (see export)
        vcfg = VisionConfig(hidden_size=width, image_size=vision.image_size, num_hidden_layers=0)
    cfg = Blip2Config(
        vision_config=vcfg,
        qformer_config=qcfg,
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=embed_dim,
        architecture="Blip2ForImageTextRetrieval",
    )
    blip = _assemble(cfg, vision)
    for name, child in blip.named_children():
        if name != "vision_model":
            init_bert_weights(child)
    with torch.no_grad():
        blip.query_tokens.normal_(0.0, INIT_STD)  # LAVIS: N(0, 0.02)
    return Stage1Model(blip, tokenizer.bos_token_id, tokenizer.pad_token_id, **kwargs)


def load_stage1(folder: str | Path, tokenizer=None, **kwargs) -> Stage1Model:
    """A stage-1 (or blip2-itm) checkpoint to continue training; its ITG head and temperature if saved."""
    from transformers import AutoTokenizer

    blip, folder = load_model(folder)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder)
    head, temp = _new_head(blip.config.qformer_config), 0.07
    if (folder / ITG_HEAD_FILE).is_file():
        state = dict(iter_tensors([folder / ITG_HEAD_FILE]))
        temp = float(state.pop("temp", torch.tensor(temp)))
        head.load_state_dict({_HEAD_NAMES[k]: v for k, v in state.items()}, strict=True)
    return Stage1Model(blip, tokenizer.bos_token_id, tokenizer.pad_token_id, head=head, temp=temp, **kwargs)


# ---- BERT initialisation ------------------------------------------------------------------------------------------
def bert_to_qformer(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a BERT (`BertModel` / `BertForMaskedLM`) state dict onto the stage-1 layout (pure function).

    As LAVIS' `init_Qformer`: the text FFN is also copied into the query FFN; cross-attention, queries and the
    `[DEC]` row stay random; BERT's token-type embeddings have no counterpart (the Q-Former has none).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key.removeprefix("bert.")
        if k.startswith("embeddings.LayerNorm."):
            out["blip.qformer.layernorm." + k.split(".")[-1]] = value
        elif k.startswith(("embeddings.word_embeddings.", "embeddings.position_embeddings.")):
            out["blip." + k] = value
        elif k.startswith("cls.predictions.") and k in _HEAD_NAMES:
            out["itg_head." + _HEAD_NAMES[k]] = value
        elif m := re.match(r"encoder\.layer\.(\d+)\.attention\.self\.(.*)", k):
            out[f"blip.qformer.encoder.layer.{m[1]}.attention.attention.{m[2]}"] = value
        elif m := re.match(r"encoder\.layer\.(\d+)\.(attention\.output\..*)", k):
            out[f"blip.qformer.encoder.layer.{m[1]}.{m[2]}"] = value
        elif m := re.match(r"encoder\.layer\.(\d+)\.(intermediate|output)\.(.*)", k):
            for suffix in ("", "_query"):
                out[f"blip.qformer.encoder.layer.{m[1]}.{m[2]}{suffix}.{m[3]}"] = value
    return out


@torch.no_grad()
def init_from_bert(model: Stage1Model, folder: str | Path) -> list[str]:
    """Copy BERT weights (a `transformers` folder, e.g. bert-base-uncased) into a fresh stage-1 model.

    Embedding tables are copied row by row up to BERT's vocabulary (the Q-Former adds `[DEC]`). Returns the names of
    the parameters that stayed random (cross-attention, queries, projections, heads, layers beyond BERT's depth).
    """
    mapped = bert_to_qformer(dict(iter_tensors(weight_files(Path(folder)))))
    params = dict(model.named_parameters())
    loaded = set()
    for key, value in mapped.items():
        if key not in params:
            continue
        p = params[key]
        if key.endswith(("word_embeddings.weight", "itg_head.bias")) and value.shape[0] <= p.shape[0]:
            p[: value.shape[0]].copy_(value)
        elif value.shape != p.shape:
            raise CheckpointError(f"{folder}: {key} has shape {tuple(value.shape)}, the model {tuple(p.shape)}")
        else:
            p.copy_(value)
        loaded.add(key)
    return sorted(k for k in params if k not in loaded and not k.startswith("blip.vision_model."))


# ---- stage 2 ------------------------------------------------------------------------------------------------------
class Stage2Model(_FrozenTowers):
    """Stage 2 / fine-tuning: the LM loss through the frozen LM; queries, Q-Former and projection are trained."""

    def __init__(self, blip: Blip2Model) -> None:
        super().__init__()
        if blip.language_model is None:
            raise ConfigError("stage 2 needs a checkpoint with a language model")
        self.blip = blip
        blip.requires_grad_(True)
        _freeze(blip.vision_model)
        _freeze(blip.language_model)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> TrainOutput:
        """Causal LM: `labels` align with `input_ids`; seq2seq: `input_ids` feed the encoder, `labels` the decoder."""
        blip = self.blip
        image_embeds = self.encode_image(pixel_values)
        query_out = blip.query_output(image_embeds)  # (B, Nq, Dq), fp32
        prefix = blip.language_projection(query_out.to(blip.language_projection.weight.dtype))  # (B, Nq, d_lm)
        kw = {"decoder_attention_mask": decoder_attention_mask} if blip.is_encoder_decoder else {}
        out = blip(input_ids, attention_mask, prefix=prefix, labels=labels, **kw)
        return TrainOutput(loss=out.loss, parts={"lm": out.loss})


def ensure_image_token(tokenizer, lm: nn.Module) -> int:
    """The id of `<image>`, added to the tokenizer (and the LM's embeddings, if too small) when missing.

    The HF layout marks where the queries go with `image_token_index` ids; they are replaced before the LM sees
    them, so the new embedding row is never read.
    """
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id >= lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(image_id + 1, pad_to_multiple_of=8)
    return image_id


def newline_eos(tokenizer, lm: nn.Module) -> None:
    """Decoder-only LMs learn `caption + "\\n"` (LAVIS' OPT recipe) and stop at the line break, as blip2-opt does."""
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        lm.config.eos_token_id = ids[0]
        lm.generation_config.eos_token_id = ids[0]


def new_stage2(stage1: Blip2Model, lm: nn.Module, tokenizer, fresh_qformer: bool = False) -> Stage2Model:
    """Bridge a stage-1 Q-Former (and its frozen image encoder) to any `transformers` LM.

    The Q-Former keeps its query side only (the stage-2 HF layout has no text FFNs or word embeddings); a new
    `language_projection` maps its width to the LM's. `fresh_qformer` re-initialises queries and Q-Former: the
    "without stage 1" baseline with the same architecture.
    """
    image_id = ensure_image_token(tokenizer, lm)
    if not lm.config.is_encoder_decoder:
        newline_eos(tokenizer, lm)
    qcfg = replace(stage1.config.qformer_config, use_qformer_text_input=False)
    cfg = Blip2Config(
        vision_config=stage1.config.vision_config,
        qformer_config=qcfg,
        text_config=lm.config.to_dict(),
        num_query_tokens=stage1.config.num_query_tokens,
        image_text_hidden_size=stage1.config.image_text_hidden_size,
        image_token_index=image_id,
        architecture="Blip2ForConditionalGeneration",
    )
    blip = _assemble(cfg, stage1.vision_model, lm)
    text_side = re.compile(r"^encoder\.layer\.\d+\.(intermediate|output)\.")
    state = {k: v for k, v in stage1.qformer.state_dict().items() if not text_side.match(k)}
    blip.qformer.load_state_dict(state, strict=True)
    with torch.no_grad():
        blip.query_tokens.copy_(stage1.query_tokens)
        if fresh_qformer:
            init_bert_weights(blip.qformer)
            blip.query_tokens.normal_(0.0, INIT_STD)
    blip.language_projection = nn.Linear(qcfg.hidden_size, lm.config.hidden_size)  # PyTorch's init, as LAVIS
    return Stage2Model(blip)


def load_stage2(folder: str | Path) -> Stage2Model:
    """A stage-2 checkpoint (ours or an official blip2-opt / blip2-flan-t5) to fine-tune."""
    from transformers import GenerationConfig

    blip, folder = load_model(folder)
    if (folder / "generation_config.json").is_file():
        blip.language_model.generation_config = GenerationConfig.from_pretrained(folder)
    return Stage2Model(blip)


# ---- export -------------------------------------------------------------------------------------------------------
def export(model: Stage1Model | Stage2Model, folder: str | Path, tokenizer) -> Path:
    """Write the trained model in the Hugging Face layout: `blip2.load` and `transformers` load the folder.

    Also writes the tokenizer and a `Blip2Processor` configuration (the image encoder's preprocessing, number of
    queries); stage 1 adds `itg_head.safetensors` (the ITG head and the temperature), which `load_stage1` reads
    back; a model with LoRA adapters (`lora.add_lora`) is written with the LM's base weights and its adapters in
    `adapter/`.
    """
    from transformers import Blip2Processor

    blip = model.blip
    if isinstance(blip.vision_model, VisionAdapter):
        raise ConfigError(
            "the HF layout holds the EVA ViT or a transformers tower (backbones.py), not a VisionAdapter; save the "
            "training checkpoint (trainer) or the Q-Former weights yourself"
        )
    folder = Path(folder)
    if isinstance(model, Stage1Model) and IMAGE_TOKEN not in tokenizer.get_vocab():
        # as blip2-itm-vit-g: the processor prepends Nq `<image>` ids, which the HF model slices off again
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if isinstance(model, Stage1Model):
        blip.config.image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if has_lora(model):  # the LM's base weights in the HF layout, the adapters beside them (blip2.adapter)
        with base_layers(blip.language_model):
            save_model(blip, folder)
        save_adapter(model, folder / ADAPTER_DIR)
    else:
        save_model(blip, folder)
    transform = blip.config.image_transform()  # the image encoder's own preprocessing
    transform.save_pretrained(folder)
    image_processor = transform.to_hf()
    Blip2Processor(image_processor, tokenizer, num_query_tokens=blip.config.num_query_tokens).save_pretrained(folder)
    if isinstance(model, Stage1Model):
        from safetensors.torch import save_file

        inverse = {v: k for k, v in _HEAD_NAMES.items()}
        state = {inverse[k]: v.detach().contiguous() for k, v in model.itg_head.state_dict().items()}
        state["temp"] = model.temp.detach().clone()
        save_file(state, folder / ITG_HEAD_FILE, metadata={"format": "pt"})
    else:
        blip.language_model.generation_config.save_pretrained(folder)
    return folder
