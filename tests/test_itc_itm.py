"""blip2.scoring: ITC similarity, ITM scores and the re-ranking rule shared by the pipeline, search, eval, train."""

from __future__ import annotations

import numpy as np
import torch

from blip2 import scoring


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def test_itc_is_max_over_queries_chunked_or_not() -> None:
    img, txt = _unit(7, 4, 16), _unit(5, 16, seed=1)
    want = torch.tensor([[max(float(q @ t) for q in im) for t in txt] for im in img])
    torch.testing.assert_close(scoring.itc_similarity(img, txt), want)
    torch.testing.assert_close(scoring.itc_similarity(img, txt, chunk=3), want)  # GEMM sums may differ in rounding
    assert scoring.itc_similarity(img[:0], txt, chunk=2).shape == (0, 5)


def test_itc_is_differentiable() -> None:
    img = _unit(3, 4, 8).requires_grad_(True)
    scoring.itc_similarity(img, _unit(2, 8, seed=1)).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_itm_logits_chunked_and_match_scores() -> None:
    class Head:
        calls: list[int] = []

        def itm_logits(self, image_embeds, ids, mask):  # (B, N, D), (B, T) -> (B, 2)
            self.calls.append(len(ids))
            return torch.stack([-image_embeds.sum((1, 2)), ids.float().sum(1)], dim=1)

    head = Head()
    feats, ids = torch.randn(5, 3, 2), torch.arange(10).reshape(5, 2)
    logits = scoring.itm_logits(head, feats, ids, torch.ones_like(ids), chunk=2)
    assert head.calls == [2, 2, 1] and logits.dtype == torch.float32 and logits.shape == (5, 2)
    assert torch.equal(scoring.match_logit(logits), ids.float().sum(1))
    torch.testing.assert_close(scoring.match_probability(logits), logits.softmax(-1)[:, 1])


def test_rerank_rows_scores_each_rows_top_k_by_itm_plus_itc() -> None:
    itc = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.0]])
    calls = []

    def itm(row: int, cand: np.ndarray) -> np.ndarray:
        calls.append((row, sorted(cand.tolist())))
        return np.full(len(cand), 10.0 * (row + 1)) + cand  # logit grows with the column

    out = scoring.rerank_rows(itc, 2, itm, fill=-100.0)
    assert calls == [(0, [0, 2]), (1, [1, 2])]
    want = np.full((2, 4), -100.0)
    want[0, [0, 2]] = [10.0 + 0 + 0.9, 10.0 + 2 + 0.5]
    want[1, [1, 2]] = [20.0 + 1 + 0.8, 20.0 + 2 + 0.7]
    np.testing.assert_allclose(out, want)
    assert scoring.rerank_rows(itc, 9, itm).min() > 0  # k beyond the row: every column is a candidate


def test_rerank_list_puts_rescored_first_and_keeps_the_rest_in_itc_order() -> None:
    itc = [0.9, 0.8, 0.7, 0.6, 0.5]
    itm = [0.0, None, 1.0, 5.0, 9.0]  # candidate 1 could not be scored; 4 is beyond k
    got = scoring.rerank_list(itc, itm, k=4)
    assert got == [(3, 5.6, 5.0), (2, 1.7, 1.0), (0, 0.9, 0.0), (1, 0.8, None), (4, 0.5, None)]
    assert [i for i, _, _ in scoring.rerank_list(itc, [], k=3)] == [0, 1, 2, 3, 4]
