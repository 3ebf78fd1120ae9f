"""Any frozen image encoder: a `transformers` image tower (CLIP, SigLIP, DINOv2) in place of EVA ViT-g.

BLIP-2's Q-Former cross-attends to whatever token features a frozen image encoder gives it; the paper's encoder is
EVA ViT-g (vision.py). Here a `transformers` tower takes its place, chosen by the `model_type` of `vision_config`:

    TowerConfig         the tower's own HF config and its image preprocessing (a HF image processor config)
    HFVisionTower       pixel_values (B, 3, S, S) -> features (B, N, D) for the Q-Former
    tower_config(spec)  a TowerConfig from a config dict, or from a tower folder / Hub id
    load_tower(spec)    the tower: with its weights from a folder, freshly initialised from a dict
    save_tower(t, dir)  a folder that `load_tower` and `transformers` read back
    build_vision(cfg)   EVA or a tower, whichever a `Blip2Config.vision_config` is

The features are the tower's last hidden state after its final LayerNorm, on every token:

    family   model_type            class              tokens N        final LayerNorm        default preprocessing
    CLIP     clip_vision_model     CLIPVisionModel    1 + (S/p)^2     post_layernorm (*)     short side S, centre crop
    SigLIP   siglip_vision_model   SiglipVisionModel  (S/p)^2         post_layernorm         S x S, mean/std 0.5
    DINOv2   dinov2                Dinov2Model        1 + (S/p)^2     layernorm              short side S*256/224, crop

(*) `transformers` applies CLIP's `post_layernorm` to the pooled CLS token only; here it is applied to every token,
as BLIP-2 puts `ln_vision` after EVA. SigLIP's attention-pooling head, when the checkpoint has one, is not used.
A tower folder's `preprocessor_config.json` gives its preprocessing; a config dict gets the family's defaults at
the config's `image_size` (mean/std: CLIP's, 0.5, ImageNet's), unless it carries an `image_processor` dict.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import VisionConfig
from .errors import CheckpointError, ConfigError
from .processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform
from .vision import VisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Family:
    model_class: str  # the `transformers` class of the tower
    dual: str  # model_type of a dual-encoder folder holding the tower under `vision_config` ("" if none)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    edge_ratio: float | None  # shorter side = round(S * ratio), then the centre S x S; None: resize to S x S
    norm_every_token: str | None = None  # a final LayerNorm `transformers` applies to the pooled token only


FAMILIES = {  # keys: config.TOWER_TYPES, on which config.py dispatches
    "clip_vision_model": Family("CLIPVisionModel", "clip", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 1.0, "post_layernorm"),
    "siglip_vision_model": Family("SiglipVisionModel", "siglip", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), None),
    "dinov2": Family("Dinov2Model", "", IMAGENET_MEAN, IMAGENET_STD, 256 / 224),
}
_NOT_KEPT = ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype")


def _family(model_type: object, where: str) -> Family:
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not an image tower BLIP-2 can be built on here; "
            f"use one of {', '.join(FAMILIES)} (or a CLIP / SigLIP folder, whose vision tower is taken)"
        )
    return FAMILIES[model_type]


def default_transform(model_type: str, image_size: int) -> ImageTransform:
    """The preprocessing of the family's `transformers` image processor, at `image_size`."""
    fam = _family(model_type, "vision_config")
    edge = None if fam.edge_ratio is None else round(image_size * fam.edge_ratio)
    return ImageTransform(size=image_size, mean=fam.mean, std=fam.std, shortest_edge=edge)


@dataclass
class TowerConfig:
    """A `transformers` image tower as the image encoder, stored as `vision_config` in `config.json`: the tower's
    own config (`model_type` clip_vision_model / siglip_vision_model / dinov2) plus an `image_processor` key."""

    config: dict[str, Any]  # the tower's HF config, complete (as its `to_dict` writes it)
    image_processor: dict[str, Any]  # its preprocessing, as `ImageTransform.to_dict` writes it

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def hidden_size(self) -> int:
        """The feature width: the Q-Former's `encoder_hidden_size`."""
        return int(self.config["hidden_size"])

    @property
    def image_size(self) -> int:
        """The side of the square images the tower is fed (after any crop)."""
        return self.transform().size

    def hf_config(self):  # -> transformers.PretrainedConfig
        from transformers import AutoConfig

        raw = {k: v for k, v in self.config.items() if k != "model_type"}
        try:
            return AutoConfig.for_model(self.model_type, **raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"vision_config: transformers cannot build a {self.model_type} config ({e})") from e

    def transform(self) -> ImageTransform:
        return ImageTransform.from_dict(self.image_processor, "vision_config.image_processor")

    def to_dict(self) -> dict[str, Any]:
        return {**self.config, "image_processor": dict(self.image_processor)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TowerConfig:
        """From a tower config dict (any subset of its fields; `transformers` fills in the rest)."""
        raw = dict(raw)
        processor = raw.pop("image_processor", None)
        _family(raw.get("model_type"), "vision_config")
        partial = cls(config=raw, image_processor={})
        hf = partial.hf_config()
        config = {k: v for k, v in hf.to_dict().items() if k not in _NOT_KEPT}
        if processor is None:
            transform = default_transform(hf.model_type, hf.image_size)
        else:
            transform = ImageTransform.from_dict(processor, "vision_config.image_processor")
        return cls(config=config, image_processor=transform.to_dict())


def tower_config(spec: dict[str, Any] | str | os.PathLike) -> TowerConfig:
    """A `TowerConfig` from a config dict, or from a tower folder or Hub id (a CLIP / SigLIP dual-encoder folder
    gives its vision tower); a folder's `preprocessor_config.json` gives the preprocessing."""
    if isinstance(spec, dict):
        return TowerConfig.from_dict(spec)
    folder = _folder(spec)
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the tower's config ({e})") from e
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    duals = {f.dual: t for t, f in FAMILIES.items() if f.dual}
    if model_type in duals:
        raw = {**(raw.get("vision_config") or {}), "model_type": duals[model_type]}
    _family(raw.get("model_type") if isinstance(raw, dict) else None, str(path))
    transform = ImageTransform.read(folder)
    if transform is not None:
        raw["image_processor"] = transform.to_dict()
    try:
        return TowerConfig.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{folder}: {e}") from e


def _folder(spec: str | os.PathLike) -> Path:
    from .checkpoint.files import resolve

    return resolve(spec)  # a folder with config.json, or a Hub id (fetched, or an offline miss that says how)


class HFVisionTower(nn.Module):
    """A `transformers` image tower as BLIP-2's image encoder: pixel_values (B, 3, S, S) -> features (B, N, D),
    the last hidden state after the final LayerNorm on every token (see the module docstring)."""

    def __init__(self, cfg: TowerConfig, tower: nn.Module | None = None) -> None:
        super().__init__()
        from transformers import AutoModel

        self.config = cfg
        self.tower = tower if tower is not None else AutoModel.from_config(cfg.hf_config())
        name = FAMILIES[cfg.model_type].norm_every_token
        # kept by name: registering the module a second time would make its weights look tied
        self._norm = None if name is None else _submodule_named(self.tower, name)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tower.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.tower(pixel_values=pixel_values.to(self.dtype)).last_hidden_state  # (B, N, D)
        if self._norm is not None:
            h = self.tower.get_submodule(self._norm)(h)
        return h


def _submodule_named(module: nn.Module, last: str) -> str:
    names = [n for n, _ in module.named_modules() if n.split(".")[-1] == last]
    if len(names) != 1:
        raise ConfigError(f"{type(module).__name__}: expected one '{last}' module, found {names}")
    return names[0]


def load_tower(spec: dict[str, Any] | str | os.PathLike) -> HFVisionTower:
    """The tower `spec` names: a folder or Hub id with its weights, or a config dict, freshly initialised (random
    weights: for tests and experiments; a frozen random tower sees little)."""
    cfg = tower_config(spec)
    if isinstance(spec, dict):
        return HFVisionTower(cfg).eval()
    import transformers

    folder = _folder(spec)
    cls = getattr(transformers, FAMILIES[cfg.model_type].model_class)
    with _quiet_transformers():  # its load report lists a dual encoder's text tower as unexpected: expected here
        model, info = cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise CheckpointError(f"{folder}: the image tower's weights are incomplete; missing {missing[:8]}")
    return HFVisionTower(cfg, model).eval()


def save_tower(tower: HFVisionTower, folder: str | os.PathLike) -> Path:
    """The tower's `save_pretrained` folder plus its `preprocessor_config.json`: `load_tower(folder)` reads it."""
    folder = Path(folder)
    tower.tower.save_pretrained(folder)
    tower.config.transform().save_pretrained(folder)
    return folder


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


def build_vision(cfg: VisionConfig | TowerConfig) -> nn.Module:
    """The image encoder of a `Blip2Config.vision_config`: EVA's `VisionTransformer` or an `HFVisionTower`."""
    return HFVisionTower(cfg) if isinstance(cfg, TowerConfig) else VisionTransformer(cfg)
