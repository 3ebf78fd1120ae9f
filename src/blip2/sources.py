"""What to read: folders, lists of paths (text, JSONL, CSV) and WebDataset tar shards, as a stream of `Item`s.

Batch captioning, indexing and the image-map engine (`blip2.imagemap`) read their inputs here.

Every item has a `key`, the string that names it in manifests, error logs and the progress ledger:
the file's path (absolute, normalised, symlinks not resolved) or, for a tar member, `"{tar path}/{member name}"`.
Keys are what resume compares, so the same inputs give the same keys from any working directory.

The accounting rule: a folder scan (and a tar shard) looks at every regular file in it. A file with an image
extension, or whose first bytes carry an image format's signature, is an item: it is captioned (or embedded), or
listed with the reason it failed. Any other file (a notes.txt, a caption sidecar, a .json) is counted as "not an image
file" and not listed. So content counts, not only the name: a PNG named `photo.dat` is captioned, and a text file
named `photo.jpg` is listed as a failure. A file named in a list or on the command line is always an item: the user
asked for it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import ConfigError, ImageError
from .images import DEFAULT_MAX_PIXELS, is_image_suffix, load_image, sniff_format

__all__ = [
    "HEAD_BYTES",
    "LIST_SUFFIXES",
    "PATH_FIELDS",
    "TAR_SUFFIXES",
    "Item",
    "expand_braces",
    "iter_items",
    "looks_like_image",
    "read_item",
]

LIST_SUFFIXES = {".txt", ".lst", ".jsonl", ".csv", ".tsv"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
PATH_FIELDS = ("path", "image", "file", "filename", "image_path")
HEAD_BYTES = 64  # enough for every image signature Pillow checks


@dataclass(frozen=True)
class Item:
    """One image to read. `root` is what a mirrored sidecar folder is relative to."""

    key: str
    path: str  # the file, or the tar holding the member
    root: str
    member: str | None = None  # tar member name
    offset: int = -1  # tar member data offset (plain tars)
    size: int = 0
    data: bytes | None = None  # tar member bytes (compressed tars)
    question: str | None = None  # per-image question from a JSONL/CSV list
    origin: str | None = None  # "list.txt:3" for an entry of a list file, named when the file is missing

    @property
    def relpath(self) -> str:
        """Where this item sits below `root`: mirrored by `--sidecar-dir`."""
        if self.member is not None:
            return f"{Path(self.path).name}/{self.member}"
        rel = os.path.relpath(self.path, self.root)
        if rel.startswith(".."):  # listed files outside the list's folder: mirror their absolute path
            rel = os.path.splitdrive(self.path)[1].lstrip("/\\")
        return rel


def expand_braces(pattern: str) -> list[str]:
    """WebDataset-style brace expansion: `a-{000..003}.tar`, `{x,y}.tar`; zero padding follows the first bound."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end() :], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [out for opt in options for out in expand_braces(head + opt + tail)]


def _abs(path: str | os.PathLike[str]) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def _is_tar(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def iter_items(
    inputs: Iterable[str | os.PathLike[str]], recursive: bool = False, not_images: list[str] | None = None
) -> Iterator[Item]:
    """Items from each input in order: a folder, a list file, a tar shard or brace pattern, or an image file.
    The keys of scanned files that are not images (see the accounting rule) are appended to `not_images`."""
    skip = not_images if not_images is not None else []
    for raw in inputs:
        text = os.fspath(raw)
        paths = expand_braces(text) if "{" in text and not os.path.exists(text) else [text]
        for path in paths:
            yield from _items_of(path, recursive, skip)


def looks_like_image(name: str, head: bytes | Callable[[], bytes]) -> bool:
    """The accounting rule's test: an image extension, or an image format's signature in the first bytes (`head`,
    or a function that reads them, called only for names without an image extension)."""
    if is_image_suffix(name):
        return True
    try:
        return sniff_format(head() if callable(head) else head) is not None
    except OSError:
        return True  # unreadable: an item, so that its reason is listed


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEAD_BYTES)


def _items_of(path: str, recursive: bool, not_images: list[str]) -> Iterator[Item]:
    p = Path(path)
    if p.is_dir():
        yield from _folder(p, recursive, not_images)
    elif _is_tar(path):
        if not p.is_file():
            raise ConfigError(f"{path}: no such tar shard")
        yield from _tar(p, not_images)
    elif p.suffix.lower() in LIST_SUFFIXES:
        if not p.is_file():
            raise ConfigError(f"{path}: no such list file")
        yield from _list(p)
    else:
        # A single image, or a path that will fail to load: reported per image, not fatal for the run.
        yield Item(key=_abs(p), path=_abs(p), root=_abs(p.parent))


def _folder(folder: Path, recursive: bool, not_images: list[str]) -> Iterator[Item]:
    root = _abs(folder)
    found = folder.rglob("*") if recursive else folder.iterdir()
    # Sorted, so that batches, and thus the order of the manifest, are the same on every run.
    for p in sorted(f for f in found if f.is_file()):
        if looks_like_image(p.name, lambda p=p: _head(p)):
            yield Item(key=_abs(p), path=_abs(p), root=root)
        else:
            not_images.append(_abs(p))


def _list(path: Path) -> Iterator[Item]:
    """Relative paths in a list are relative to the list file's folder, so a list travels with its images."""
    base = path.parent
    root = _abs(base)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read list file ({e})") from e
    for line_no, entry, question in _list_entries(path, text):
        if not entry:
            raise ConfigError(f"{path}:{line_no}: no image path (expected one of the fields {', '.join(PATH_FIELDS)})")
        full = _abs(base / entry)
        yield Item(key=full, path=full, root=root, question=question or None, origin=f"{path}:{line_no}")


def _list_entries(path: Path, text: str) -> Iterator[tuple[int, str, str | None]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        field = next((f for f in reader.fieldnames or [] if f.lower() in PATH_FIELDS), None)
        if field is None:
            raise ConfigError(f"{path}: no path column (expected one of {', '.join(PATH_FIELDS)})")
        for i, row in enumerate(reader, start=2):
            yield i, (row.get(field) or "").strip(), row.get("question")
        return
    for i, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if suffix != ".jsonl":
            yield i, line, None
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{i}: not valid JSON ({e})") from e
        if isinstance(row, str):
            yield i, row, None
            continue
        entry = next((row[f] for f in PATH_FIELDS if isinstance(row, dict) and isinstance(row.get(f), str)), "")
        yield i, entry.strip(), row.get("question") if isinstance(row, dict) else None


def _tar(path: Path, not_images: list[str]) -> Iterator[Item]:
    full = _abs(path)
    root = _abs(path.parent)
    try:
        plain = tarfile.open(full, "r:")  # noqa: SIM115 - closed below
    except tarfile.ReadError:
        plain = None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read tar shard ({e})") from e
    if plain is not None:
        with plain:
            for info in plain:
                if not info.isfile():
                    continue
                key = f"{full}/{info.name}"
                if looks_like_image(info.name, lambda info=info: plain.extractfile(info).read(HEAD_BYTES)):
                    yield Item(key=key, path=full, root=root, member=info.name, offset=info.offset_data, size=info.size)
                else:
                    not_images.append(key)
        return
    try:  # compressed: no seeking, so stream the bytes along with the item
        with tarfile.open(full, "r:*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                fp = tar.extractfile(info)
                data = fp.read() if fp is not None else b""
                key = f"{full}/{info.name}"
                if looks_like_image(info.name, data[:HEAD_BYTES]):
                    yield Item(key=key, path=full, root=root, member=info.name, data=data)
                else:
                    not_images.append(key)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ConfigError(f"{path}: not a readable tar shard ({e})") from e


def read_item(item: Item, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The item's image, decoded; `ImageError` names the item's key."""
    if item.member is None:
        try:
            return load_image(item.path, max_pixels=max_pixels, name=item.key)
        except ImageError as e:
            if e.kind != "missing" or item.origin is None:
                raise
            raise ImageError(f"{e} (listed at {item.origin})", kind=e.kind) from e
    data = item.data
    if data is None:
        try:
            with open(item.path, "rb") as f:
                f.seek(item.offset)
                data = f.read(item.size)
        except OSError as e:
            raise ImageError(f"{item.key}: unreadable ({e})", kind="unreadable") from e
    return load_image(data, max_pixels=max_pixels, name=item.key)
