"""Where a checkpoint is: a local folder or a Hub id (offline misses say how to get it), and its weight files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CheckpointError

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]


LAVIS_SUFFIXES = (".pth", ".pt", ".bin")  # LAVIS' runner writes checkpoint_*.pth; its published files are .pth


def resolve(model: str | os.PathLike) -> Path:
    """The folder with a model's config.json, tokenizer and preprocessing: a local folder, a Hub id fetched into (or
    found in) the Hugging Face cache, or for a LAVIS `.pth` file the base checkpoint that completes it (lavis.py)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: folder has no config.json; is it a BLIP-2 checkpoint folder?")
        return path
    if path.suffix in LAVIS_SUFFIXES:
        from .lavis import base_folder

        return base_folder(path, getattr(model, "base", None))
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint folder (with config.json) or a LAVIS .pth, got a file")
    if str(model).count("/") != 1 or str(model).startswith((".", "/", "~")):
        raise CheckpointError(f"{model}: no such folder, and not a Hub id of the form 'owner/name'")
    return _from_hub(str(model))


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    how = f"download it where there is network (`hf download {repo_id}`) or pass a local folder"
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=WEIGHT_PATTERNS, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - hub errors come in many classes; all mean "not available"
        if offline or "offline" in str(e).lower() or isinstance(e, (OSError, HfHubHTTPError)):
            raise CheckpointError(
                f"model {repo_id!r} is not on disk and cannot be fetched ({type(e).__name__}); {how}"
            ) from e
        raise
    if not any(folder.glob("*.safetensors")):  # old repos ship only .bin
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.bin", "*.json"], local_files_only=offline))
    return folder


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder: sharded or single, safetensors preferred over .bin."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = folder / index_name
        if index.is_file():
            try:
                shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
            missing = [n for n in shard_names if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
            return [folder / n for n in shard_names]
        if (folder / single).is_file():
            return [folder / single]
    for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise CheckpointError(f"{folder}: no weights found (*.safetensors, *.bin, *.pth)")
