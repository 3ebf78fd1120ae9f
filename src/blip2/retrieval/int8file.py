"""The `<db>.i8` file beside a retrieval index: an int8 copy of its embeddings that pre-filters exact text search.

Layout: a faiss index file (memory-mapped where faiss can), then scale float32 (D,), bounds float32 (n, 3) and a
128-byte footer (magic b"BLIP2I8\0", version, generation, n, Nq, D, uid, the offset of the trailer). It is
derived from the `<db>.emb` cache (index.py), rebuilt whenever its footer does not name that cache, and written
to a temporary name and renamed (`durable.atomic_path`), so a reader sees an old or a new file, never a torn one.
The error bound that makes the pre-filter exact is in `scoring.Int8Search`.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from blip2.durable import atomic_path
from blip2.retrieval.scoring import int8_faiss_index, int8_faiss_read, int8_faiss_write, int8_quantize, int8_scale

_MAGIC = b"BLIP2I8\0"
_VERSION = 1
_FOOTER = struct.Struct("<8sIIqqqq32sq")  # magic, version, 0, generation, n, Nq, D, uid, trailer offset
_FOOTER_SIZE = 128

Int8Parts = tuple[Any, np.ndarray, np.ndarray]  # (faiss index, scale (D,), bounds (n, 3))


def load_int8(path: Path, uid: str, generation: int, n: int, num_query: int, dim: int) -> Int8Parts | None:
    """(faiss index, scale, bounds) from `path` if it belongs to this cache generation and is whole, else None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(size - _FOOTER_SIZE, 0))
            footer = f.read(_FOOTER_SIZE)
            magic, version, _, gen, fn, fnq, fdim, fuid, trailer = _FOOTER.unpack_from(footer)
            if (magic, version, gen, fn, fnq, fdim, fuid) != (
                *(_MAGIC, _VERSION, generation, n, num_query, dim),
                uid.encode(),
            ) or size != trailer + 4 * dim + 12 * n + _FOOTER_SIZE:
                return None
            f.seek(trailer)
            scale = np.fromfile(f, dtype=np.float32, count=dim)
            bounds = np.fromfile(f, dtype=np.float32, count=3 * n).reshape(n, 3)
    except (OSError, struct.error, ValueError):
        return None
    index = int8_faiss_read(path)
    if index is None or (index.d, index.ntotal) != (dim, n * num_query):
        return None
    return index, scale, bounds


def write_int8(path: Path, uid: str, generation: int, emb: np.ndarray) -> Int8Parts:
    """Quantise `emb` (n, Nq, D) into a faiss int8 index, save it to `path` and map it back (kept in memory if the
    file cannot be written)."""
    n, num_query, dim = emb.shape
    index, codes = int8_faiss_index(dim, n * num_query)
    scale, bounds = int8_scale(emb), np.empty((n, 3), np.float32)
    int8_quantize(emb, scale, codes, bounds)
    del codes  # a view into the index
    try:
        with atomic_path(path, fsync=False, unique=True) as tmp:  # a cache: rebuilt when torn, so no fsync
            int8_faiss_write(index, tmp)
            trailer = tmp.stat().st_size
            footer = _FOOTER.pack(_MAGIC, _VERSION, 0, generation, n, num_query, dim, uid.encode(), trailer)
            with open(tmp, "ab") as f:
                f.write(scale.tobytes() + bounds.tobytes() + footer.ljust(_FOOTER_SIZE, b"\0"))
    except (OSError, RuntimeError):  # only a cache: search works from memory
        return index, scale, bounds
    return load_int8(path, uid, generation, n, num_query, dim) or (index, scale, bounds)
