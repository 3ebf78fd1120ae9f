"""LAVIS `.pth` files as LAVIS saves them: the trained weights only, loaded over a base checkpoint's frozen ones.

LAVIS' runner (`RunnerBase._save_checkpoint`) deletes every parameter with `requires_grad=False` before saving, so a
BLIP-2 file holds `ln_vision`, the Q-Former, the query tokens and the projection(s) (plus the stage-1 ITC/ITM heads),
the ViT only when it was trained (`freeze_vit: False`) and never the language model. The rest comes from a *base*:
the Hugging Face checkpoint with the same frozen ViT and LM, named by the caller or found from the LAVIS model type
the file's config records.

Which tensor wins: the file's, for every key it holds (a trained ViT replaces the base's); the base gives the rest.
Every part that LAVIS always trains must be in the file (a base would otherwise fill it in silently), and every
parameter must come from one of the two: what neither holds is listed in the error.

Numerics kept from LAVIS: its `ln_vision` is a plain `nn.LayerNorm` (eps 1e-5), where the HF config's one
`layer_norm_eps` (1e-6) serves every ViT norm; the loaded model's config records `post_layernorm_eps = 1e-5`, so a
saved copy reloads the same.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..config import Blip2Config
from ..errors import CheckpointError
from .files import LAVIS_SUFFIXES, resolve, weight_files
from .keymaps import to_hf
from .reading import iter_tensors, load_lavis_file, peek_keys

LAVIS_LN_VISION_EPS = 1e-5  # torch's nn.LayerNorm default, which LAVIS' `ln_vision` keeps

# LAVIS model types (its configs' `model_type`; the model YAMLs give it as `arch`) -> the HF checkpoint with the same
# frozen ViT (and image size) and LM.
BASE_OF_MODEL_TYPE = {
    "pretrain_opt2.7b": "Salesforce/blip2-opt-2.7b",
    "pretrain_opt6.7b": "Salesforce/blip2-opt-6.7b",
    "caption_coco_opt2.7b": "Salesforce/blip2-opt-2.7b-coco",
    "caption_coco_opt6.7b": "Salesforce/blip2-opt-6.7b-coco",
    "pretrain_flant5xl": "Salesforce/blip2-flan-t5-xl",
    "pretrain_flant5xxl": "Salesforce/blip2-flan-t5-xxl",
    "caption_coco_flant5xl": "Salesforce/blip2-flan-t5-xl-coco",
    "pretrain": "Salesforce/blip2-itm-vit-g",  # blip2, blip2_feature_extractor, blip2_image_text_matching
    "coco": "Salesforce/blip2-itm-vit-g-coco",
    "flant5xl": "Salesforce/instructblip-flan-t5-xl",  # blip2_t5_instruct
    "flant5xxl": "Salesforce/instructblip-flan-t5-xxl",
    "vicuna7b": "Salesforce/instructblip-vicuna-7b",  # blip2_vicuna_instruct
    "vicuna13b": "Salesforce/instructblip-vicuna-13b",
}
# Model types whose ViT (EVA-CLIP ViT-L) no HF checkpoint holds.
NO_HF_BASE = {"pretrain_vitL", "pretrain_flant5xl_vitL"}

# Which LM a file's projection feeds, by its LAVIS name: a base must have a language model of this `model_type`.
_LM_OF_PROJECTION = {"opt_proj": ("opt",), "t5_proj": ("t5",), "llm_proj": ("llama", "t5")}
# Keys of a LAVIS file that are no weights: buffers of its frozen LM that the runner keeps (it drops parameters only)
# and that the LM recomputes (rotary frequencies).
_RECOMPUTED = re.compile(r"^(opt|t5|llm)_model\..*\.inv_freq$")
# The parts LAVIS always trains, so always saves: the file must hold every parameter outside the ViT and the LM.
_FROZEN_PARTS = ("vision_model.embeddings.", "vision_model.encoder.", "language_model.")


class LavisCheckpoint(str):
    """The path of a LAVIS `.pth` with the base that supplies its frozen weights (`--base`). It is a str (the path),
    so it travels unchanged through every command's settings (server, batch, evaluation) to `blip2.load`."""

    base: str

    def __new__(cls, path: str | os.PathLike, base: str | os.PathLike) -> LavisCheckpoint:
        obj = super().__new__(cls, os.fspath(path))
        obj.base = os.fspath(base)
        return obj

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:  # pickled to Ray workers with its base
        return LavisCheckpoint, (str.__str__(self), self.base)


def base_of(model: object) -> str | None:
    """The base a `LavisCheckpoint` carries (absolute, if it is a local folder), for the identity of a run that
    writes its outputs: the same `.pth` on another base captions otherwise. None for any other model."""
    base = getattr(model, "base", None) if isinstance(model, LavisCheckpoint) else None
    return os.path.abspath(base) if base is not None and os.path.isdir(base) else base


def is_lavis_file(model: str | os.PathLike) -> bool:
    """A path to a weights file, not a checkpoint folder or a Hub id: only LAVIS checkpoints come as one file."""
    path = Path(model).expanduser()
    return path.suffix in LAVIS_SUFFIXES and not path.is_dir()


def base_folder(path: str | os.PathLike, base: str | os.PathLike | None) -> Path:
    """The folder of the base that completes a LAVIS file (its config, tokenizer and preprocessing)."""
    if base is not None:
        return resolve(base)
    path = Path(path).expanduser()
    return resolve_base(path, load_lavis_file(path)[1])


class LavisSource(NamedTuple):
    """What `load_model` needs to build and load a LAVIS file over its base."""

    config: Blip2Config  # the base's, with LAVIS' `ln_vision` eps
    tensors: Iterator[tuple[str, torch.Tensor]]  # HF layout: the file's, then the base's that the file lacks
    trained: frozenset[str]  # the keys the file holds
    folder: Path  # the base folder: tokenizer, preprocessing, generation config
    name: str  # for errors


def load_lavis(path: str | os.PathLike, base: str | os.PathLike | None, mmap: bool = True) -> LavisSource:
    """Read a LAVIS file and find its base; tensors are read lazily, as `load_state` assigns them."""
    path = Path(path).expanduser()
    state, lavis_config = load_lavis_file(path)
    state = {k: v for k, v in state.items() if not _RECOMPUTED.match(k)}
    folder = resolve(base) if base is not None else resolve_base(path, lavis_config)
    cfg = Blip2Config.from_json_file(folder / "config.json")
    _check_language_model(path, state, cfg, folder)
    cfg.vision_config.post_layernorm_eps = LAVIS_LN_VISION_EPS
    trained = dict(to_hf(list(state), iter(state.items())))
    files = weight_files(folder)
    from_base = ((k, v) for k, v in to_hf(peek_keys(files), iter_tensors(files, mmap)) if k not in trained)
    return LavisSource(cfg, _chain(trained, from_base), frozenset(trained), folder, f"{path} (over the base {folder})")


def _chain(first: Mapping[str, torch.Tensor], rest: Iterator[tuple[str, torch.Tensor]]):
    yield from first.items()
    yield from rest


def check_trained_parts(source: LavisSource, model_keys: Iterable[str]) -> None:
    """Every parameter LAVIS trains must come from the file: a base must not stand in for a missing one."""
    absent = sorted(k for k in model_keys if not k.startswith(_FROZEN_PARTS) and k not in source.trained)
    if absent:
        raise CheckpointError(
            f"{source.name}: the file lacks {len(absent)} trained weights that a LAVIS checkpoint always holds: "
            + ", ".join(absent[:8])
            + (f", ... (+{len(absent) - 8})" if len(absent) > 8 else "")
        )


def resolve_base(path: Path, lavis_config: Mapping[str, Any]) -> Path:
    """The HF checkpoint of the LAVIS model type in the file's config, on disk or fetched."""
    model_type = lavis_config.get("model_type") or lavis_config.get("arch")
    kind = f"{lavis_config.get('arch')}/{model_type}" if lavis_config.get("model_type") else str(model_type)
    if model_type in NO_HF_BASE:
        raise CheckpointError(
            f"{path}: LAVIS model type {kind} uses a ViT-L that no Hugging Face BLIP-2 checkpoint holds; pass the "
            "checkpoint with its frozen ViT and LM as base= (CLI: --base)"
        )
    repo = BASE_OF_MODEL_TYPE.get(model_type)
    if repo is None:
        said = f"its config names model type {kind!r}, which" if model_type else "its config names no model type; it"
        raise CheckpointError(
            f"{path}: holds only the weights LAVIS trained; {said} does not say which checkpoint holds the frozen ViT "
            "and LM. Pass it as base= (CLI: --base), e.g. Salesforce/blip2-opt-2.7b or a local folder"
        )
    try:
        return resolve(repo)
    except CheckpointError as e:
        raise CheckpointError(
            f"{path}: its frozen ViT and LM come from {repo} (LAVIS model type {kind}), which is not available: {e}. "
            f"Download it (`hf download {repo}`) or pass a local copy as base= (CLI: --base)"
        ) from e


def _check_language_model(path: Path, state: Mapping[str, Any], cfg: Blip2Config, folder: Path) -> None:
    """A file whose projection feeds an OPT needs a base with an OPT (and so on): shapes alone may not tell."""
    projection = next((p for p in _LM_OF_PROJECTION if f"{p}.weight" in state), None)
    lm_type = (cfg.text_config or {}).get("model_type")
    if projection is None and "vision_proj.weight" in state and lm_type is not None:
        raise CheckpointError(
            f"{path}: a LAVIS stage-1 (Q-Former only) checkpoint, but its base {folder} has a language model "
            f"({lm_type}); use a retrieval base such as Salesforce/blip2-itm-vit-g"
        )
    if projection is not None and lm_type not in _LM_OF_PROJECTION[projection]:
        raise CheckpointError(
            f"{path}: its `{projection}` feeds a {' or '.join(_LM_OF_PROJECTION[projection])} language model, but "
            f"its base {folder} has {'none' if lm_type is None else 'a ' + lm_type + ' one'}"
        )
