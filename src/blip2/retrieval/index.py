"""A retrieval index of image embeddings: one SQLite file plus a memory-mapped float16 cache beside it.

The SQLite file (WAL mode) is the truth: a `meta` table (model id, dim, num_query, format version, a random uid
and a generation counter bumped by every change), an `images` table (id, path UNIQUE, sha256 of the bytes, size,
mtime, the float16 bytes of the (Nq, D) embedding, time added) and an `errors` table (path, reason, time).
Every write is one transaction, so a killed process loses at most the batch it was writing and never corrupts
the file.

Searching reads a sidecar cache `<db>.emb` with all embeddings contiguous, rebuilt lazily when its generation is
not the database's, and memory-mapped, so 100k images (1.6 GB at Nq=32, D=256) are scanned without copying them
into Python objects. Layout (little-endian):

    [0, 128)          header: magic b"BLIP2EMB", u32 version, u32 0, i64 generation, i64 n, i64 num_query,
                      i64 dim, 32 bytes uid (ascii hex), zero padding
    [128, ...)        ids      int64   (n,)            the `images.id` of each row, ascending
    64-byte aligned   emb      float16 (n, Nq, D)      the stored embeddings
    64-byte aligned   mean     float16 (n, D)          L2-normalised mean over the Nq query vectors

The cache is written to a temporary name and renamed (`durable.atomic_path`), so readers see an old or a new
file, never a torn one.

With faiss installed, exact text search also keeps `<db>.i8`, an int8 copy of the embeddings that pre-filters the
scan with a proven error bound (its format in int8file.py, the bound in `scoring.Int8Search`); an index without
it (older, or made without faiss) just builds it on the first search.

Image-to-image search uses the mean-pooled query vectors: similarity = cosine of the L2-normalised means. The
alternative, max over the Nq x Nq query pairs, costs Nq times more (about 26 GFLOP for 100k images) for no
established gain; the mean is the usual BLIP-2 global image feature.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from blip2.defaults import TOP_K
from blip2.durable import atomic_path
from blip2.errors import Blip2Error
from blip2.retrieval.int8file import load_int8, write_int8
from blip2.retrieval.scoring import EmbeddingShapeError, Int8Search, int8_kernel_is_exact, search_blocks

__all__ = ["FORMAT_VERSION", "Hit", "Index", "IndexFileError", "IndexRow", "OptionalDependencyError"]

FORMAT_VERSION = 1
_CACHE_MAGIC = b"BLIP2EMB"
_CACHE_VERSION = 1
_HEADER = struct.Struct("<8sIIqqqq32s")  # packed into the first 128 bytes
_HEADER_SIZE = 128
_FAISS_MAGIC = b"BLIP2FAI"
_FAISS_HEADER = struct.Struct("<8sq32s")
_BLOCK_ROWS = 4096  # images per scanned block: 64 MB of float16 at Nq=32, D=256
_READ_ROWS = 1024  # rows per SQLite fetch while rebuilding the cache

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    embedding BLOB NOT NULL,
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS errors (path TEXT PRIMARY KEY, reason TEXT NOT NULL, time REAL NOT NULL);
"""


class IndexFileError(Blip2Error):
    """An index file is missing, corrupt, of another format, or built for another model/dim."""


class OptionalDependencyError(Blip2Error, ImportError):
    """An optional package (e.g. faiss) is needed for what was asked."""


class UnknownImageError(Blip2Error, KeyError):
    """An image id is not in the index."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Hit:
    """One search result: the image path, its similarity score and its row id."""

    path: str
    score: float
    id: int


class IndexRow(NamedTuple):
    """One image to add: its path, (Nq, D) embedding, sha256 of its bytes, size in bytes and mtime."""

    path: str | os.PathLike[str]
    emb: Any  # (Nq, D) torch.Tensor or numpy array
    sha256: str
    size: int
    mtime: float


class _Cache(NamedTuple):
    generation: int
    ids: np.ndarray  # (n,) int64
    emb: np.ndarray  # (n, Nq, D) float16, memory-mapped
    mean: np.ndarray  # (n, D) float16, memory-mapped


def _align(offset: int) -> int:
    return (offset + 63) // 64 * 64


def _cache_layout(n: int, num_query: int, dim: int) -> tuple[int, int, int]:
    """Byte offsets of emb and mean, and the total file size."""
    emb_off = _align(_HEADER_SIZE + 8 * n)
    mean_off = _align(emb_off + 2 * n * num_query * dim)
    return emb_off, mean_off, mean_off + 2 * n * dim


def _mean_pooled(emb: np.ndarray) -> np.ndarray:
    """(n, Nq, D) float16 -> (n, D) float16 unit vectors (zero rows stay zero)."""
    mean = emb.astype(np.float32).mean(axis=1)  # (n, D)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    return (mean / np.maximum(norm, 1e-12)).astype(np.float16)


class Index:
    """Image embeddings in an SQLite file, searched exactly (or approximately with faiss) by ITC similarity.

    Creating a new index needs `dim` and `num_query`; reopening checks any of `dim`, `num_query`, `model` that
    are given against the file and raises `IndexFileError` naming the file and the mismatch. Paths are stored as
    given (`str(path)`), so use one convention (e.g. absolute) for `add`, `needs_update` and `prune`.
    """

    def __init__(
        self, path: str | Path, *, dim: int | None = None, num_query: int | None = None, model: str | None = None
    ) -> None:
        self.path = Path(path)
        self.cache_path = self.path.with_name(self.path.name + ".emb")
        self.faiss_path = self.path.with_name(self.path.name + ".faiss")
        self.int8_path = self.path.with_name(self.path.name + ".i8")
        self._cache: _Cache | None = None
        self._faiss: tuple[int, Any] | None = None
        self._int8: tuple[int, Int8Search | None] | None = None
        if self.path.is_dir():
            raise IndexFileError(f"{self.path}: is a directory, not an index file")
        existed = self.path.exists() and self.path.stat().st_size > 0
        if not existed and (dim is None or num_query is None):  # checked before sqlite creates the file
            raise IndexFileError(f"{self.path}: does not exist; creating an index needs dim and num_query")
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=60.0)
        except sqlite3.Error as e:
            raise IndexFileError(f"{self.path}: cannot open index: {e}") from None
        try:
            with self._guard("cannot open index"):
                self._open(existed, dim, num_query, model)
        except BaseException:
            self._conn.close()
            raise

    # ------------------------------------------------------------------ opening

    def _open(self, existed: bool, dim: int | None, num_query: int | None, model: str | None) -> None:
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process kills
        has_meta = self._conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        if not has_meta:
            if existed:
                raise IndexFileError(f"{self.path}: is an SQLite database but not a blip2 index (no meta table)")
            if dim is None or num_query is None:
                raise IndexFileError(f"{self.path}: does not exist; creating an index needs dim and num_query")
            self._create(dim, num_query, model)
        meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise IndexFileError(
                f"{self.path}: index format version {meta.get('format_version')!r}, this blip2 reads {FORMAT_VERSION}"
            )
        self.dim, self.num_query = int(meta["dim"]), int(meta["num_query"])
        self.model: str | None = meta.get("model") or None
        self._uid = meta["uid"]
        wanted = {"dim": dim, "num_query": num_query, "model": model}
        found = {"dim": self.dim, "num_query": self.num_query, "model": self.model}
        for key, value in wanted.items():
            # an index created without a model id accepts any model
            if value is not None and found[key] is not None and value != found[key]:
                raise IndexFileError(
                    f"{self.path}: index was built with {key}={found[key]!r}, but {key}={value!r} was asked for"
                )

    def _create(self, dim: int, num_query: int, model: str | None) -> None:
        if dim < 1 or num_query < 1:
            raise IndexFileError(f"{self.path}: dim and num_query must be >= 1, got dim={dim} num_query={num_query}")
        with self._write():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            rows = [
                ("format_version", str(FORMAT_VERSION)),
                ("model", model or ""),
                ("dim", str(dim)),
                ("num_query", str(num_query)),
                ("uid", uuid.uuid4().hex),
                ("generation", "0"),
            ]
            # OR IGNORE: a process racing to create the same file keeps the first one's meta
            self._conn.executemany("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", rows)

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn SQLite errors (corrupt file, locked, disk full) into IndexFileError naming the file."""
        try:
            yield
        except sqlite3.Error as e:
            raise IndexFileError(f"{self.path}: {what}: {e}") from None

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction that bumps the generation; rolled back on any error."""
        with self._guard("write failed"):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close the database; the object is unusable afterwards."""
        self._cache = None
        self._faiss = None
        self._int8 = None
        self._conn.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, dim={self.dim}, num_query={self.num_query}, model={self.model!r})"

    # ------------------------------------------------------------------ writing

    def _blob(self, path: str, emb: Any) -> bytes:
        arr = emb.detach().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb)
        if arr.shape != (self.num_query, self.dim):
            raise EmbeddingShapeError(
                f"{path}: embedding shape {arr.shape}, index {self.path} holds ({self.num_query}, {self.dim})"
            )
        arr16 = np.ascontiguousarray(arr, dtype=np.float16)
        if not np.isfinite(arr16).all():
            raise EmbeddingShapeError(f"{path}: embedding has NaN or infinite values (as float16)")
        return arr16.tobytes()

    def add(self, path: str | os.PathLike[str], emb: Any, *, sha256: str, size: int, mtime: float) -> None:
        """Add or replace one image; `emb` is (Nq, D). One transaction."""
        self.add_many([IndexRow(path, emb, sha256, size, mtime)])

    def add_many(self, rows: Iterable[IndexRow | tuple[Any, ...]]) -> int:
        """Add or replace many images in one transaction (call once per batch). Returns the number of rows.

        An image already present (same path) is replaced in place and keeps its id; its error record, if any,
        is dropped.
        """
        now = time.time()
        params = []
        for row in rows:
            r = IndexRow(*row)
            path = str(r.path)
            params.append((path, r.sha256, int(r.size), float(r.mtime), self._blob(path, r.emb), now))
        if not params:
            return 0
        with self._write():
            self._conn.executemany(
                "INSERT INTO images (path, sha256, size, mtime, embedding, added) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(path) DO UPDATE SET sha256=excluded.sha256, size=excluded.size, "
                "mtime=excluded.mtime, embedding=excluded.embedding, added=excluded.added",
                params,
            )
            self._conn.executemany("DELETE FROM errors WHERE path = ?", [(p[0],) for p in params])
        return len(params)

    def remove(self, paths: Iterable[str | os.PathLike[str]]) -> int:
        """Remove images (and their error records) by path. Returns how many images were removed."""
        keys = [(str(p),) for p in paths]
        if not keys:
            return 0
        with self._write():
            before = self._conn.total_changes
            self._conn.executemany("DELETE FROM images WHERE path = ?", keys)
            removed = self._conn.total_changes - before
            self._conn.executemany("DELETE FROM errors WHERE path = ?", keys)
        return removed

    def prune(self, existing_paths: Iterable[str | os.PathLike[str]]) -> int:
        """Drop the rows (and error records) of every path not in `existing_paths`. Returns images removed."""
        keep = {str(p) for p in existing_paths}
        with self._guard("read failed"):
            stored = [p for (p,) in self._conn.execute("SELECT path FROM images")]
            failed = [p for (p,) in self._conn.execute("SELECT path FROM errors")]
        gone = [p for p in stored if p not in keep]
        gone_errors = [(p,) for p in failed if p not in keep]
        removed = self.remove(gone)
        if gone_errors:
            with self._write():
                self._conn.executemany("DELETE FROM errors WHERE path = ?", gone_errors)
        return removed

    def record_error(self, path: str | os.PathLike[str], reason: str) -> None:
        """Remember that a file failed (unreadable, not an image); replaces an earlier record for the path."""
        with self._guard("write failed"):
            self._conn.execute(
                "INSERT OR REPLACE INTO errors (path, reason, time) VALUES (?, ?, ?)", (str(path), reason, time.time())
            )

    # ------------------------------------------------------------------ reading

    def needs_update(self, path: str | os.PathLike[str], size: int, mtime: float) -> bool:
        """True when the path is not indexed or its size or mtime changed since it was."""
        with self._guard("read failed"):
            row = self._conn.execute("SELECT size, mtime FROM images WHERE path = ?", (str(path),)).fetchone()
        return row is None or row[0] != int(size) or row[1] != float(mtime)

    def __len__(self) -> int:
        with self._guard("read failed"):
            return int(self._conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def paths(self) -> list[str]:
        """All indexed paths, in id order."""
        with self._guard("read failed"):
            return [p for (p,) in self._conn.execute("SELECT path FROM images ORDER BY id")]

    def errors(self) -> list[tuple[str, str, float]]:
        """(path, reason, time) of every file recorded as failed."""
        with self._guard("read failed"):
            return list(self._conn.execute("SELECT path, reason, time FROM errors ORDER BY path"))

    @property
    def generation(self) -> int:
        """Counter bumped by every change of the images; the cache is valid for one generation."""
        with self._guard("read failed"):
            return int(self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def _decode(self, blob: bytes) -> np.ndarray:
        if len(blob) != 2 * self.num_query * self.dim:
            raise IndexFileError(
                f"{self.path}: stored embedding has {len(blob)} bytes, expected {2 * self.num_query * self.dim}"
            )
        return np.frombuffer(blob, dtype=np.float16).reshape(self.num_query, self.dim)

    def embeddings(self, ids: Sequence[int]) -> np.ndarray:
        """float16 (len(ids), Nq, D) embeddings of the given row ids, in that order."""
        out = np.empty((len(ids), self.num_query, self.dim), dtype=np.float16)
        with self._guard("read failed"):
            for i, row_id in enumerate(ids):
                row = self._conn.execute("SELECT embedding FROM images WHERE id = ?", (int(row_id),)).fetchone()
                if row is None:
                    raise UnknownImageError(f"{self.path}: no image with id {row_id}")
                out[i] = self._decode(row[0])
        return out

    def _hits(self, pairs: list[tuple[int, float]]) -> list[Hit]:
        """(id, score) -> Hit, dropping ids removed since the cache was built."""
        if not pairs:
            return []
        ids = [i for i, _ in pairs]
        paths: dict[int, str] = {}
        with self._guard("read failed"):
            for start in range(0, len(ids), 10_000):  # stay under SQLite's bound-variable limit
                chunk = ids[start : start + 10_000]
                marks = ",".join("?" * len(chunk))
                paths.update(self._conn.execute(f"SELECT id, path FROM images WHERE id IN ({marks})", chunk))
        return [Hit(paths[i], s, i) for i, s in pairs if i in paths]

    # ------------------------------------------------------------------ cache

    def _load_cache(self, generation: int) -> _Cache | None:
        """Map the cache file if it is this database's, at this generation, and whole; else None."""
        try:
            with open(self.cache_path, "rb") as f:
                head = f.read(_HEADER_SIZE)
            file_size = self.cache_path.stat().st_size
        except OSError:
            return None
        if len(head) < _HEADER.size:
            return None
        magic, version, _, gen, n, nq, dim, uid = _HEADER.unpack_from(head)
        if (magic, version, gen, nq, dim, uid) != (
            _CACHE_MAGIC,
            _CACHE_VERSION,
            generation,
            self.num_query,
            self.dim,
            self._uid.encode(),
        ):
            return None
        emb_off, mean_off, size = _cache_layout(n, nq, dim)
        if file_size != size:
            return None
        if n == 0:
            return _Cache(
                gen, np.empty(0, np.int64), np.empty((0, nq, dim), np.float16), np.empty((0, dim), np.float16)
            )
        # mode "c" (copy-on-write) gives writable arrays that torch.from_numpy accepts; the file is never written
        ids = np.memmap(self.cache_path, dtype=np.int64, mode="c", offset=_HEADER_SIZE, shape=(n,))
        emb = np.memmap(self.cache_path, dtype=np.float16, mode="c", offset=emb_off, shape=(n, nq, dim))
        mean = np.memmap(self.cache_path, dtype=np.float16, mode="c", offset=mean_off, shape=(n, dim))
        return _Cache(gen, ids, emb, mean)

    def _write_cache(self) -> None:
        """Write the cache from one consistent snapshot of the database, then rename it into place."""
        with self._guard("cache rebuild failed"):
            self._conn.execute("BEGIN")  # one read snapshot: generation, count and rows agree
            try:
                gen = int(self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
                n = int(self._conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])
                emb_off, mean_off, size = _cache_layout(n, self.num_query, self.dim)
                header = _HEADER.pack(
                    _CACHE_MAGIC, _CACHE_VERSION, 0, gen, n, self.num_query, self.dim, self._uid.encode()
                )
                try:
                    # a cache, checked against the database when mapped (no fsync); several processes may build it
                    with atomic_path(self.cache_path, fsync=False, unique=True) as tmp:
                        with open(tmp, "wb") as f:
                            f.write(header.ljust(_HEADER_SIZE, b"\0"))
                            f.truncate(size)
                        if n:
                            self._fill_cache(tmp, n, emb_off, mean_off)
                except OSError as e:
                    raise IndexFileError(f"{self.cache_path}: cannot write the search cache: {e}") from None
            finally:
                self._conn.execute("COMMIT")

    def _fill_cache(self, tmp: Path, n: int, emb_off: int, mean_off: int) -> None:
        nq, dim = self.num_query, self.dim
        ids = np.memmap(tmp, dtype=np.int64, mode="r+", offset=_HEADER_SIZE, shape=(n,))
        emb = np.memmap(tmp, dtype=np.float16, mode="r+", offset=emb_off, shape=(n, nq, dim))
        mean = np.memmap(tmp, dtype=np.float16, mode="r+", offset=mean_off, shape=(n, dim))
        cur = self._conn.execute("SELECT id, embedding FROM images ORDER BY id")
        start = 0
        while rows := cur.fetchmany(_READ_ROWS):
            stop = start + len(rows)
            if stop > n:
                raise IndexFileError(f"{self.path}: more rows than counted while building the cache")
            ids[start:stop] = [r[0] for r in rows]
            block = np.stack([self._decode(r[1]) for r in rows])  # (b, Nq, D)
            emb[start:stop] = block
            mean[start:stop] = _mean_pooled(block)
            start = stop
        for arr in (ids, emb, mean):
            arr.flush()
        del ids, emb, mean

    def _current_cache(self) -> _Cache:
        """The memory-mapped cache at the database's current generation, rebuilt when stale."""
        generation = self.generation
        if self._cache is not None and self._cache.generation == generation:
            return self._cache
        self._cache = self._int8 = None  # drop the old maps before the files are replaced
        cache = self._load_cache(generation)
        if cache is None:
            self._write_cache()
            cache = self._load_cache(self.generation)
        if cache is None:  # changed again while we built it: use whatever generation the file holds
            cache = self._load_cache(self._cache_file_generation())
        if cache is None:
            raise IndexFileError(f"{self.cache_path}: search cache could not be built or read")
        self._cache = cache
        return cache

    def _cache_file_generation(self) -> int:
        try:
            with open(self.cache_path, "rb") as f:
                return int(_HEADER.unpack_from(f.read(_HEADER.size))[3])
        except (OSError, struct.error):
            return -1

    # ------------------------------------------------------------------ searching

    @staticmethod
    def _blocks(ids: np.ndarray, emb: np.ndarray, rows: int = _BLOCK_ROWS) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for start in range(0, len(ids), rows):
            yield ids[start : start + rows], torch.from_numpy(emb[start : start + rows])

    def search(
        self, text_emb: Any, k: int = TOP_K, *, approximate: bool = False, candidates: int | None = None
    ) -> list[list[Hit]]:
        """Top-k images for each text by ITC similarity (max over query vectors), best first.

        text_emb: (D,) or (Nt, D). Returns one list of hits per text (one list for a (D,) vector).
        Exact by default: the same top-k as brute force over the stored float16 embeddings, found through an int8
        pre-filter with a proven error bound when faiss is installed (see `scoring.Int8Search`), else by a
        blocked scan. `approximate=True` asks faiss (optional,
        `pip install faiss-cpu`) for `candidates` images (default max(10k, 200)) by their mean-pooled vectors
        and re-scores those exactly; faster on very large indexes, but may miss images whose best query
        vector matches the text while their mean does not.
        """
        texts = torch.as_tensor(np.asarray(text_emb) if not isinstance(text_emb, torch.Tensor) else text_emb)
        texts = texts.float()[None] if texts.ndim == 1 else texts.float()  # (Nt, D)
        if texts.ndim != 2 or texts.shape[1] != self.dim:
            raise EmbeddingShapeError(f"text embedding shape {tuple(texts.shape)}, index {self.path} has D={self.dim}")
        cache = self._current_cache()
        if len(cache.ids) == 0:
            return [[] for _ in range(texts.shape[0])]
        if approximate:
            return self._search_approximate(cache, texts, k, candidates or max(10 * k, 200))
        fast = self._int8_search(cache)
        results = fast.search(texts, k) if fast is not None else [None] * len(texts)
        rest = [j for j, r in enumerate(results) if r is None]  # not certified by the pre-filter: scan them
        if rest:
            for j, r in zip(rest, search_blocks(texts[rest], self._blocks(cache.ids, cache.emb), k), strict=True):
                results[j] = r
        return [self._hits(r) for r in results]

    def search_by_image(self, image_emb: Any, k: int = TOP_K) -> list[Hit]:
        """Top-k images most like an image embedding (Nq, D): cosine of the L2-normalised mean query vectors."""
        img = torch.as_tensor(np.asarray(image_emb) if not isinstance(image_emb, torch.Tensor) else image_emb)
        if tuple(img.shape) != (self.num_query, self.dim):
            raise EmbeddingShapeError(
                f"image embedding shape {tuple(img.shape)}, index {self.path} holds ({self.num_query}, {self.dim})"
            )
        query = img.float().mean(dim=0)  # (D,)
        query = query / query.norm().clamp_min(1e-12)
        cache = self._current_cache()
        if len(cache.ids) == 0:
            return []
        # the means are (n, D); seen as (n, 1, D) they are one-query images for the same exact search
        return self._hits(search_blocks(query, self._blocks(cache.ids, cache.mean[:, None, :]), k))

    # ------------------------------------------------------------------ exact int8 pre-filter (faiss)

    def _int8_search(self, cache: _Cache) -> Int8Search | None:
        """The int8 pre-filter of this cache generation, loaded from `<db>.i8` or built; None without faiss."""
        if self._int8 is not None and self._int8[0] == cache.generation:
            return self._int8[1]
        search = None
        if len(cache.ids) and int8_kernel_is_exact(self.dim):  # False without faiss
            shape = (len(cache.ids), self.num_query, self.dim)
            loaded = load_int8(self.int8_path, self._uid, cache.generation, *shape) or write_int8(
                self.int8_path, self._uid, cache.generation, cache.emb
            )
            search = Int8Search(*loaded, cache.emb, cache.ids)
        self._int8 = (cache.generation, search)
        return search

    # ------------------------------------------------------------------ approximate (faiss)

    def _search_approximate(self, cache: _Cache, texts: torch.Tensor, k: int, candidates: int) -> list[list[Hit]]:
        index = self._faiss_index(cache)
        n = len(cache.ids)
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = max(candidates, 64)
        _, rows = index.search(np.ascontiguousarray(texts.numpy(), dtype=np.float32), min(candidates, n))
        out = []
        for text, row in zip(texts, rows, strict=True):
            pos = np.unique(row[row >= 0])  # (c,) sorted positions in the cache
            block = [(cache.ids[pos], torch.from_numpy(cache.emb[pos]))]
            out.append(self._hits(search_blocks(text, block, k)))
        return out

    def _faiss_index(self, cache: _Cache) -> Any:
        """A faiss inner-product index over the mean-pooled vectors: loaded from `<db>.faiss` or built."""
        try:
            import faiss
        except ImportError:
            raise OptionalDependencyError(
                "approximate search needs faiss, which is not installed: pip install faiss-cpu"
            ) from None
        if self._faiss is not None and self._faiss[0] == cache.generation:
            return self._faiss[1]
        index = self._load_faiss(faiss, cache.generation)
        if index is None:
            mean = np.ascontiguousarray(cache.mean, dtype=np.float32)  # (n, D)
            if len(mean) <= 20_000:  # small: a flat scan is fast and exact over the means
                index = faiss.IndexFlatIP(self.dim)
            else:
                index = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
            index.add(mean)
            header = _FAISS_HEADER.pack(_FAISS_MAGIC, cache.generation, self._uid.encode())
            with suppress(OSError), atomic_path(self.faiss_path, fsync=False, unique=True) as tmp:
                tmp.write_bytes(header + faiss.serialize_index(index).tobytes())  # a cache: search works without it
        self._faiss = (cache.generation, index)
        return index

    def _load_faiss(self, faiss: Any, generation: int) -> Any:
        try:
            data = self.faiss_path.read_bytes()
        except OSError:
            return None
        if len(data) < _FAISS_HEADER.size:
            return None
        magic, gen, uid = _FAISS_HEADER.unpack_from(data)
        if (magic, gen, uid) != (_FAISS_MAGIC, generation, self._uid.encode()):
            return None
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8, offset=_FAISS_HEADER.size))
