"""ITC scoring and the blocked exact search against naive references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip2.retrieval import EmbeddingShapeError, itc_scores, search_blocks, topk_images


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _blocks(ids: np.ndarray, emb: np.ndarray | torch.Tensor, size: int):
    for s in range(0, len(ids), size):
        yield ids[s : s + size], emb[s : s + size]


def _reference_topk(emb32: torch.Tensor, text: torch.Tensor, ids: np.ndarray, k: int) -> list[tuple[int, float]]:
    scores = (emb32 @ text).amax(dim=1).numpy()  # (n,)
    order = np.lexsort((ids, -scores))[:k]
    return [(int(ids[i]), float(scores[i])) for i in order]


def test_itc_scores_equals_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    img = _unit(torch.randn(5, 8, 16, generator=g))  # (Ni, Nq, D)
    txt = _unit(torch.randn(3, 16, generator=g))  # (Nt, D)
    got = itc_scores(img, txt)
    assert got.shape == (5, 3)
    for i in range(5):
        for t in range(3):
            naive = max(float(torch.dot(img[i, q], txt[t])) for q in range(8))
            assert got[i, t].item() == pytest.approx(naive, abs=1e-6)
    assert torch.allclose(itc_scores(img.half(), txt), itc_scores(img.half().float(), txt))
    assert itc_scores(img, txt[0]).shape == (5,)


def test_topk_images() -> None:
    g = torch.Generator().manual_seed(1)
    img, txt = _unit(torch.randn(20, 8, 16, generator=g)), _unit(torch.randn(4, 16, generator=g))
    scores, idx = topk_images(img, txt, k=5)
    full = itc_scores(img, txt).T  # (Nt, Ni)
    assert torch.equal(idx, full.argsort(dim=1, descending=True)[:, :5])
    assert torch.allclose(scores, full.gather(1, idx))
    assert topk_images(img, txt, k=100)[1].shape == (4, 20)


def test_shape_errors_name_the_shape() -> None:
    with pytest.raises(EmbeddingShapeError, match=r"\(4, 16\)"):
        itc_scores(torch.zeros(4, 16), torch.zeros(2, 16))
    with pytest.raises(EmbeddingShapeError, match="D=8"):
        itc_scores(torch.zeros(4, 2, 16), torch.zeros(2, 8))


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
@pytest.mark.parametrize("k", [1, 10, 300])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_search_blocks_equals_full_argsort(block: int, k: int, dtype: type) -> None:
    rng = np.random.default_rng(block * 1000 + k)
    n, nq, d = 250, 8, 16
    emb = rng.standard_normal((n, nq, d)).astype(np.float32)
    emb = (emb / np.linalg.norm(emb, axis=-1, keepdims=True)).astype(dtype)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)  # ids need not be ordered or dense
    texts = _unit(torch.from_numpy(rng.standard_normal((3, d)).astype(np.float32)))
    emb32 = torch.from_numpy(emb.astype(np.float32))
    got = search_blocks(texts, _blocks(ids, emb, block), k)
    assert len(got) == 3
    for text, hits in zip(texts, got, strict=True):
        want = _reference_topk(emb32, text, ids, k)
        assert len(hits) == min(k, n)
        assert [i for i, _ in hits] == [i for i, _ in want]
        assert np.allclose([s for _, s in hits], [s for _, s in want], atol=1e-6)


def test_search_blocks_single_text_and_torch_blocks() -> None:
    g = torch.Generator().manual_seed(3)
    emb = _unit(torch.randn(40, 8, 16, generator=g)).half()
    ids = np.arange(40)
    text = emb[17, 3].float()  # equal to one query vector of image 17: its score is ~1, the best
    hits = search_blocks(text, _blocks(ids, emb, 9), 3)
    assert hits[0][0] == 17 and hits[0][1] == pytest.approx(1.0, abs=2e-3)
    assert search_blocks(text, iter([]), 3) == []


def test_search_blocks_near_ties_are_exact() -> None:
    """Scores closer together than float16 resolution still come back in exact float32 order."""
    rng = np.random.default_rng(5)
    n, nq, d = 500, 4, 16
    base = rng.standard_normal(d).astype(np.float32)
    base /= np.linalg.norm(base)
    emb = np.repeat(base[None, None], n, axis=0).repeat(nq, axis=1)
    emb = emb + rng.standard_normal(emb.shape).astype(np.float32) * 1e-3
    emb = (emb / np.linalg.norm(emb, axis=-1, keepdims=True)).astype(np.float16)
    text = torch.from_numpy(base)
    got = search_blocks(text, _blocks(np.arange(n), emb, 33), 20)
    want = _reference_topk(torch.from_numpy(emb.astype(np.float32)), text, np.arange(n), 20)
    assert [i for i, _ in got] == [i for i, _ in want]
    assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-6)


def test_search_blocks_rejects_bad_blocks() -> None:
    with pytest.raises(EmbeddingShapeError, match="n=3"):
        search_blocks(torch.zeros(16), [(np.arange(3), np.zeros((2, 8, 16), np.float16))], 2)
    with pytest.raises(ValueError, match="k must be"):
        search_blocks(torch.zeros(16), [], 0)
