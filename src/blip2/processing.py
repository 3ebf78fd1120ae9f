"""Images and prompts in, tensors and strings out: everything that happens before the model.

The image path is pixel-equal to `transformers`' PIL-backed `BlipImageProcessor` (transformers 5:
`BlipImageProcessorPil`, which `BlipImageProcessor` falls back to when torchvision is absent):

1. `convert_to_rgb`: images with an alpha band or a `transparency` entry are converted to RGBA and
   alpha-composited onto opaque white; everything else goes through PIL's own `convert("RGB")`
   (CMYK naively, "I;16" by clipping every value above 255 to 255).
2. Resize the uint8 RGB image with PIL `Image.resize((w, h), BICUBIC)` to exactly size x size (no crop).
3. Rescale: `uint8 -> float64 * (1/255) -> float32`.
4. Normalise in float32: `(x - mean) / std`, mean and std cast to float32 first.

Steps 3 and 4 only ever see 256 distinct values per channel, so they are a per-channel lookup table here:
identical bits, no per-pixel arithmetic.

The torchvision backend (`BlipImageProcessorFast`; in transformers 5 the default `BlipImageProcessor` when
torchvision is installed) resizes uint8 tensors with `torchvision.transforms.v2.functional.resize(bicubic,
antialias=True)` and fuses rescale+normalise into one float32 step. Its antialiased bicubic kernel is not PIL's:
torch's antialiased bicubic differs from PIL by 1-2 uint8 levels (mean ~0.1 level) on 640x480 -> 224, i.e. up to
~0.03 after normalisation, so the fast processor is close to, not equal to, the reference used here. (Measured
with `torch.nn.functional.interpolate`, bicubic with antialiasing, which torchvision's tensor resize calls.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip2.defaults import VQA_TEMPLATE
from blip2.errors import ConfigError, one_line
from blip2.images import DEFAULT_MAX_PIXELS, load_image, to_rgb

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "QFORMER_TEXT_TOKENS",
    "VQA_TEMPLATE",
    "ImageTransform",
    "chat_prompt",
    "load_image",
    "to_rgb",
    "vqa_prompt",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"  # transformers 5 nests the image settings here

_CHAT_TURN = "Question: {} Answer: {}."
QFORMER_TEXT_TOKENS = 35  # a Q-Former text (ITC, ITM) is cut to this many tokens, as LAVIS's max_txt_len


# ---------------------------------------------------------------------------------------------------------------------
# Pixels


@dataclass(frozen=True)
class ImageTransform:
    """Resize to size x size (bicubic, no crop), scale to [0, 1], normalise with CLIP mean/std.

    `ImageTransform()(images)` equals `BlipImageProcessor(size={"height": s, "width": s}, resample=3,
    do_convert_rgb=True)(images, return_tensors="pt").pixel_values` bit for bit (PIL backend).
    """

    size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = Image.Resampling.BICUBIC

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ConfigError(f"image size must be a positive integer, got {self.size!r}")
        object.__setattr__(self, "mean", _three_floats("image_mean", self.mean))
        object.__setattr__(self, "std", _three_floats("image_std", self.std))
        if any(s == 0 for s in self.std):
            raise ConfigError(f"image_std must not contain 0, got {self.std!r}")
        try:
            object.__setattr__(self, "resample", int(Image.Resampling(self.resample)))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"resample must be a PIL resampling filter (0-5), got {self.resample!r}") from exc

    def _lut(self) -> np.ndarray:
        """(3, 256) float32: the normalised value of each uint8 level, computed in the reference's dtypes."""
        levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)  # rescale: f64 multiply, f32 cast
        mean = np.asarray(self.mean, dtype=np.float32)[:, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None]
        return (levels[None, :] - mean) / std  # float32 throughout, as transformers' normalize

    def __call__(self, images: Sequence[Image.Image] | Image.Image) -> torch.Tensor:
        """PIL images (any mode, any size) -> float32 tensor (B, 3, size, size)."""
        if isinstance(images, Image.Image):
            images = [images]
        lut = self._lut()
        out = np.empty((len(images), 3, self.size, self.size), dtype=np.float32)
        for i, img in enumerate(images):
            if not isinstance(img, Image.Image):
                raise TypeError(f"ImageTransform expects PIL images; item {i} is {type(img).__name__}")
            pixels = self.resized(img)
            for c in range(3):
                out[i, c] = lut[c][pixels[..., c]]
        return torch.from_numpy(out)

    def resized(self, img: Image.Image) -> np.ndarray:
        """Steps 1 and 2: (S, S, 3) uint8 RGB, what the normalisation then maps level by level."""
        if img.mode != "RGB" or img.info.get("transparency") is not None:
            img = to_rgb(img)
        return np.asarray(img.resize((self.size, self.size), resample=self.resample))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str]) -> ImageTransform:
        """Read `preprocessor_config.json` in `folder`, or the `image_processor` section of `processor_config.json`
        (the layout transformers 5 writes); the defaults (224, CLIP, bicubic) if there is neither."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"{folder}: not a folder; cannot read {PREPROCESSOR_CONFIG}")
        for name, section in ((PREPROCESSOR_CONFIG, None), (PROCESSOR_CONFIG, "image_processor")):
            path = folder / name
            if not path.is_file():
                continue
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ConfigError(f"{path}: cannot read preprocessor config ({one_line(exc)})") from exc
            if section is not None and isinstance(cfg, dict):
                if section not in cfg:
                    continue
                cfg = cfg[section]
            if not isinstance(cfg, dict):
                raise ConfigError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
            return cls(**_transform_kwargs(cfg, path))
        return cls()


def _three_floats(key: str, value: object) -> tuple[float, float, float]:
    try:
        floats = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key} must be three numbers, got {value!r}") from exc
    if len(floats) != 3:
        raise ConfigError(f"{key} must be three numbers (R, G, B), got {value!r}")
    return floats  # type: ignore[return-value]


def _transform_kwargs(cfg: dict, path: Path) -> dict:
    """Map a Hugging Face preprocessor config onto ImageTransform fields; refuse options it does not implement."""
    for flag, supported in (("do_resize", True), ("do_rescale", True), ("do_normalize", True)):
        if cfg.get(flag, supported) is not supported:
            raise ConfigError(f"{path}: {flag}={cfg[flag]!r} is not supported (only {supported})")
    if cfg.get("do_center_crop") or cfg.get("do_pad"):
        raise ConfigError(f"{path}: center crop / padding is not supported by this BLIP-2 preprocessing")
    factor = cfg.get("rescale_factor", 1 / 255)
    if not isinstance(factor, (int, float)) or abs(factor - 1 / 255) > 1e-12:
        raise ConfigError(f"{path}: rescale_factor={factor!r} is not supported (only 1/255)")
    kwargs: dict = {}
    if "size" in cfg:
        size = cfg["size"]
        if isinstance(size, dict):
            height, width = size.get("height"), size.get("width")
            if height is None or height != width:
                raise ConfigError(f"{path}: size={size!r}; only square {{'height': s, 'width': s}} is supported")
            size = height
        kwargs["size"] = size
    for key, field in (("image_mean", "mean"), ("image_std", "std"), ("resample", "resample")):
        if key in cfg:
            kwargs[field] = cfg[key]
    try:
        checked = ImageTransform(**kwargs)  # validate here so the error names the file
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return {"size": checked.size, "mean": checked.mean, "std": checked.std, "resample": checked.resample}


# ---------------------------------------------------------------------------------------------------------------------
# Prompts


def vqa_prompt(question: str) -> str:
    """`"Question: {question} Answer:"`, the template BLIP-2 was evaluated with for zero-shot VQA."""
    q = question.strip()
    if not q:
        raise ValueError(f"question must not be empty, got {question!r}")
    return VQA_TEMPLATE.format(q)


def chat_prompt(
    history: Sequence[tuple[str, str]],
    question: str,
    count_tokens: Callable[[str], int],
    budget: int,
) -> str:
    """Multi-turn prompt: past turns as `"Question: q Answer: a."`, then `"Question: question Answer:"`.

    Parts are joined by single spaces. While `count_tokens(prompt) > budget` the oldest turn is dropped; the
    current question is never cut, so if it alone is over budget it is returned alone. `budget` is for the text
    only: the caller subtracts the 32 query tokens (and anything else it adds) from the model's context first.
    """
    current = vqa_prompt(question)
    turns = [_CHAT_TURN.format(q.strip(), a.strip()) for q, a in history]
    start = 0
    prompt = " ".join([*turns, current])
    while start < len(turns) and count_tokens(prompt) > budget:
        start += 1
        prompt = " ".join([*turns[start:], current])
    return prompt
