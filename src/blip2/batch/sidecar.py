"""Caption sidecar files: `photo.jpg` -> `photo.txt` beside it, or under a separate folder mirroring the inputs."""

from __future__ import annotations

import os
from pathlib import Path

from ..defaults import SIDECAR_EXISTING
from ..errors import ConfigError
from ..sources import Item

EXISTING = SIDECAR_EXISTING  # what to do with a caption file that exists; the first is the default


def sidecar_path(item: Item, ext: str, sidecar_dir: str | os.PathLike[str] | None) -> Path:
    """Where the caption of `item` goes. Tar members have no folder of their own, so they need `sidecar_dir`."""
    suffix = "." + ext.lstrip(".")
    if sidecar_dir is not None:
        return (Path(sidecar_dir) / item.relpath).with_suffix(suffix)
    if item.member is not None:
        raise ConfigError(f"{item.key}: a tar member cannot have a sidecar beside it; use --sidecar-dir")
    return Path(item.path).with_suffix(suffix)


def read_text(path: Path) -> str | None:
    """The current sidecar text, or None if there is no sidecar yet."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read existing caption file ({e})") from e


def compose(old: str | None, caption: str, existing: str, separator: str) -> str:
    """The sidecar's complete new text, one line ending in a newline as caption tools write it.

    `append`/`prepend` join the old text (stripped) and the caption with `separator`.
    """
    old = (old or "").strip()
    if existing in ("skip", "overwrite") or not old:
        return caption + "\n"
    if existing == "append":
        return old + separator + caption + "\n"
    if existing == "prepend":
        return caption + separator + old + "\n"
    raise ConfigError(f"existing must be one of {', '.join(EXISTING)}; got {existing!r}")
