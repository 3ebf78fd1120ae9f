"""ITC scoring and exact top-k search over image embeddings.

A BLIP-2 image embedding is Nq query vectors of size D (Nq=32, D=256 for the released models), L2-normalised;
a text embedding is one D vector. The ITC similarity of an image and a text is the **maximum over the Nq query
vectors** of their dot product (cosine, no temperature), as in `Blip2ForImageTextRetrieval` and LAVIS
`compute_sim_matrix`.

`search_blocks` scans a large float16 matrix block by block with a bounded memory footprint. On a CPU the fastest
exact way to do that is not to convert each block to float32 (the conversion costs ~4x the scan itself): torch's
float16 matrix-vector product reads the stored halves directly and accumulates in float32, so it runs at memory
bandwidth. Its result is rounded to float16, so it serves as a pre-filter with a proven error bound; every row that
could still enter the top-k is then re-scored in float32. The result equals a float32 full-matrix search.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from blip2.errors import Blip2Error

__all__ = ["EmbeddingShapeError", "itc_scores", "search_blocks", "topk_images"]

ArrayLike = Any  # a torch.Tensor or a numpy array

# Error of the float16 pre-filter, relative to |text| * max |image query vector|: the text rounded to float16
# (<= 2^-11), the float16 output rounding (<= 2^-11), float32 accumulation (~2^-16); doubled for safety.
_FP16_REL_ERR = 2.0**-9


class EmbeddingShapeError(Blip2Error, ValueError):
    """An embedding tensor has the wrong number of dimensions or the wrong size."""


def _as_tensor(x: ArrayLike) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return torch.from_numpy(np.asarray(x))


def _check_texts(text_emb: ArrayLike, dim: int | None = None) -> tuple[Tensor, bool]:
    """Return texts as a float32 (Nt, D) tensor and whether a single (D,) vector was given."""
    t = _as_tensor(text_emb).float()
    single = t.ndim == 1
    if single:
        t = t[None]
    if t.ndim != 2:
        raise EmbeddingShapeError(f"text embedding must be (D,) or (Nt, D), got shape {tuple(t.shape)}")
    if dim is not None and t.shape[1] != dim:
        raise EmbeddingShapeError(f"text embedding has D={t.shape[1]}, image embeddings have D={dim}")
    return t, single


def itc_scores(image_emb: ArrayLike, text_emb: ArrayLike) -> Tensor:
    """ITC similarity of every image and text: max over the Nq query vectors of the dot product.

    image_emb: (Ni, Nq, D); text_emb: (Nt, D) or (D,). Returns float32 (Ni, Nt) (or (Ni,) for one text vector).
    Half-precision inputs are computed in float32.
    """
    img = _as_tensor(image_emb)
    if img.ndim != 3:
        raise EmbeddingShapeError(f"image embedding must be (Ni, Nq, D), got shape {tuple(img.shape)}")
    txt, single = _check_texts(text_emb, img.shape[2])
    if img.shape[1] < 1:
        raise EmbeddingShapeError(f"image embedding needs at least one query vector, got shape {tuple(img.shape)}")
    sims = torch.einsum("iqd,td->iqt", img.float(), txt.to(img.device))  # (Ni, Nq, Nt)
    scores = sims.amax(dim=1)  # (Ni, Nt)
    return scores[:, 0] if single else scores


def topk_images(image_emb: ArrayLike, text_emb: ArrayLike, k: int = 10) -> tuple[Tensor, Tensor]:
    """The k best images for each text by ITC similarity.

    Returns (scores, indices), both (Nt, min(k, Ni)), best first; indices are rows of `image_emb`.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    txt, _ = _check_texts(text_emb)
    scores = itc_scores(image_emb, txt).T  # (Nt, Ni)
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return top.values, top.indices


class _RunningTopK:
    """The best k (id, score) pairs seen so far for one text, kept sorted: score descending, id ascending."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.ids = np.empty(0, dtype=np.int64)
        self.scores = np.empty(0, dtype=np.float32)

    @property
    def threshold(self) -> float:
        """The score a new row must reach to enter; -inf while fewer than k are held."""
        return float(self.scores[-1]) if len(self.scores) >= self.k else -np.inf

    def merge(self, ids: np.ndarray, scores: np.ndarray) -> None:
        all_ids = np.concatenate([self.ids, ids])
        all_scores = np.concatenate([self.scores, scores])
        order = np.lexsort((all_ids, -all_scores))[: self.k]
        self.ids, self.scores = all_ids[order], all_scores[order]

    def result(self) -> list[tuple[int, float]]:
        return [(int(i), float(s)) for i, s in zip(self.ids, self.scores, strict=True)]


def _exact_scores(emb: Tensor, text: Tensor) -> np.ndarray:
    """float32 ITC scores of rows emb (c, Nq, D) against one text (D,) -> (c,)."""
    return (emb.float() @ text).amax(dim=1).numpy()  # (c, Nq) -> (c,)


def _scan_block_fp16(emb: Tensor, ids: np.ndarray, texts: Tensor, tops: list[_RunningTopK], max_norm: float) -> None:
    """Pre-filter a float16 block (n, Nq, D) with fp16 GEMV, re-score the survivors in float32."""
    n, nq, d = emb.shape
    flat = emb.reshape(n * nq, d)  # (n*Nq, D), a view
    for text, top in zip(texts, tops, strict=True):
        norm = float(text.norm())
        if norm == 0.0:
            approx = np.zeros(n, dtype=np.float32)
        else:
            # unit text in fp16 keeps the products far from fp16 overflow; scale back afterwards
            # fp16 reductions are slow on CPU: widen the (n*Nq,) products before the max
            approx = (flat @ (text / norm).half()).float().view(n, nq).amax(dim=1).numpy() * norm  # (n,)
        tol = _FP16_REL_ERR * norm * max_norm
        cut = top.threshold - tol
        if len(approx) > top.k:
            # k rows of this block score >= (their k-th approx) - tol, so rows below that - 2*tol cannot win
            cut = max(cut, float(np.partition(approx, -top.k)[-top.k]) - 2 * tol)
        keep = np.flatnonzero(approx >= cut)
        if len(keep):
            top.merge(ids[keep], _exact_scores(emb[torch.from_numpy(keep)], text))


def _scan_block_fp32(emb: Tensor, ids: np.ndarray, texts: Tensor, tops: list[_RunningTopK]) -> None:
    scores = itc_scores(emb, texts).numpy()  # (n, Nt)
    for j, top in enumerate(tops):
        col = scores[:, j]
        if len(col) > top.k:
            keep = np.argpartition(-col, top.k - 1)[: top.k]  # this block's best k, enough to merge
            top.merge(ids[keep], col[keep])
        else:
            top.merge(ids, col)


def search_blocks(
    text_emb: ArrayLike, blocks: Iterable[tuple[ArrayLike, ArrayLike]], k: int = 10, *, max_norm: float = 1.0
) -> list[tuple[int, float]] | list[list[tuple[int, float]]]:
    """Exact ITC top-k over embeddings that arrive in blocks, with memory bounded by one block.

    text_emb: (D,) or (Nt, D). blocks: (ids (n,), emb (n, Nq, D)) pairs, numpy or torch, float16 or float32
    (e.g. slices of a memory map). Returns, for a (D,) text, a list of (id, score) best first (score descending,
    ties by id ascending), at most k long; for (Nt, D) texts, one such list per text.

    float16 blocks are pre-filtered in float16 and re-scored in float32 (see the module docstring); `max_norm`
    bounds the L2 norm of any image query vector (1.0 for normalised embeddings) and sets the pre-filter margin.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    texts, single = _check_texts(text_emb)
    tops = [_RunningTopK(k) for _ in range(texts.shape[0])]
    for block_ids, block_emb in blocks:
        ids = np.asarray(block_ids, dtype=np.int64)
        emb = _as_tensor(block_emb)
        if emb.ndim != 3 or emb.shape[0] != len(ids) or emb.shape[2] != texts.shape[1]:
            raise EmbeddingShapeError(
                f"block embedding must be (n={len(ids)}, Nq, D={texts.shape[1]}), got shape {tuple(emb.shape)}"
            )
        if len(ids) == 0:
            continue
        if emb.dtype == torch.float16:
            _scan_block_fp16(emb, ids, texts, tops, max_norm)
        else:
            _scan_block_fp32(emb, ids, texts, tops)
    results = [top.result() for top in tops]
    return results[0] if single else results
