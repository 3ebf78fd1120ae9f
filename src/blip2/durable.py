"""Durable runs: files that a kill leaves whole, logs that a kill can tear only at the end, and runs that resume
only with their own settings. Standard library only; batch captioning, indexing, evaluation and training use it.

- **Atomic files** (`atomic_write`, `atomic_path`): the new content goes to a temp file in the target's folder, is
  fsynced, then `os.replace`d onto the target, so a reader (or a rerun) sees the old file or the new one, never
  half of one. The temp name is fixed per target (`.<name>.blip2tmp`), so a temp file left by a killed run is
  overwritten by the rerun; `unique=True` adds the process id, for files several processes may rebuild at once.
  On an error before the rename the temp file is removed and the target is untouched. Folders (a training
  checkpoint) are swapped whole by `replace_dir`; `recover_dir` finishes a swap a kill interrupted.
- **JSON lines** (`append_jsonl`, `repair_jsonl`): rows are appended in one write, flushed and fsynced, so a kill
  tears at most the last line; `repair_jsonl` cuts a file back to its leading whole lines of valid JSON.
- **Settings fingerprints** (`canonical`, `settings_hash`, `check_settings`): a run stores the settings that shape
  its output with its progress; resuming with other settings raises `ConfigError` naming each setting that differs,
  so one output never mixes two configurations.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "TEMP_SUFFIX",
    "append_jsonl",
    "atomic_path",
    "atomic_write",
    "canonical",
    "check_settings",
    "fsync_file",
    "recover_dir",
    "repair_jsonl",
    "replace_dir",
    "settings_diff",
    "settings_hash",
    "temp_path",
]

TEMP_SUFFIX = ".blip2tmp"

PathLike = str | os.PathLike[str]


# ---- atomic files ----------------------------------------------------------------------------------------------------
def temp_path(path: PathLike, unique: bool = False) -> Path:
    """The temp file `atomic_path` writes before the rename: hidden, beside `path`, per process if `unique`."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}{TEMP_SUFFIX}" if unique else f".{p.name}{TEMP_SUFFIX}")


def fsync_file(path: PathLike) -> None:
    """Flush a written file's data to the disk (what a writer that only takes a path, e.g. Parquet, leaves)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: PathLike, *, fsync: bool = True, unique: bool = False) -> Iterator[Path]:
    """A temp path to write the new `path` to; on leaving the block it is fsynced and renamed onto `path`.

    For writers that take a path or stream (Parquet, NumPy, faiss, memory maps). An exception in the block, or in
    the fsync or rename, removes the temp file and leaves `path` as it was. `fsync=False` suits caches that are
    rebuilt when found torn or stale.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target, unique)
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, target)  # atomic on POSIX and Windows within one filesystem
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: PathLike, data: bytes | str, *, fsync: bool = True, unique: bool = False) -> Path:
    """Replace the file at `path` with `data` (text is written as UTF-8, newlines untranslated), atomically.

    Returns the path. Raises OSError (disk full, read-only folder) with `path` left as it was.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, fsync=False, unique=unique) as tmp:
        with open(tmp, "wb") as f:
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return Path(path)


# ---- JSON lines ------------------------------------------------------------------------------------------------------
def append_jsonl(path: PathLike, rows: Iterable[Any], *, fsync: bool = True) -> None:
    """Append one JSON line per row in a single write, then flush (and fsync): a kill can tear at most the last line.

    Nothing is written, and no file created, when `rows` is empty.
    """
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    if not data:
        return
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def repair_jsonl(path: PathLike, valid: Callable[[Any], bool] | None = None) -> list[Any]:
    """Cut a JSONL file back to its leading whole lines of valid JSON; return their records ([] if no file).

    Everything from the first line that is torn (no newline: killed mid-write), not JSON (e.g. the zeros a power
    cut can leave) or rejected by `valid` is truncated away, so appends resume on a fresh line.
    """
    p = Path(path)
    if not p.exists():
        return []
    records: list[Any] = []
    good = 0
    with open(p, "rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("torn line")
                record = json.loads(line)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                break
            if valid is not None and not valid(record):
                break
            records.append(record)
            good += len(line)
    if good != p.stat().st_size:
        with open(p, "r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    return records


# ---- settings fingerprints -------------------------------------------------------------------------------------------
def canonical(settings: Mapping[str, Any]) -> str:
    """The settings as canonical JSON (sorted keys; values JSON cannot hold, e.g. paths, as their `str`)."""
    return json.dumps(settings, sort_keys=True, default=str)


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A stable short hash of the settings (the same on every machine and Python version): 16 hex digits."""
    return hashlib.sha256(canonical(settings).encode("utf-8")).hexdigest()[:16]


def settings_diff(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{setting: (stored value, wanted value)} for every setting that differs, compared as JSON reads them back
    (tuples as lists); a setting only one side has is None on the other."""
    old, new = json.loads(canonical(stored)), json.loads(canonical(wanted))
    return {k: (old.get(k), new.get(k)) for k in sorted({*old, *new}) if old.get(k) != new.get(k)}


def check_settings(stored: Mapping[str, Any], wanted: Mapping[str, Any], where: PathLike, advice: str) -> None:
    """Refuse to resume the run stored at `where` with other settings: `ConfigError` naming each one that differs.

    `advice` says how to start over, e.g. "use another --out".
    """
    diff = settings_diff(stored, wanted)
    if diff:
        changes = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())
        raise ConfigError(f"{where}: made by a run with other settings ({changes}); {advice}")


# ---- folders ---------------------------------------------------------------------------------------------------------
def _old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def replace_dir(src: PathLike, dst: PathLike, *, fsync: bool = True) -> None:
    """Swap the finished folder `src` in for the folder `dst` (e.g. a checkpoint), keeping a whole one at every step.

    Its files are fsynced, `dst` is renamed to `dst.old`, `src` to `dst`, then `dst.old` is removed. A kill between
    the two renames leaves no `dst`: `recover_dir(dst)` (call it before reading `dst`) finishes the swap.
    """
    src, dst = Path(src), Path(dst)
    if fsync:
        for file in sorted(p for p in src.rglob("*") if p.is_file()):
            fsync_file(file)
    old = _old(dst)
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(dst: PathLike, src: PathLike) -> None:
    """Finish a `replace_dir(src, dst)` that a kill interrupted. `dst.old` without `dst` means the kill came between
    the renames, when `src` was already whole: it becomes `dst`. A `dst.old` beside `dst` is removed."""
    dst, src = Path(dst), Path(src)
    old = _old(dst)
    if not old.exists():
        return
    if not dst.exists():
        (src if src.exists() else old).rename(dst)
    shutil.rmtree(old, ignore_errors=True)
