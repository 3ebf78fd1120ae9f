"""The SQLite image index: round trip, incremental updates, mismatches, crashes, corruption, the search cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from blip2.errors import Blip2Error
from blip2.retrieval import Hit, Index, IndexFileError, IndexRow, OptionalDependencyError

NQ, D = 8, 16
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _emb(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, NQ, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)  # (n, Nq, D)


def _fill(index: Index, rng: np.random.Generator, n: int, prefix: str = "img") -> np.ndarray:
    emb = _emb(rng, n)
    index.add_many(IndexRow(f"{prefix}{i}.jpg", emb[i], f"{i:064x}", 1000 + i, 1.5 * i) for i in range(n))
    return emb


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "images.sqlite"


def test_round_trip_and_planted_search(db: Path) -> None:
    rng = np.random.default_rng(0)
    with Index(db, dim=D, num_query=NQ, model="tiny") as index:
        emb = _fill(index, rng, 200)
        assert len(index) == 200
    with Index(db) as index:  # reopen: dims come from the file
        assert (index.dim, index.num_query, index.model) == (D, NQ, "tiny")
        assert index.paths()[:2] == ["img0.jpg", "img1.jpg"]
        texts = torch.from_numpy(np.stack([emb[42, 5], emb[7, 0]]))  # each equals one query vector of an image
        hits = index.search(texts, k=5)
        assert [h[0].path for h in hits] == ["img42.jpg", "img7.jpg"]
        assert isinstance(hits[0][0], Hit) and hits[0][0].score == pytest.approx(1.0, abs=2e-3)
        assert all(len(h) == 5 and h[0].score >= h[-1].score for h in hits)
        single = index.search(emb[42, 5], k=3)  # a (D,) text gives one list
        assert len(single) == 1 and single[0][0].path == "img42.jpg"
        ids = [single[0][0].id, hits[1][0].id]
        assert np.array_equal(index.embeddings(ids), emb[[42, 7]].astype(np.float16))


def test_search_by_image_finds_itself(db: Path) -> None:
    rng = np.random.default_rng(1)
    with Index(db, dim=D, num_query=NQ) as index:
        emb = _fill(index, rng, 100)
        hits = index.search_by_image(emb[13], k=4)
        assert hits[0].path == "img13.jpg" and hits[0].score == pytest.approx(1.0, abs=2e-3)
        mean = emb.mean(axis=1)
        mean /= np.linalg.norm(mean, axis=1, keepdims=True)
        want = np.argsort(-(mean @ mean[13]))[:4]
        assert [h.path for h in hits] == [f"img{i}.jpg" for i in want]


def test_needs_update_and_replace(db: Path) -> None:
    rng = np.random.default_rng(2)
    with Index(db, dim=D, num_query=NQ) as index:
        emb = _emb(rng, 2)
        assert index.needs_update("a.jpg", 10, 5.0)
        index.add("a.jpg", emb[0], sha256="0" * 64, size=10, mtime=5.0)
        assert not index.needs_update("a.jpg", 10, 5.0)
        assert index.needs_update("a.jpg", 11, 5.0)
        assert index.needs_update("a.jpg", 10, 6.0)
        first_id = index.search(emb[0, 0], k=1)[0][0].id
        index.add(Path("a.jpg"), torch.from_numpy(emb[1]), sha256="1" * 64, size=11, mtime=6.0)  # changed file
        assert len(index) == 1 and not index.needs_update("a.jpg", 11, 6.0)
        hit = index.search(emb[1, 2], k=1)[0][0]
        assert hit.id == first_id and hit.score == pytest.approx(1.0, abs=2e-3)


def test_prune_remove_and_errors(db: Path) -> None:
    rng = np.random.default_rng(3)
    with Index(db, dim=D, num_query=NQ) as index:
        emb = _fill(index, rng, 10)
        index.record_error("broken.jpg", "not an image")
        index.record_error("img3.jpg", "truncated")
        assert [e[0] for e in index.errors()] == ["broken.jpg", "img3.jpg"]
        index.add("img3.jpg", emb[3], sha256="3" * 64, size=3, mtime=3.0)  # a later success clears the error
        assert [e[0] for e in index.errors()] == ["broken.jpg"]
        assert index.search(emb[5, 1], k=1)[0][0].path == "img5.jpg"
        removed = index.prune([f"img{i}.jpg" for i in range(10) if i != 5])
        assert removed == 1 and len(index) == 9 and "img5.jpg" not in index.paths()
        assert index.errors() == []
        hits = index.search(emb[5, 1], k=20)[0]  # the cache was rebuilt: img5 is gone
        assert len(hits) == 9 and all(h.path != "img5.jpg" for h in hits)
        assert index.remove(["img0.jpg", "nope.jpg"]) == 1
        assert len(index.search(emb[0, 0], k=20)[0]) == 8


def test_cache_rebuilt_after_adds_and_by_other_processes(db: Path) -> None:
    rng = np.random.default_rng(4)
    with Index(db, dim=D, num_query=NQ) as index:
        _fill(index, rng, 5)
        index.search(np.ones(D, np.float32), k=1)
        gen = index.generation
        assert index.cache_path.exists()
        with Index(db) as other:  # a second writer, like another process
            new = _fill(other, rng, 3, prefix="new")
        assert index.generation > gen
        assert index.search(new[2, 4], k=1)[0][0].path == "new2.jpg"
        assert len(index.search(new[2, 4], k=100)[0]) == 8


def test_stale_or_damaged_cache_is_rebuilt(db: Path) -> None:
    rng = np.random.default_rng(5)
    with Index(db, dim=D, num_query=NQ) as index:
        emb = _fill(index, rng, 30)
        index.search(emb[0, 0], k=1)
        cache = index.cache_path
    cache.write_bytes(cache.read_bytes()[:200])  # truncated cache
    with Index(db) as index:
        assert index.search(emb[9, 2], k=1)[0][0].path == "img9.jpg"
    cache.write_bytes(os.urandom(500))
    with Index(db) as index:
        assert index.search(emb[11, 2], k=1)[0][0].path == "img11.jpg"


def test_mismatch_on_reopen_names_file(db: Path) -> None:
    Index(db, dim=D, num_query=NQ, model="Salesforce/blip2-itm-vit-g").close()
    with pytest.raises(IndexFileError, match=rf"{db.name}.*dim=16.*dim=32"):
        Index(db, dim=32)
    with pytest.raises(IndexFileError, match=rf"{db.name}.*num_query"):
        Index(db, num_query=32)
    with pytest.raises(IndexFileError, match=rf"{db.name}.*blip2-itm-vit-g.*other"):
        Index(db, model="other")
    Index(db, dim=D, num_query=NQ, model="Salesforce/blip2-itm-vit-g").close()


def test_new_index_needs_dims_and_wrong_embedding_shape(db: Path) -> None:
    with pytest.raises(IndexFileError, match=db.name):
        Index(db)
    with Index(db, dim=D, num_query=NQ) as index:
        with pytest.raises(Blip2Error, match=r"x\.jpg.*\(8, 16\)"):
            index.add("x.jpg", np.zeros((NQ, D + 1)), sha256="", size=0, mtime=0.0)
        with pytest.raises(Blip2Error, match="D=16"):
            index.search(np.zeros(D + 1), k=1)
        assert len(index) == 0 and index.search(np.zeros(D), k=3) == [[]]


@pytest.mark.parametrize("damage", ["random", "truncated", "other_sqlite"])
def test_corrupt_file_raises_naming_it(db: Path, damage: str) -> None:
    rng = np.random.default_rng(6)
    with Index(db, dim=D, num_query=NQ) as index:
        _fill(index, rng, 300)
    if damage == "random":
        db.write_bytes(os.urandom(64 * 1024))
    elif damage == "truncated":
        data = db.read_bytes()
        db.write_bytes(data[: len(data) // 3])
    else:
        db.unlink()
        import sqlite3

        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE t (x)")
    with pytest.raises(IndexFileError, match=db.name):
        with Index(db) as index:  # a truncated file may open; reading it must fail cleanly
            len(index)
            index.paths()
            index.search(np.ones(D, np.float32), k=5)


_WRITER = """
import sys, numpy as np
from blip2.retrieval import Index, IndexRow
index = Index(sys.argv[1], dim=16, num_query=8)
rng = np.random.default_rng(0)
b = 0
while True:
    emb = rng.standard_normal((50, 8, 16)).astype(np.float32)
    index.add_many(IndexRow(f"b{b}_{i}.jpg", emb[i], "0" * 64, i, 0.0) for i in range(50))
    print(b, flush=True)
    b += 1
"""


def test_killed_writer_leaves_whole_batches(db: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(db)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        deadline = time.monotonic() + 60
        seen = 0
        while seen < 5 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "writer died"
            seen = int(line) + 1
        time.sleep(0.05)  # land the kill somewhere inside a later batch
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
    with Index(db) as index:
        n = len(index)
        assert n >= 5 * 50 and n % 50 == 0
        batches = {p.split("_")[0] for p in index.paths()}
        assert batches == {f"b{b}" for b in range(n // 50)}
        assert len(index.search(np.ones(16, np.float32), k=10)[0]) == 10


def test_approximate_search(db: Path) -> None:
    faiss = pytest.importorskip("faiss")
    assert faiss is not None
    rng = np.random.default_rng(7)
    with Index(db, dim=D, num_query=NQ) as index:
        emb = _fill(index, rng, 150)
        texts = np.stack([emb[3, 1], emb[99, 6]])
        exact = index.search(texts, k=5)
        approx = index.search(texts, k=5, approximate=True)  # candidates default to >= n: same result
        assert approx == exact
        assert index.faiss_path.exists()
    with Index(db) as index:
        assert index.search(texts, k=5, approximate=True) == exact  # loaded from the .faiss file


def test_approximate_without_faiss_says_how_to_install(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    rng = np.random.default_rng(8)
    with Index(db, dim=D, num_query=NQ) as index:
        _fill(index, rng, 3)
        with pytest.raises(OptionalDependencyError, match="pip install faiss-cpu"):
            index.search(np.ones(D, np.float32), approximate=True)
