"""Configuration dataclasses, read from and written to the Hugging Face `config.json` layout.

Defaults are the published BLIP-2 values (EVA ViT-g/14, BERT-base Q-Former, 32 queries), which are also the
defaults of `transformers`' `Blip2VisionConfig` / `Blip2QFormerConfig`: old hub configs leave most fields out.
The image encoder may instead be a `transformers` tower (CLIP, SigLIP, DINOv2): a `vision_config` whose
`model_type` names one (`TOWER_TYPES`) becomes a `backbones.TowerConfig`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .backbones import TowerConfig
    from .processing import ImageTransform

# InstructBLIP: the same model, whose Q-Former also reads the instruction (its text rows run after the queries).
INSTRUCT_ARCHITECTURE = "InstructBlipForConditionalGeneration"
# `model_type`s of the `transformers` image towers a BLIP-2 can be built on (backbones.py)
TOWER_TYPES = ("clip_vision_model", "siglip_vision_model", "dinov2")
EVA_TYPES = (None, "", "blip_2_vision_model", "instructblip_vision_model")  # our VisionTransformer (vision.py)


def _take(cls: type, raw: dict[str, Any]) -> Any:
    """Build dataclass `cls` from the keys of `raw` it knows; HF configs carry many extra keys we ignore."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass
class VisionConfig:
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39  # EVA ViT-g has 40; BLIP-2 drops the last and uses the second-to-last features
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    post_layernorm_eps: float | None = None  # None: layer_norm_eps; 1e-5 for LAVIS' `ln_vision` (checkpoint/lavis.py)
    qkv_bias: bool = True
    attention_dropout: float = 0.0

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class QFormerConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 2  # cross-attention in layers 0, 2, 4, ...
    encoder_hidden_size: int = 1408  # overwritten from the vision width, as transformers does
    use_qformer_text_input: bool = False  # text FFNs exist (retrieval / stage-1 checkpoints)


def _vision(raw: dict[str, Any]) -> VisionConfig | TowerConfig:
    """EVA's `VisionConfig`, or a `TowerConfig` when `model_type` names a `transformers` tower."""
    if not isinstance(raw, dict):
        raise ConfigError(f"vision_config must be a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type in TOWER_TYPES:
        from .backbones import TowerConfig

        return TowerConfig.from_dict(raw)
    if model_type not in EVA_TYPES:
        raise ConfigError(
            f"vision_config model_type {model_type!r} is neither the EVA ViT of BLIP-2 / InstructBLIP nor one of "
            f"the supported image towers: {', '.join(TOWER_TYPES)}"
        )
    return _take(VisionConfig, raw)


@dataclass
class Blip2Config:
    vision_config: VisionConfig | TowerConfig = field(default_factory=VisionConfig)
    qformer_config: QFormerConfig = field(default_factory=QFormerConfig)
    # The LM's own HF config dict (model_type opt / t5 / llama ...); None for retrieval-only checkpoints.
    text_config: dict[str, Any] | None = None
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256  # width of the ITC embeddings
    image_token_index: int | None = None  # absent in configs written before transformers 4.47
    architecture: str = "Blip2ForConditionalGeneration"
    # Keys of the original config.json that we do not model, written back unchanged on save.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.is_instruct:  # the instruction's rows run through the Q-Former's text FFNs
            self.qformer_config.use_qformer_text_input = True

    @property
    def is_instruct(self) -> bool:
        """InstructBLIP: the Q-Former reads the instruction (word embeddings under `qformer.embeddings`)."""
        return self.architecture == INSTRUCT_ARCHITECTURE

    def image_transform(self) -> ImageTransform:
        """The preprocessing the image encoder expects: a tower's own, or EVA's (its size, CLIP mean/std)."""
        from .processing import ImageTransform

        if isinstance(self.vision_config, VisionConfig):
            return ImageTransform(size=self.vision_config.image_size)
        return self.vision_config.transform()

    @property
    def has_language_model(self) -> bool:
        return self.text_config is not None

    @property
    def has_text_side(self) -> bool:
        """The Q-Former can embed text (ITC/ITM): retrieval and stage-1 checkpoints."""
        return self.qformer_config.use_qformer_text_input and not self.is_instruct

    @property
    def is_encoder_decoder(self) -> bool:
        if self.text_config is None:
            return False
        return bool(self.lm_config().is_encoder_decoder)

    def lm_config(self):  # -> transformers.PretrainedConfig
        """The `transformers` config of the language model, built from `text_config`."""
        from transformers import AutoConfig

        if self.text_config is None:
            raise ConfigError("this checkpoint has no language model (text_config is absent)")
        raw = dict(self.text_config)
        model_type = raw.pop("model_type", None)
        if model_type is None:
            raise ConfigError(f"text_config has no model_type: {sorted(self.text_config)[:10]}")
        try:
            return AutoConfig.for_model(model_type, **raw)
        except ValueError as e:
            raise ConfigError(f"text_config model_type {model_type!r} is not known to transformers: {e}") from e

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Blip2Config:
        raw = dict(raw)
        vision = _vision(raw.pop("vision_config", None) or {})
        qformer = _take(QFormerConfig, raw.pop("qformer_config", None) or {})
        qformer.encoder_hidden_size = vision.hidden_size
        text = raw.pop("text_config", None)
        archs = raw.get("architectures") or []
        if archs:
            arch = archs[0]
        elif raw.get("model_type") == "instructblip":
            arch = INSTRUCT_ARCHITECTURE
        else:
            arch = "Blip2ForConditionalGeneration" if text else "Blip2ForImageTextRetrieval"
        if arch == "Blip2ForImageTextRetrieval":
            text = None  # HF writes a default OPT text_config even for retrieval checkpoints; it has no LM weights
        image_token = raw.pop("image_token_index", None)
        image_token = raw.pop("image_token_id", None) if image_token is None else image_token
        known = {"num_query_tokens", "image_text_hidden_size"}
        cfg = cls(
            vision_config=vision,
            qformer_config=qformer,
            text_config=text,
            image_token_index=image_token,
            architecture=arch,
            **{k: raw.pop(k) for k in known if k in raw},
        )
        cfg.extra = raw
        return cfg

    @classmethod
    def from_json_file(cls, path: str | Path) -> Blip2Config:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: config file not found") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type not in (None, "blip-2", "blip_2", "instructblip"):
            raise ConfigError(f"{path}: model_type is {model_type!r}, not a BLIP-2 or InstructBLIP checkpoint")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The HF layout, readable by `transformers.Blip2Config.from_pretrained` (with the EVA image encoder; its
        BLIP-2 classes know no other)."""
        is_tower = not isinstance(self.vision_config, VisionConfig)
        out = dict(self.extra)
        out.update(
            model_type="instructblip" if self.is_instruct else "blip-2",
            architectures=[self.architecture],
            vision_config=self.vision_config.to_dict() if is_tower else asdict(self.vision_config),
            qformer_config=asdict(self.qformer_config),
            num_query_tokens=self.num_query_tokens,
            image_text_hidden_size=self.image_text_hidden_size,
        )
        if self.text_config is not None:
            out["text_config"] = self.text_config
            out["use_decoder_only_language_model"] = not self.is_encoder_decoder
        if self.image_token_index is not None:
            out["image_token_index"] = self.image_token_index
        return out

    def save(self, folder: str | Path) -> None:
        (Path(folder) / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


# The official checkpoints, for `blip2 models`. Parameter counts from the paper (Table 2, total parameters) and,
# for the retrieval checkpoints, ViT-g + the full Q-Former; the size is what those parameters take in fp32.
_OFFICIAL = [
    # (hub id, language model, parameters in billions, what it is for)
    ("Salesforce/blip2-opt-2.7b", "OPT-2.7B", 3.8, "caption, VQA, chat"),
    ("Salesforce/blip2-opt-6.7b", "OPT-6.7B", 7.8, "caption, VQA, chat"),
    ("Salesforce/blip2-opt-2.7b-coco", "OPT-2.7B", 3.8, "COCO captions (364 px)"),
    ("Salesforce/blip2-opt-6.7b-coco", "OPT-6.7B", 7.8, "COCO captions (364 px)"),
    ("Salesforce/blip2-flan-t5-xl", "Flan-T5-XL", 4.1, "caption, VQA, chat"),
    ("Salesforce/blip2-flan-t5-xl-coco", "Flan-T5-XL", 4.1, "COCO captions (364 px)"),
    ("Salesforce/blip2-flan-t5-xxl", "Flan-T5-XXL", 12.1, "caption, VQA, chat"),
    ("Salesforce/blip2-itm-vit-g", "-", 1.2, "retrieval (ITC, ITM)"),
    ("Salesforce/blip2-itm-vit-g-coco", "-", 1.2, "retrieval, COCO fine-tuned (364 px)"),
    # InstructBLIP: ViT-g, the Q-Former with its text embeddings (0.19B) and the LM
    ("Salesforce/instructblip-flan-t5-xl", "Flan-T5-XL", 4.0, "instructions, caption, VQA, chat"),
    ("Salesforce/instructblip-flan-t5-xxl", "Flan-T5-XXL", 12.3, "instructions, caption, VQA, chat"),
    ("Salesforce/instructblip-vicuna-7b", "Vicuna-7B", 7.9, "instructions, caption, VQA, chat"),
    ("Salesforce/instructblip-vicuna-13b", "Vicuna-13B", 14.2, "instructions, caption, VQA, chat"),
]
KNOWN_MODELS: dict[str, dict[str, str]] = {
    hub_id: {"lm": lm, "params": f"{b:g}B", "task": task, "size": f"{b * 4:.0f} GB (fp32)"}
    for hub_id, lm, b, task in _OFFICIAL
}
