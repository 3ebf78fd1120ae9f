"""Embed a collection of images into a retrieval `Index` (`blip2 index`), locally or on a Ray cluster.

    m = blip2.load("Salesforce/blip2-itm-vit-g")
    summary = index_images(m, ["photos/"], "photos.sqlite", recursive=True)
    print(summary.line())

Inputs are what batch captioning reads (folders, path lists in txt/JSONL/CSV, WebDataset tars: `iter_items`), decoded
ahead of the model in worker processes (`decoded`). Each row is keyed by the item's key (the absolute path, or
`tar path/member`) and holds the sha256 of the image bytes, the size and mtime (a tar member: its size and the tar's
mtime) and the (Nq, E) float16 embedding: the same (Nq, E) normalised query embeddings as `Blip2.embed_images`.

- **Incremental:** an image is embedded only when its key is new or its size or mtime differ from the stored row.
  Files that failed are tried again on every run (they fail cheaply, while decoding), so a repaired file is picked
  up; each failure is kept in the index's `errors` table with its reason and listed in the `Summary`.
- **Pruning, folder inputs only:** rows of files that are gone from a folder given as input are removed (files
  directly in it, or anywhere below it with `recursive`). Entries of list files and tar shards are never pruned: a
  list says what to add, not what exists, so an image dropped from a list stays in the index until its folder is
  indexed or it is removed with `Index.remove`.
- **Resumable:** every batch is one transaction; a killed run loses at most the batch in flight, and a rerun skips
  every image already written.

Ray (`index_images_ray`): the driver lists and filters the inputs exactly as above, Ray Data runs `Embedder` actors
(one model each) over batches of items, and each actor returns an Arrow table with the columns of `row_schema()`
(path, sha256, size, mtime, embedding bytes, error): the layout of a Parquet shard. The driver writes every returned
table straight into the SQLite file, one transaction per table (`import_table`), rather than writing Parquet shards
and importing them afterwards: one file format and one resume rule for both engines, and nothing to clean up.
`import_parquet` imports such tables saved as Parquet, e.g. by a Ray job whose driver cannot reach the index file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..batch.decode import decoded, default_workers
from ..batch.inputs import Item, iter_items, prepare
from ..errors import ConfigError
from ..processing import DEFAULT_MAX_PIXELS
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

ITEM_FIELDS = tuple(f.name for f in dataclasses.fields(Item))
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
    batch_size: int = 8,
    workers: int | None = None,
    prune: bool = True,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
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
    bs = max(1, batch_size)
    stat = {t.item.key: t for t in todo}
    window = max(2 * bs, 2 * workers * bs)  # enough decoded images for the next batch or two, per worker
    batch: list[tuple[_Todo, np.ndarray]] = []
    with _progress(len(todo), progress) as bar:
        for item, pixels in decoded((t.item for t in todo), m.transform, max_pixels, workers, window):
            if isinstance(pixels, str):
                _fail(index, summary, item.key, pixels)
                bar.update(1)
                continue
            batch.append((stat[item.key], pixels))
            if len(batch) >= bs:
                _write_batch(m, index, batch, summary)
                bar.update(len(batch))
                batch = []
        if batch:
            _write_batch(m, index, batch, summary)
            bar.update(len(batch))


def _write_batch(m: Blip2, index: Index, batch: list[tuple[_Todo, np.ndarray]], summary: Summary) -> None:
    """Embed one batch and write it in one transaction (the unit a killed run can lose)."""
    emb = embed_pixels(m, torch.from_numpy(np.stack([px for _, px in batch])))  # (B, Nq, E)
    rows = []
    for (t, _), e in zip(batch, emb, strict=True):
        try:
            digest = sha256_of(t.item)
        except OSError as err:  # gone between decoding and hashing
            _fail(index, summary, t.item.key, f"{t.item.key}: unreadable ({err})")
            continue
        rows.append(IndexRow(t.item.key, e, digest, t.size, t.mtime))
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


class Embedder:
    """A Ray Data actor: one loaded model; a pyarrow batch of item rows in, a `row_schema()` table out."""

    def __init__(self, model: str, device: str, dtype: str, max_pixels: int, threads: int = 4) -> None:
        from ..pipeline import load

        self.m = load(model, device=device, dtype=dtype)
        self.max_pixels = max_pixels
        self.pool = ThreadPoolExecutor(max(1, threads))  # PIL releases the GIL while decoding

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.to_pylist()
        items = [Item(**{f: row[f] for f in ITEM_FIELDS}) for row in rows]
        prepared = list(self.pool.map(lambda it: prepare(it, self.m.transform, self.max_pixels), items))
        out = [
            {
                "path": it.key,
                "sha256": None,
                "size": row["stat_size"],
                "mtime": row["stat_mtime"],
                "embedding": None,
                "error": px if isinstance(px, str) else None,
            }
            for it, row, px in zip(items, rows, prepared, strict=True)
        ]
        good = [i for i, px in enumerate(prepared) if not isinstance(px, str)]
        if good:
            emb = embed_pixels(self.m, torch.from_numpy(np.stack([prepared[i] for i in good])))  # (B, Nq, E)
            for i, e in zip(good, emb.numpy().astype(np.float16), strict=True):
                try:
                    out[i].update(sha256=sha256_of(items[i]), embedding=e.tobytes())
                except OSError as err:
                    out[i].update(error=f"{items[i].key}: unreadable ({err})")
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
    batch_size: int = 8,
    prune: bool = True,
    address: str | None = None,
    num_workers: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
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
    import ray

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    if actor["device"] == "auto":
        actor = {**actor, "device": "cuda" if gpus >= 1 else "cpu"}
    rows = [{**{f: getattr(t.item, f) for f in ITEM_FIELDS}, "stat_size": t.size, "stat_mtime": t.mtime} for t in todo]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // bs)))
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs=actor,
        batch_size=bs,
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_gpus=1 if gpus >= 1 else 0,
        num_cpus=1,
        batch_format="pyarrow",
    )
    with _progress(len(rows), progress) as bar:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield table
            bar.update(table.num_rows)
