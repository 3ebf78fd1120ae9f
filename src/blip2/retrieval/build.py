"""Embed a collection of images into a retrieval `Index` (`blip2 index`), locally or on a Ray cluster.

    m = blip2.load("Salesforce/blip2-itm-vit-g")
    summary = index_images(m, ["photos/"], "photos.sqlite", recursive=True)
    print(summary.line())

Inputs are what batch captioning reads (folders, path lists in txt/JSONL/CSV, WebDataset tars: `blip2.sources`),
decoded ahead of the model in worker processes by the image-map engine (`blip2.imagemap`), as batch captioning does.
Each row is keyed by the item's key (the absolute path, or `tar path/member`) and holds the sha256 of the image bytes,
the size and mtime (a tar member: its size and the tar's mtime) and the (Nq, E) float16 embedding: the same (Nq, E)
normalised query embeddings as `Blip2.embed_images`.

- **Incremental:** an image is embedded only when its key is new or its size or mtime differ from the stored row.
  Files that failed are tried again on every run (they fail cheaply, while decoding), so a repaired file is picked
  up; each failure is kept in the index's `errors` table with its reason and listed in the `Summary`.
- **Pruning, folder inputs only:** rows of files that are gone from a folder given as input are removed (files
  directly in it, or anywhere below it with `recursive`). Entries of list files and tar shards are never pruned: a
  list says what to add, not what exists, so an image dropped from a list stays in the index until its folder is
  indexed or it is removed with `Index.remove`.
- **Resumable:** every batch is one transaction; a killed run loses at most the batch in flight, and a rerun skips
  every image already written.

Ray (`index_images_ray`): the driver lists and filters the inputs exactly as above, `imagemap.ray_map` runs `Embedder`
actors (one model each) over batches of items, and each actor returns an Arrow table with the columns of `row_schema()`
(path, sha256, size, mtime, embedding bytes, error): the layout of a Parquet shard. The driver writes every returned
table straight into the SQLite file, one transaction per table (`import_table`), rather than writing Parquet shards
and importing them afterwards: one file format and one resume rule for both engines, and nothing to clean up.
`import_parquet` imports such tables saved as Parquet, e.g. by a Ray job whose driver cannot reach the index file.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..defaults import BATCH_SIZE, MAX_PIXELS, RAY_NUM_WORKERS
from ..errors import ConfigError
from ..imagemap import Batch, ImageMapActor, default_workers, image_batches, item_row, ray_map
from ..sources import Item, iter_items
from .index import Index, IndexRow

if TYPE_CHECKING:
    from ..pipeline import Blip2

__all__ = [
    "Embedder",
    "Summary",
    "embed_pixels",
    "import_parquet",
    "import_table",
    "index_images",
    "index_images_ray",
    "row_schema",
]

_HASH_CHUNK = 1 << 20


@dataclass
class Summary:
    """What one indexing run did. `errors` are (key, reason) of the files that failed in this run."""

    db: str
    total: int = 0  # distinct images found in the inputs
    embedded: int = 0  # new or changed, embedded and written this run
    unchanged: int = 0  # already in the index with the same size and mtime
    failed: int = 0
    pruned: int = 0  # rows of files gone from a folder input
    not_images: int = 0  # scanned files with no image content and no image extension: counted, not listed
    seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.db}: {self.embedded} embedded, {self.unchanged} unchanged, {self.failed} failed, "
            f"{self.pruned} pruned; {self.total} images in the inputs ({self.seconds:.1f}s)"
            + (
                f"; {self.not_images} not image files skipped (no image content or extension)"
                if self.not_images
                else ""
            )
        )


@dataclass(frozen=True)
class _Todo:
    item: Item
    size: int
    mtime: float


# ---------------------------------------------------------------------------------------------------- shared pieces


@torch.no_grad()
def embed_pixels(m: Blip2, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) preprocessed pixels -> (B, Nq, E) float32 normalised embeddings, as `Blip2.embed_images`."""
    image_embeds = m.model.encode_image(pixels.to(m.device, m.dtype))  # (B, N, Dv)
    return m.model.image_embeddings(image_embeds).float().cpu()


def _stat(item: Item) -> tuple[int, float]:
    """(size, mtime) of an item; (-1, 0.0) when the file is missing (it then fails to decode and is recorded)."""
    try:
        st = os.stat(item.path)
    except OSError:
        return -1, 0.0
    if item.member is None:
        return st.st_size, st.st_mtime
    return (item.size if item.data is None else len(item.data)), st.st_mtime


def sha256_of(item: Item) -> str:
    """Hex sha256 of the item's bytes (the file, or the tar member's bytes)."""
    h = hashlib.sha256()
    if item.data is not None:
        h.update(item.data)
        return h.hexdigest()
    with open(item.path, "rb") as f:
        if item.member is not None:
            f.seek(item.offset)
            h.update(f.read(item.size))
        else:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _unique(items: Iterable[Item]) -> list[Item]:
    seen: set[str] = set()
    out = []
    for item in items:
        if item.key not in seen:
            seen.add(item.key)
            out.append(item)
    return out


def _prune(index: Index, inputs: Sequence[str], recursive: bool, seen: set[str]) -> int:
    """Remove the rows (and error records) under folder inputs whose files were not found by this scan."""
    roots = [os.path.normpath(os.path.abspath(p)) for p in inputs if os.path.isdir(p)]
    if not roots:
        return 0

    def scanned(path: str) -> bool:
        if recursive:
            return any(path.startswith(root + os.sep) for root in roots)
        return os.path.dirname(path) in roots

    stored = index.paths() + [p for p, _, _ in index.errors()]
    return index.remove([p for p in dict.fromkeys(stored) if scanned(p) and p not in seen])


def _plan(index: Index, inputs: Sequence[str], recursive: bool, prune: bool) -> tuple[Summary, list[_Todo]]:
    """List the inputs, prune, and pick the images to embed (new, or size/mtime changed)."""
    not_images: list[str] = []
    items = _unique(iter_items(inputs, recursive, not_images))
    summary = Summary(db=str(index.path), total=len(items), not_images=len(not_images))
    todo = []
    for item in items:
        size, mtime = _stat(item)
        if index.needs_update(item.key, size, mtime):
            todo.append(_Todo(item, size, mtime))
    summary.unchanged = len(items) - len(todo)
    if prune:
        summary.pruned = _prune(index, inputs, recursive, {it.key for it in items})
    return summary, todo


def _fail(index: Index, summary: Summary, key: str, reason: str) -> None:
    index.record_error(key, reason)
    summary.failed += 1
    summary.errors.append((key, reason))


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="img", desc="embedding", dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------- local engine


def index_images(
    m: Blip2,
    inputs: Sequence[str | os.PathLike[str]],
    db: str | os.PathLike[str],
    *,
    recursive: bool = False,
    batch_size: int = BATCH_SIZE,
    workers: int | None = None,
    prune: bool = True,
    progress: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> Summary:
    """Embed the new and changed images of `inputs` into the index `db` (created if missing); see the module doc.

    The index records the model (`m.name`), Nq and E; reopening it with another model raises `IndexFileError`.
    `workers` decoding processes (default: cores - 1, at most 8; 0 decodes in this process).
    """
    m.require_text_side()
    start = time.perf_counter()
    paths = [os.fspath(p) for p in inputs]
    cfg = m.config
    with Index(db, dim=cfg.image_text_hidden_size, num_query=cfg.num_query_tokens, model=m.name or None) as index:
        summary, todo = _plan(index, paths, recursive, prune)
        if todo:
            _embed_local(
                m,
                index,
                todo,
                summary,
                batch_size,
                default_workers() if workers is None else workers,
                max_pixels,
                progress,
            )
    summary.seconds = time.perf_counter() - start
    return summary


def _embed_local(
    m: Blip2,
    index: Index,
    todo: list[_Todo],
    summary: Summary,
    batch_size: int,
    workers: int,
    max_pixels: int,
    progress: bool,
) -> None:
    stat = {t.item.key: t for t in todo}
    # Failures do not cut a batch short: every batch the model sees is full, as it was before any failed.
    batches = image_batches((t.item for t in todo), m.transform, max_pixels, batch_size, workers, short_batches=False)
    with _progress(len(todo), progress) as bar:
        for batch in batches:
            for item, reason in batch.failures:
                _fail(index, summary, item.key, reason)
            if batch.items:
                _write_batch(m, index, batch, stat, summary)
            bar.update(len(batch))


def _write_batch(m: Blip2, index: Index, batch: Batch, stat: dict[str, _Todo], summary: Summary) -> None:
    """Embed one batch and write it in one transaction (the unit a killed run can lose)."""
    emb = embed_pixels(m, batch.pixels)  # (B, Nq, E)
    rows = []
    for item, e in zip(batch.items, emb, strict=True):
        t = stat[item.key]
        try:
            digest = sha256_of(item)
        except OSError as err:  # gone between decoding and hashing
            _fail(index, summary, item.key, f"{item.key}: unreadable ({err})")
            continue
        rows.append(IndexRow(item.key, e, digest, t.size, t.mtime))
    summary.embedded += index.add_many(rows)


# ---------------------------------------------------------------------------------------------------- Ray engine


def row_schema() -> Any:
    """Arrow schema of embedded rows (Ray actor output, Parquet shards); `embedding` is float16 (Nq, E) bytes."""
    import pyarrow as pa

    return pa.schema(
        [
            ("path", pa.string()),
            ("sha256", pa.string()),
            ("size", pa.int64()),
            ("mtime", pa.float64()),
            ("embedding", pa.binary()),
            ("error", pa.string()),
        ]
    )


class Embedder(ImageMapActor):
    """A Ray Data actor: one loaded model; a pyarrow batch of item rows in, a `row_schema()` table out."""

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        b = self.decode(batch)
        out = [
            {
                "path": it.key,
                "sha256": None,
                "size": row["stat_size"],
                "mtime": row["stat_mtime"],
                "embedding": None,
                "error": error,
            }
            for it, row, error in zip(b.items, b.rows, b.errors, strict=True)
        ]
        if b.good:
            emb = embed_pixels(self.m, b.pixels)  # (B, Nq, E)
            for i, e in zip(b.good, emb.numpy().astype(np.float16), strict=True):
                try:
                    out[i].update(sha256=sha256_of(b.items[i]), embedding=e.tobytes())
                except OSError as err:
                    out[i].update(error=f"{b.items[i].key}: unreadable ({err})")
        return pa.Table.from_pylist(out, schema=row_schema())


def import_table(index: Index, table: Any, summary: Summary | None = None) -> int:
    """Write a `row_schema()` table into the index in one transaction: rows with an error are recorded as failed."""
    summary = summary if summary is not None else Summary(db=str(index.path))
    rows = []
    for r in table.to_pylist():
        if r["error"] is not None or r["embedding"] is None:
            _fail(index, summary, r["path"], r["error"] or f"{r['path']}: no embedding")
            continue
        emb = np.frombuffer(r["embedding"], dtype=np.float16)
        if emb.size != index.num_query * index.dim:
            raise ConfigError(
                f"{r['path']}: embedding of {emb.size} values, index {index.path} holds "
                f"({index.num_query}, {index.dim}); was it embedded with another model?"
            )
        rows.append(IndexRow(r["path"], emb.reshape(index.num_query, index.dim), r["sha256"], r["size"], r["mtime"]))
    added = index.add_many(rows)
    summary.embedded += added
    return added


def import_parquet(index: Index, files: Iterable[str | os.PathLike[str]]) -> Summary:
    """Import Parquet shards of `row_schema()` rows into an open index, one transaction per shard."""
    import pyarrow.parquet as pq

    summary = Summary(db=str(index.path))
    for f in files:
        import_table(index, pq.read_table(f, schema=row_schema()), summary)
        summary.total = summary.embedded + summary.failed
    return summary


def _model_dims(model: str) -> tuple[int, int]:
    """(E, Nq) from the checkpoint's config.json, without loading the weights on the driver."""
    from ..checkpoint import resolve
    from ..config import Blip2Config

    cfg = Blip2Config.from_json_file(resolve(model) / "config.json")
    if not cfg.has_text_side:
        raise ConfigError(f"{model}: this checkpoint has no Q-Former text side (use e.g. blip2-itm-vit-g)")
    return cfg.image_text_hidden_size, cfg.num_query_tokens


def index_images_ray(
    model: str,
    inputs: Sequence[str | os.PathLike[str]],
    db: str | os.PathLike[str],
    *,
    recursive: bool = False,
    batch_size: int = BATCH_SIZE,
    prune: bool = True,
    address: str | None = None,
    num_workers: int = RAY_NUM_WORKERS,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> Summary:
    """`index_images` with an actor pool of `num_workers` models on a Ray cluster (joined at `address`, or local).

    `model` is a Hub id or a folder every node can read; so are the images (a shared filesystem).
    """
    start = time.perf_counter()
    dim, num_query = _model_dims(model)
    paths = [os.fspath(p) for p in inputs]
    with Index(db, dim=dim, num_query=num_query, model=str(model)) as index:
        summary, todo = _plan(index, paths, recursive, prune)
        if todo:
            actor = {
                "model": os.path.abspath(model) if os.path.isdir(model) else model,
                "device": device,
                "dtype": dtype,
                "max_pixels": max_pixels,
            }
            for table in _ray_tables(todo, actor, address, max(1, num_workers), max(1, batch_size), progress):
                import_table(index, table, summary)
    summary.seconds = time.perf_counter() - start
    return summary


def _ray_tables(
    todo: list[_Todo], actor: dict[str, Any], address: str | None, num_workers: int, bs: int, progress: bool
) -> Iterable[Any]:
    rows = [{**item_row(t.item), "stat_size": t.size, "stat_mtime": t.mtime} for t in todo]
    with _progress(len(rows), progress) as bar:
        for table in ray_map(rows, Embedder, actor, address=address, num_workers=num_workers, batch_size=bs):
            yield table
            bar.update(table.num_rows)
