"""ITC scoring and exact top-k search over image embeddings: what searching an index adds to `blip2.scoring`.

A BLIP-2 image embedding is Nq query vectors of size D (Nq=32, D=256 for the released models), L2-normalised;
a text embedding is one D vector. The ITC similarity of an image and a text is the **maximum over the Nq query
vectors** of their dot product (cosine, no temperature), as in `Blip2ForImageTextRetrieval` and LAVIS
`compute_sim_matrix`; `itc_scores` is `blip2.scoring.itc_similarity` with shape checks and numpy inputs. The exact
paths below take the same maximum over scores summed in float64 (`exact_scores`), which a search must certify.

`search_blocks` scans a large float16 matrix block by block with a bounded memory footprint. On a CPU the fastest
exact way to do that is not to convert each block to float32 (the conversion costs ~4x the scan itself): torch's
float16 matrix-vector product reads the stored halves directly and accumulates in float32, so it runs at memory
bandwidth. Its result is rounded to float16, so it serves as a pre-filter with a proven error bound; every row that
could still enter the top-k is then re-scored in float32. The result equals a float32 full-matrix search.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from blip2.defaults import TOP_K
from blip2.errors import Blip2Error
from blip2.scoring import itc_similarity

__all__ = ["EmbeddingShapeError", "Int8Search", "exact_scores", "itc_scores", "search_blocks", "topk_images"]

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
    scores = itc_similarity(img.float(), txt.to(img.device))  # (Ni, Nt)
    return scores[:, 0] if single else scores


def topk_images(image_emb: ArrayLike, text_emb: ArrayLike, k: int = TOP_K) -> tuple[Tensor, Tensor]:
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


def exact_scores(emb: Tensor, text: Tensor) -> Tensor:
    """The exact scores of vectors emb (..., D) against one text (D,), rounded once to float32 -> (...,).

    The dot products are summed in float64 (error ~1e-14, far below float32's 6e-8), so the result does not depend
    on a kernel's summation order or on which rows are scored together: every exact path gives the same floats.
    """
    return (emb.double() @ text.double()).float()


def _exact_scores(emb: Tensor, text: Tensor) -> np.ndarray:
    """Exact ITC scores of rows emb (c, Nq, D) against one text (D,) -> float32 (c,)."""
    return exact_scores(emb, text).amax(dim=1).numpy()  # (c, Nq) -> (c,)


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
    text_emb: ArrayLike, blocks: Iterable[tuple[ArrayLike, ArrayLike]], k: int = TOP_K, *, max_norm: float = 1.0
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


# ---- exact search through an int8 pre-filter -------------------------------------------------------------------------
#
# Scanning 100k images x 32 x 256 float16 (1.6 GB) is bound by memory bandwidth and by float16 arithmetic, which a
# CPU without AVX512-FP16 does slowly. An int8 copy of the embeddings is half the bytes, and faiss scans int8 codes
# against an int8 query with integer arithmetic (`QT_8bit_direct_signed`: exact integer dot products, checked by
# `int8_kernel_is_exact`) at memory bandwidth. Its scores are approximate, but each is off by at most a bound that is
# proven below, so every image that could be in the exact top-k is found and re-scored from the float16 embeddings.
#
# Notation, per image vector e (the stored float16 values, as exact reals) and text t (float32, exact reals):
#   s (D,)     per-dimension step, max_v |e_vd| / 127 over the whole index (float32)
#   c = clip(rint(e / s), -127, 127)          integer code of e;   r = e - s*c (residual; |r| bounded above)
#   t' = t*s   (exact in float64: 24 x 24 bits);   sigma = max|t'| / 127;   q = rint(t' / sigma) (integer query)
#   u = t' - sigma*q                          query residual
# Then  t.e = t'.c + t.r = sigma*(q.c) + u.c + t.r,  and faiss returns a = q.c exactly (integers < 2^24), so
#   |t.e - sigma*a| <= |u|*|c| + |t|*|r|                                                      (Cauchy-Schwarz)
# The exact score s^ is t.e summed in float64 and rounded to float32 (`exact_scores`); for any order of summation
# |s^ - t.e| <= gamma * |t|*|e| with gamma = 2^-24 + D*2^-53 / (1 - D*2^-53). So with per-image maxima over its
# query vectors rho = max|r|, kappa = max|c|, nu = max|e| (stored rounded up to float32):
#   |s^_v - sigma*a_v| <= eps_i := |u|*kappa_i + |t|*(rho_i + gamma*nu_i)         for every vector v of image i.
# The search asks faiss for the K vectors with the largest a; A is the smallest returned. Image i's lower bound is
# L_i = max over its returned vectors of sigma*a_v - eps_i, and tau = the k-th largest L_i, so the k-th best exact
# image score is >= tau. A vector that was not returned has a <= A, so if sigma*A + max_i eps_i < tau (else K is
# raised), every vector whose exact score reaches tau was returned and has sigma*a_v + eps_i >= tau. Re-scoring
# exactly the returned vectors with sigma*a_v + eps_i >= tau gives every image whose exact score is >= tau its exact
# score (its best vector is among them), and at least k images have such a score, so their top-k, by score then id,
# is the brute-force top-k. All bound arithmetic is float64 with a margin far above its rounding (and above float32
# underflow, for texts of norm 1e-30..1e30; others, like zero or non-finite texts, are left to the plain scan).

INT8_MAX = 127
INT8_MAX_DIM = 1040  # D * 127^2 < 2^24: faiss's integer dot products are exact as float32 up to this D
_U32 = 2.0**-24  # unit roundoff of float32
_QUANT_ROWS = 1024  # images per quantisation step while building codes
_FIRST_K = 4096  # vectors asked of faiss at first; raised 4x while the bound cannot certify the result
_COMPLETE_MAX = 1 << 18  # up to this many vectors, ask faiss for all of them rather than give up


def int8_scale(emb: np.ndarray) -> np.ndarray:
    """Per-dimension step s = max |e_d| / 127 over (n, Nq, D) float16 embeddings; 1 for an all-zero dimension."""
    # |x| of a finite float16 is its bit pattern without the sign bit, and those patterns order like the values
    peak = np.zeros(emb.shape[-1], np.int16)
    for start in range(0, len(emb), _QUANT_ROWS):
        bits = emb[start : start + _QUANT_ROWS].view(np.int16).reshape(-1, emb.shape[-1])
        np.maximum(peak, (bits & 0x7FFF).max(axis=0), out=peak)
    step = peak.view(np.float16).astype(np.float32) / np.float32(INT8_MAX)
    return np.where(step > 0, step, np.float32(1.0))


def int8_quantize(emb: np.ndarray, scale: np.ndarray, codes: np.ndarray, bounds: np.ndarray) -> None:
    """Fill codes (n*Nq, D) uint8 (c + 128, faiss's layout) and bounds (n, 3) float32 (rho, kappa, nu, rounded up)
    from (n, Nq, D) float16 embeddings and the step `scale` (D,), block by block.

    The arithmetic is float32 (numpy: one thread, no waits on a busy machine) with its rounding bounded: for
    r~ = fl(fl(s*c) - e), |r~_d - r_d| <= u(1+u)|s_d c_d| + u|r_d| (u = 2^-24), so
    |r| <= (|r~| + u(1+u) max(s) |c|) / (1 - u); a float32 sum of D squares is within gamma_(D+1) of the exact
    one; sums of squared codes are exact integers (< 2^24).
    """
    n, nq, d = emb.shape
    rows = max(1, _QUANT_ROWS // 8)
    e, c, r = (np.empty((rows, nq, d), np.float32) for _ in range(3))
    n2 = np.empty((rows, nq, 3), np.float32)  # squared norms of r~, c, e
    gamma = (d + 1) * _U32 / (1 - (d + 1) * _U32)
    s_max = float(scale.max())
    for start in range(0, n, rows):
        m = min(rows, n - start)
        eb, cb, rb = e[:m], c[:m], r[:m]
        eb[...] = emb[start : start + m]
        np.rint(np.divide(eb, scale, out=cb), out=cb)
        np.clip(cb, -INT8_MAX, INT8_MAX, out=cb)  # any integer code is valid: r is measured below
        np.subtract(np.multiply(cb, scale, out=rb), eb, out=rb)
        for j, x in enumerate((rb, cb, eb)):
            np.einsum("iqd,iqd->iq", x, x, out=n2[:m, :, j])
        codes[start * nq : (start + m) * nq] = np.add(cb, 128, out=cb).reshape(-1, d)
        peak = n2[:m].max(axis=1).astype(np.float64)  # (m, 3) per image
        kappa = np.sqrt(peak[:, 1])
        rho = (np.sqrt(peak[:, 0] / (1 - gamma)) + _U32 * (1 + _U32) * s_max * kappa) / (1 - _U32)
        nu = np.sqrt(peak[:, 2] / (1 - gamma))
        bounds[start : start + m] = _round_up(np.stack([rho, kappa, nu], axis=1))


def _round_up(x: np.ndarray) -> np.ndarray:
    """float64 >= 0 -> a float32 above it (covers the float64 rounding of a norm, ~1e-14 relative)."""
    return np.nextafter((x * (1 + 1e-12)).astype(np.float32), np.float32(np.inf))


def int8_faiss_index(dim: int, size: int) -> tuple[Any, np.ndarray]:
    """An empty faiss int8 inner-product index for `size` vectors and a writable (size, dim) view of its codes."""
    import faiss

    index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit_direct_signed, faiss.METRIC_INNER_PRODUCT)
    index.codes.resize(size * dim)
    index.ntotal = size
    return index, faiss.rev_swig_ptr(index.codes.data(), size * dim).reshape(size, dim)


def int8_faiss_write(index: Any, path: Path) -> None:
    """Save a faiss int8 index (raises OSError or RuntimeError when the file cannot be written)."""
    import faiss

    faiss.write_index(index, str(path))


def int8_faiss_read(path: Path) -> Any:
    """A faiss int8 index read from `path` (its codes memory-mapped with faiss >= 1.10), or None if the file does
    not hold one. faiss ignores what follows the index in the file."""
    import faiss

    try:
        index = faiss.read_index(str(path), getattr(faiss, "IO_FLAG_MMAP_IFC", 0))
    except RuntimeError:
        return None
    ok = (
        isinstance(index, faiss.IndexScalarQuantizer)
        and index.sq.qtype == faiss.ScalarQuantizer.QT_8bit_direct_signed
        and index.metric_type == faiss.METRIC_INNER_PRODUCT
    )
    return index if ok else None


def int8_faiss_codes(index: Any) -> np.ndarray:
    """The (ntotal, d) uint8 codes a faiss int8 index holds (a view, also of a memory-mapped index)."""
    import faiss

    return faiss.rev_swig_ptr(index.codes.data(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def int8_kernel_is_exact(dim: int) -> bool:
    """Whether faiss is installed and its int8 scan gives exact integer dot products at this D (its SIMD code is
    chosen per CPU)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return dim <= INT8_MAX_DIM and _int8_kernel_check(dim)


@functools.cache
def _int8_kernel_check(dim: int) -> bool:
    rng = np.random.default_rng(dim)
    index, codes = int8_faiss_index(dim, 64)
    codes[:] = rng.integers(1, 256, codes.shape, dtype=np.uint8)  # c in [-127, 127]
    codes[0], codes[1], codes[2, ::2], codes[2, 1::2] = 255, 1, 255, 1  # extremes of both signs
    queries = rng.integers(-INT8_MAX, INT8_MAX + 1, (4, dim)).astype(np.float32)
    queries[0], queries[1] = INT8_MAX, -INT8_MAX
    got, rows = index.search(queries, len(codes))
    want = np.take_along_axis(queries.astype(np.int64) @ (codes.astype(np.int64) - 128).T, rows, axis=1)
    return bool(np.array_equal(got.astype(np.int64), want))


_Query = tuple[np.ndarray, float, float]  # integer query q (D,) float32, sigma, |u|


def _quantize_text(text: np.ndarray, scale: np.ndarray) -> _Query:
    """float64 text (D,) -> integer query q (float32), sigma and |u| (rounded up), as in the derivation above."""
    scaled = text * scale.astype(np.float64)  # t', exact
    peak = float(np.abs(scaled).max())
    sigma = peak / INT8_MAX
    q = np.clip(np.rint(scaled / sigma), -INT8_MAX, INT8_MAX)
    resid = float(np.linalg.norm(scaled - sigma * q)) * (1 + 1e-12) + 1e-15 * peak
    return q.astype(np.float32), sigma, resid


class Int8Search:
    """Exact ITC top-k over float16 embeddings, pre-filtered by a faiss int8 index of the same images.

    index: from `int8_faiss_index` (or read back from a file), holding the codes that `int8_quantize` made with
    `scale` (D,) and `bounds` (n, 3); emb: (n, Nq, D) float16, e.g. a memory map; ids: (n,) int64.
    """

    def __init__(self, index: Any, scale: np.ndarray, bounds: np.ndarray, emb: np.ndarray, ids: np.ndarray) -> None:
        self.index, self.scale, self.emb, self.ids = index, scale, emb, ids
        _, self.nq, self.dim = emb.shape
        self.codes = int8_faiss_codes(index)  # (n*Nq, D)
        gamma = _U32 + self.dim * 2.0**-53 / (1 - self.dim * 2.0**-53)
        b = bounds.astype(np.float64)
        self.kappa = b[:, 1]  # (n,)
        self.rho_nu = b[:, 0] + gamma * b[:, 2]  # (n,) the text-norm factor of eps
        self.max_kappa, self.max_rho_nu = float(self.kappa.max()), float(self.rho_nu.max())
        self.scale_of_scores = float(b[:, 2].max() + b[:, 0].max())  # >= |e|, |s*c| for the rounding margin

    def search(self, texts: Tensor, k: int) -> list[list[tuple[int, float]] | None]:
        """For each text of (Nt, D): its exact top-k as (id, score), best first (score descending, ties by id), or
        None where the pre-filter could not certify it cheaply (a zero or non-finite text, embeddings all alike):
        search those another way."""
        nv = len(self.ids) * self.nq
        out: list[list[tuple[int, float]] | None] = [None] * len(texts)
        norms = texts.double().norm(dim=1)  # NaN or inf for non-finite texts
        todo = [j for j in range(len(texts)) if 1e-30 < float(norms[j]) < 1e30]
        queries = {j: _quantize_text(texts[j].double().numpy(), self.scale) for j in todo}
        want = max(_FIRST_K, 64 * k)
        while todo:
            if want > nv // 2:
                if nv > _COMPLETE_MAX:
                    break  # past a fraction of a large index, a plain scan is cheaper than a larger K
                want = nv
            vals, rows = self.index.search(np.stack([queries[j][0] for j in todo]), want)
            retry = []
            for j, a, lab in zip(todo, vals, rows, strict=True):
                out[j] = self._certify(texts[j], queries[j], a, lab, k, complete=want >= nv)
                if out[j] is None:
                    retry.append(j)
            if want >= nv:
                break
            todo, want = retry, 4 * want
        return out

    def _certify(
        self, text: Tensor, query: _Query, a: np.ndarray, lab: np.ndarray, k: int, complete: bool
    ) -> list[tuple[int, float]] | None:
        """The exact top-k from faiss's best K vectors (a, lab), or None when the bound cannot certify it."""
        q, sigma, u_norm = query
        head = lab[:4]
        if not np.array_equal(a[:4].astype(np.int64), (self.codes[head].astype(np.int64) - 128) @ q.astype(np.int64)):
            return None  # faiss did not compute what the bound assumes: never trust it
        t_norm = float(text.double().norm())
        # >> float64 rounding (relative 1e-16) and float32 underflow (2^-149 per product)
        pad = 1e-9 * (t_norm + u_norm * self.max_kappa) * self.scale_of_scores + self.dim * 2.0**-140
        img = lab // self.nq  # (K,) image positions
        eps = u_norm * self.kappa[img] + t_norm * self.rho_nu[img] + pad  # (K,)
        approx = sigma * a.astype(np.float64)  # (K,)
        order = np.argsort(img, kind="stable")
        pos, at = np.unique(img[order], return_index=True)  # images in runs
        lower = np.maximum.reduceat((approx - eps)[order], at)  # (images,) a lower bound of each exact score
        if len(pos) >= k:
            tau = float(np.partition(lower, len(lower) - k)[len(lower) - k])
        elif complete:
            tau = -np.inf
        else:
            return None
        if not complete:
            eps_max = u_norm * self.max_kappa + t_norm * self.max_rho_nu + pad
            if sigma * float(a.min()) + eps_max >= tau:
                return None  # a vector faiss did not return could still reach the top-k
        vec = np.sort(lab[approx + eps >= tau])  # (m,) vectors to re-score, in file order
        rows = torch.from_numpy(self.emb.reshape(-1, self.dim)[vec])  # (m, D) float16
        exact = exact_scores(rows, text).numpy()  # (m,) float32
        pos, at = np.unique(vec // self.nq, return_index=True)
        top = _RunningTopK(k)
        top.merge(self.ids[pos], np.maximum.reduceat(exact, at))
        return top.result()
