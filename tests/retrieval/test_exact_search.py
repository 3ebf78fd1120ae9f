"""The int8 pre-filtered search is exact: the same top-k as brute-force float32 scoring of the stored float16
embeddings, on random data and on data made to defeat the pre-filter (near-ties, duplicates, concentrated vectors,
an outlier dimension, zeros); its cache file follows the index through changes and damage."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from blip2.retrieval import Index, IndexRow, int8file, scoring
from blip2.retrieval import index as index_module
from blip2.retrieval.scoring import Int8Search, int8_faiss_index, int8_kernel_is_exact, int8_quantize, int8_scale

try:
    import faiss  # noqa: F401

    HAVE_FAISS = True
except ImportError:
    HAVE_FAISS = False

needs_faiss = pytest.mark.skipif(not HAVE_FAISS, reason="the int8 pre-filter runs on faiss (pip install faiss-cpu)")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ---- data sets: (n, Nq, D) float16 image embeddings, and texts (Nt, D) float32 --------------------------------------


def random_unit(rng: np.random.Generator, n: int = 1500, nq: int = 32, d: int = 256) -> np.ndarray:
    return _unit(rng.standard_normal((n, nq, d))).astype(np.float16)


def near_ties(rng: np.random.Generator, n: int = 600, nq: int = 8, d: int = 64) -> np.ndarray:
    """Every image is the same image plus 1e-3 noise: scores differ by less than the pre-filter's error."""
    base = _unit(rng.standard_normal((1, nq, d)))
    return _unit(base + 1e-3 * rng.standard_normal((n, nq, d))).astype(np.float16)


def concentrated(rng: np.random.Generator, n: int = 800, nq: int = 8, d: int = 64) -> np.ndarray:
    """All vectors within a few degrees of one direction."""
    axis = _unit(rng.standard_normal(d))
    return _unit(axis + 0.05 * rng.standard_normal((n, nq, d))).astype(np.float16)


def duplicates(rng: np.random.Generator, n: int = 700, nq: int = 8, d: int = 64) -> np.ndarray:
    """Random images, with image 0 copied to 40 places: exact ties across the k-th place, broken by id."""
    emb = random_unit(rng, n, nq, d)
    emb[rng.choice(np.arange(1, n), 40, replace=False)] = emb[0]
    return emb


def outlier_dimension(rng: np.random.Generator, n: int = 600, nq: int = 8, d: int = 64) -> np.ndarray:
    """Unnormalised vectors, per-dimension scales over three orders of magnitude and one huge value: the int8
    step of that dimension is coarse, so every bound is loose."""
    emb = rng.standard_normal((n, nq, d)) * np.logspace(-2, 1, d)
    emb[3, 2, 5] = 60000.0
    return emb.astype(np.float16)


def with_zeros(rng: np.random.Generator, n: int = 500, nq: int = 8, d: int = 64) -> np.ndarray:
    """Random images, some all zero, some with zero query vectors, and a dimension that is zero everywhere."""
    emb = random_unit(rng, n, nq, d)
    emb[::7] = 0
    emb[1::5, :3] = 0
    emb[..., 10] = 0
    return emb


def residual_aligned(
    rng: np.random.Generator, hidden: int, inflated: int, n: int = 300, nq: int = 8, d: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """The worst case of the int8 bound: a text along the quantisation residual of some images.

    Vectors lie on the int8 grid (step 2^-10, exact in float16) except vector 0 of the hidden and inflated images,
    3/8 of a step off the grid along (hidden) or against (inflated) the text's sign pattern. The text
    t = sign/sqrt(D) is quantised without error, so the pre-filter is off by exactly |t.r| = |r| for those images:
    the hidden ones' codes score 1.5 steps below the plain images' and their true scores 1.5 steps above; the
    inflated ones the other way round. Returns (embeddings, the text).
    """
    step = 2.0**-10
    sign = rng.choice([-1.0, 1.0], d)
    codes = rng.integers(-20, 21, (n, nq, d)).astype(np.float64)
    codes[:, 0] = 100 * sign  # vector 0 of every image: the best match of the text
    codes[0, 1] = -127 * sign  # pins the step of every dimension to 127 / 127 steps; scores lowest of all
    special = rng.choice(np.arange(1, n), hidden + inflated, replace=False)
    shifted = rng.choice(d, 12, replace=False)
    emb = codes * step
    for i, h in enumerate(special):
        way = 1.0 if i < hidden else -1.0
        emb[h, 0, shifted] -= way * sign[shifted] * step  # the code scores 12 steps/sqrt(D) lower (higher) ...
        emb[h, 0] += way * 0.375 * step * sign  # ... the residual 0.375*D steps/sqrt(D) higher (lower)
    return emb.astype(np.float16), (sign / np.sqrt(d)).astype(np.float32)


DATASETS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "random": random_unit,
    "near_ties": near_ties,
    "concentrated": concentrated,
    "duplicates": duplicates,
    "outlier_dimension": outlier_dimension,
    "with_zeros": with_zeros,
}


def texts_for(emb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random texts, texts equal to stored vectors (and their negation), the data's mean direction, odd norms."""
    n, nq, d = emb.shape
    e = emb.astype(np.float32)
    mean = e.reshape(-1, d).mean(axis=0)
    t = [
        *_unit(rng.standard_normal((3, d))),
        e[0, 0],
        e[n // 2, nq - 1],
        -e[1, 1],
        _unit(mean) if np.any(mean) else mean,
        _unit(mean + 0.01 * rng.standard_normal(d)),
        1e3 * _unit(rng.standard_normal(d)),
        1e-3 * _unit(rng.standard_normal(d)),
        np.eye(d)[5],
    ]
    return np.stack(t).astype(np.float32)


def brute_force(emb: np.ndarray, ids: np.ndarray, text: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The definition: exact dot products of the float16 vectors (float64) rounded to float32, max over queries,
    best k by score then id."""
    n, nq, d = emb.shape
    scores = (emb.astype(np.float64) @ text.astype(np.float64)).max(axis=1).astype(np.float32)
    order = np.lexsort((ids, -scores))[:k]
    return [(int(ids[i]), float(scores[i])) for i in order]


def assert_same(got: list[tuple[int, float]], want: list[tuple[int, float]], what: str) -> None:
    assert [i for i, _ in got] == [i for i, _ in want], what
    np.testing.assert_allclose(
        [s for _, s in got], [s for _, s in want], rtol=0, atol=0, err_msg=what
    )  # the same floats


def int8_search(emb: np.ndarray, ids: np.ndarray) -> Int8Search:
    n, nq, d = emb.shape
    index, codes = int8_faiss_index(d, n * nq)
    scale, bounds = int8_scale(emb), np.empty((n, 3), np.float32)
    int8_quantize(emb, scale, codes, bounds)
    return Int8Search(index, scale, bounds, emb, ids)


# ---- the search itself -----------------------------------------------------------------------------------------------


@needs_faiss
@pytest.mark.parametrize("name", DATASETS)
def test_int8_search_equals_brute_force(name: str) -> None:
    rng = np.random.default_rng(sorted(DATASETS).index(name))
    emb = DATASETS[name](rng)
    ids = np.arange(len(emb), dtype=np.int64) * 7 + 3  # ids need not be dense
    fast = int8_search(emb, ids)
    texts = texts_for(emb, rng)
    certified = 0
    for k in (1, 10, 100):
        for j, got in enumerate(fast.search(torch.from_numpy(texts), k)):
            if got is not None:  # None: left to the plain scan (tested through Index below)
                assert_same(got, brute_force(emb, ids, texts[j], k), f"{name} text {j} k={k}")
                certified += 1
    assert certified >= 2 * len(texts)  # small indexes are certified even when the bound is loose
    if name == "random":
        assert certified == 3 * len(texts)


@needs_faiss
@pytest.mark.parametrize("hidden,inflated", [(5, 0), (0, 5), (5, 5)])
@pytest.mark.parametrize("k", [1, 5, 6, 20])
def test_int8_search_where_quantisation_hides_or_inflates(hidden: int, inflated: int, k: int) -> None:
    rng = np.random.default_rng(12)
    emb, text = residual_aligned(rng, hidden, inflated)
    ids = np.arange(len(emb), dtype=np.int64)
    fast = int8_search(emb, ids)
    assert np.all(int8_scale(emb) == 2.0**-10)
    want = brute_force(emb, ids, text, k)
    plain = 100 * 2.0**-10 * np.sqrt(64)  # the score of a plain image's vector 0
    assert (want[0][1] > plain) == (hidden > 0)  # a hidden image is the best, an inflated one never
    got = fast.search(torch.from_numpy(text[None]), k)[0]
    assert got is not None
    assert_same(got, want, f"k={k}")


@needs_faiss
def test_raised_k_and_giving_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small first K is raised until the bound certifies; past the limit the text is left to the plain scan."""
    rng = np.random.default_rng(11)
    emb = near_ties(rng, n=1000)
    ids = np.arange(len(emb), dtype=np.int64)
    texts = texts_for(emb, rng)[:4]
    monkeypatch.setattr(scoring, "_FIRST_K", 16)
    calls = []
    fast = int8_search(emb, ids)
    search = fast.index.search
    fast.index = type("Spy", (), {"search": lambda self, q, kk: calls.append(kk) or search(q, kk)})()
    for j, got in enumerate(fast.search(torch.from_numpy(texts), 10)):
        assert_same(got, brute_force(emb, ids, texts[j], 10), f"text {j}")
    assert calls[0] == 16 * 40 and len(calls) > 1  # 64 * k, then raised
    monkeypatch.setattr(scoring, "_COMPLETE_MAX", 0)  # as for a large index: never ask faiss for half of it
    calls.clear()
    assert fast.search(torch.from_numpy(texts), 100) == [None] * len(texts)  # 64 * k > n * Nq / 2
    assert calls == []


@needs_faiss
def test_a_wrong_bound_would_be_caught() -> None:
    """The adversarial data has teeth: with the error bound set to zero the pre-filter drops true results."""
    rng = np.random.default_rng(2)
    emb = near_ties(rng)
    ids = np.arange(len(emb), dtype=np.int64)
    fast = int8_search(emb, ids)
    fast.kappa[:] = fast.rho_nu[:] = fast.max_kappa = fast.max_rho_nu = 0
    texts = texts_for(emb, rng)
    wrong = 0
    for j, got in enumerate(fast.search(torch.from_numpy(texts), 10)):
        if got is not None and [i for i, _ in got] != [i for i, _ in brute_force(emb, ids, texts[j], 10)]:
            wrong += 1
    assert wrong > 0


@needs_faiss
@pytest.mark.parametrize("dim", [1, 16, 100, 256, 1040])
def test_faiss_int8_kernel_is_exact(dim: int) -> None:
    assert int8_kernel_is_exact(dim)


def test_int8_kernel_refuses_large_dims() -> None:
    assert not int8_kernel_is_exact(1041)  # D * 127^2 would pass 2^24: float32 results could round


@pytest.mark.parametrize("name", DATASETS)
def test_quantize_bounds_are_rigorous_and_tight(name: str) -> None:
    """rho, kappa, nu from the float32 arithmetic are >= the exact norms (float64), and barely above them."""
    rng = np.random.default_rng(3)
    emb = DATASETS[name](rng)[:200]
    n, nq, d = emb.shape
    codes, bounds = np.empty((n * nq, d), np.uint8), np.empty((n, 3), np.float32)
    scale = int8_scale(emb)
    int8_quantize(emb, scale, codes, bounds)
    c = codes.reshape(n, nq, d).astype(np.float64) - 128
    e = emb.astype(np.float64)
    assert np.abs(c).max() <= 127
    exact = np.stack(
        [
            np.linalg.norm(e - c * scale.astype(np.float64), axis=-1).max(axis=1),
            np.linalg.norm(c, axis=-1).max(axis=1),
            np.linalg.norm(e, axis=-1).max(axis=1),
        ],
        axis=1,
    )
    assert np.all(bounds >= exact)
    assert np.all(bounds <= exact * (1 + 1e-4) + 1e-4 * scale.max())
    if name == "random":
        assert np.all(exact[:, 0] <= 0.6 * np.sqrt(d) * scale.max())  # |r_d| <= s_d / 2


# ---- through the Index: the fallback, the cache file ---------------------------------------------------------------


def _fill(index: Index, emb: np.ndarray, start: int = 0, prefix: str = "img") -> None:
    index.add_many(IndexRow(f"{prefix}{start + i}.jpg", e, f"{i:064x}", 1, 0.0) for i, e in enumerate(emb))


def _check_index(index: Index, emb: np.ndarray, ids: np.ndarray, texts: np.ndarray, k: int) -> None:
    for j, hits in enumerate(index.search(texts, k)):
        assert_same([(h.id, h.score) for h in hits], brute_force(emb, ids, texts[j], k), f"text {j}")


@pytest.mark.parametrize("name", DATASETS)
def test_index_search_equals_brute_force(tmp_path: Path, name: str) -> None:
    """Whatever path answers (pre-filter, or the plain scan for what it cannot certify), the answer is exact."""
    rng = np.random.default_rng(4)
    emb = DATASETS[name](rng)
    texts = np.concatenate([texts_for(emb, rng), np.zeros((1, emb.shape[2]), np.float32)])
    texts[-1, 0] = 1e-35  # too small for the pre-filter's margin: the plain scan answers
    with Index(tmp_path / "x.sqlite", dim=emb.shape[2], num_query=emb.shape[1]) as index:
        _fill(index, emb)
        ids = np.arange(1, len(emb) + 1)
        _check_index(index, emb, ids, texts, 10)
        _check_index(index, emb, ids, texts[:3], 3 * len(emb))  # k > n: every image, in order


@needs_faiss
def test_index_uses_the_prefilter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    emb = random_unit(rng, n=800)
    with Index(tmp_path / "x.sqlite", dim=256, num_query=32) as index:
        _fill(index, emb)
        monkeypatch.setattr(index_module, "search_blocks", None)  # the plain scan would fail
        _check_index(index, emb, np.arange(1, 801), texts_for(emb, rng)[:8], 50)
        assert index.int8_path.exists()


def _footer_generation(path: Path) -> int:
    data = path.read_bytes()[-int8file._FOOTER_SIZE :]
    return int8file._FOOTER.unpack_from(data)[3]


@needs_faiss
def test_int8_file_follows_adds_and_removes(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    emb = random_unit(rng, n=300, nq=8, d=64)
    with Index(tmp_path / "x.sqlite", dim=64, num_query=8) as index:
        _fill(index, emb[:200])
        text = emb[250, 3].astype(np.float32)  # planted in an image not added yet
        assert index.search(text, 1)[0][0].path != "img250.jpg"
        first = _footer_generation(index.int8_path)
        _fill(index, emb[200:], start=200)  # bumps the generation: cache and pre-filter are stale
        assert index.search(text, 1)[0][0].path == "img250.jpg"
        assert _footer_generation(index.int8_path) == index.generation > first
        index.remove(["img250.jpg"])
        hits = index.search(text, 300)[0]
        assert "img250.jpg" not in {h.path for h in hits} and len(hits) == 299
        assert _footer_generation(index.int8_path) == index.generation
        keep = np.array([i for i in range(300) if i != 250])
        _check_index(index, emb[keep], keep + 1, texts_for(emb[keep], rng), 20)
    with Index(tmp_path / "x.sqlite") as index:  # another process: reads the file as it is
        mtime = index.int8_path.stat().st_mtime_ns
        _check_index(index, emb[keep], keep + 1, texts_for(emb[keep], rng)[:3], 20)
        assert index.int8_path.stat().st_mtime_ns == mtime


@needs_faiss
@pytest.mark.parametrize("damage", ["truncated", "random", "other_index", "directory"])
def test_damaged_int8_file_is_rebuilt(tmp_path: Path, damage: str) -> None:
    rng = np.random.default_rng(7)
    emb = random_unit(rng, n=200, nq=8, d=64)
    texts = texts_for(emb, rng)
    db = tmp_path / "x.sqlite"
    with Index(db, dim=64, num_query=8) as index:
        _fill(index, emb)
        index.search(texts[0], 1)
        path = index.int8_path
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-300])
    elif damage == "random":
        path.write_bytes(os.urandom(5000))
    elif damage == "other_index":  # a whole file, of another database with the same shapes
        with Index(tmp_path / "other.sqlite", dim=64, num_query=8) as other:
            _fill(other, random_unit(rng, n=200, nq=8, d=64))
            other.search(texts[0], 1)
            os.replace(other.int8_path, path)
    else:  # cannot be written: the pre-filter lives in memory
        path.unlink()
        path.mkdir()
    with Index(db) as index:
        _check_index(index, emb, np.arange(1, 201), texts, 10)
        assert index._int8 is not None and index._int8[1] is not None
        assert damage == "directory" or _footer_generation(path) == index.generation


@needs_faiss
def test_faiss_answering_wrongly_is_not_trusted(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    emb = random_unit(rng, n=300, nq=8, d=64)
    texts = texts_for(emb, rng)
    with Index(tmp_path / "x.sqlite", dim=64, num_query=8) as index:
        _fill(index, emb)
        index.search(texts[0], 1)
        fast = index._int8[1]
        search = fast.index.search

        def wrong(self: object, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            values, rows = search(q, k)
            return values, rng.permuted(rows, axis=1)  # scores of other vectors than those named

        fast.index = type("Wrong", (), {"search": wrong})()
        _check_index(index, emb, np.arange(1, 301), texts, 10)


def test_without_faiss_search_is_exact_and_makes_no_int8_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    rng = np.random.default_rng(9)
    emb = duplicates(rng, n=300)
    with Index(tmp_path / "x.sqlite", dim=64, num_query=8) as index:
        _fill(index, emb)
        _check_index(index, emb, np.arange(1, 301), texts_for(emb, rng), 10)
        assert not index.int8_path.exists()
