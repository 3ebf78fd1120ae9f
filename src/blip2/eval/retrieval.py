"""Image-text retrieval recall as LAVIS `RetrievalTask._report_metrics`, the LAVIS top-k ITM re-ranking
(`blip2_models/blip2.py` `compute_sim_matrix`) with the model behind a callable, and the Karpathy-style loader.

Scores are plain NumPy matrices so a CLI can compute them with any model (or load them from disk) and pass them in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blip2.defaults import EVAL_K_TEST
from blip2.eval._common import EvalError, karpathy_entry, read_json
from blip2.eval.caption import normalize_caption
from blip2.scoring import rerank_rows

# Score LAVIS gives every pair outside a query's top-k: below any ITM logit + cosine, so those pairs rank last.
NON_CANDIDATE_SCORE = -100.0

ItmFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class RetrievalSet:
    """A retrieval split: image files, all captions flattened, and the gt links both ways (as LAVIS builds them)."""

    images: list[str]
    texts: list[str]
    img2txt: list[list[int]]  # image index → indices of its captions in `texts`
    txt2img: list[int]  # caption index → index of its image


def load_retrieval_annotations(path: str | Path, *, normalize: bool = True, max_words: int = 50) -> RetrievalSet:
    """Read a Karpathy-style list `[{"image": path, "caption": [str, ...] | str}, ...]` (e.g. LAVIS
    `coco_karpathy_test.json`, `flickr30k_test.json`). Captions go through `normalize_caption` by default, as LAVIS
    `RetrievalEvalDataset` passes them through its `blip_caption` text processor."""
    data = read_json(path)
    if not isinstance(data, list) or not data:
        raise EvalError(f"{path}: expected a non-empty JSON list of {{'image', 'caption'}} entries")
    out = RetrievalSet([], [], [], [])
    for i, ann in enumerate(data):
        image, captions = karpathy_entry(ann, i, path)
        out.images.append(str(image))
        out.img2txt.append([])
        for c in captions:
            out.img2txt[-1].append(len(out.texts))
            out.txt2img.append(i)
            out.texts.append(normalize_caption(c, max_words) if normalize else c)
    return out


def _check_links(n_images: int, n_texts: int, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]) -> None:
    if len(img2txt) != n_images:
        raise EvalError(f"img2txt has {len(img2txt)} entries but the score matrix has {n_images} images (rows)")
    if len(txt2img) != n_texts:
        raise EvalError(f"txt2img has {len(txt2img)} entries but the score matrix has {n_texts} texts (columns)")
    for i, gts in enumerate(img2txt):
        if not gts or any(not 0 <= t < n_texts for t in gts):
            raise EvalError(f"img2txt[{i}] = {list(gts)!r}: needs at least one text index in [0, {n_texts})")
    bad = [t for t, i in enumerate(txt2img) if not 0 <= i < n_images]
    if bad:
        raise EvalError(f"txt2img[{bad[0]}] = {txt2img[bad[0]]!r} is not an image index in [0, {n_images})")


def _positions(row: np.ndarray) -> np.ndarray:
    """Position of each candidate when `row` is sorted best first, with LAVIS's `np.argsort(row)[::-1]` (so ties
    break exactly as in LAVIS)."""
    order = np.argsort(row)[::-1]
    pos = np.empty(len(order), dtype=np.int64)
    pos[order] = np.arange(len(order))
    return pos


def recall_at_k(
    scores_i2t: np.ndarray,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    scores_t2i: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@k in % both ways, as LAVIS `_report_metrics`.

    scores_i2t: (Ni, Nt), higher is better; an image's rank is that of its best-ranked gt caption.
    scores_t2i: (Nt, Ni); defaults to `scores_i2t.T`. Re-ranked scores differ per direction: pass both.
    Returns txt_r{k} (image→text), txt_r_mean, img_r{k} (text→image), img_r_mean, r_mean and LAVIS's
    agg_metrics (= txt_r_mean). Values are unrounded, as LAVIS logs them."""
    s_i2t = np.asarray(scores_i2t, dtype=np.float64)
    if s_i2t.ndim != 2:
        raise EvalError(f"scores_i2t must be a 2-D (images, texts) matrix, got shape {s_i2t.shape}")
    n_img, n_txt = s_i2t.shape
    s_t2i = s_i2t.T if scores_t2i is None else np.asarray(scores_t2i, dtype=np.float64)
    if s_t2i.shape != (n_txt, n_img):
        raise EvalError(f"scores_t2i has shape {s_t2i.shape}, expected (texts, images) = {(n_txt, n_img)}")
    if not ks or any(int(k) < 1 for k in ks):
        raise EvalError(f"ks = {tuple(ks)!r}: every k must be a positive integer")
    _check_links(n_img, n_txt, img2txt, txt2img)

    txt_ranks = np.array([_positions(row)[list(img2txt[i])].min() for i, row in enumerate(s_i2t)])
    img_ranks = np.array([_positions(row)[txt2img[t]] for t, row in enumerate(s_t2i)])
    out: dict[str, float] = {}
    for prefix, ranks in (("txt", txt_ranks), ("img", img_ranks)):
        recalls = [100.0 * float(np.count_nonzero(ranks < int(k))) / len(ranks) for k in ks]
        out.update({f"{prefix}_r{int(k)}": r for k, r in zip(ks, recalls, strict=True)})
        out[f"{prefix}_r_mean"] = sum(recalls) / len(recalls)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["agg_metrics"] = out["txt_r_mean"]  # what LAVIS selects checkpoints by
    return out


def _itm_scores(itm_fn: ItmFn, img_idx: np.ndarray, txt_idx: np.ndarray) -> np.ndarray:
    scores = np.asarray(itm_fn(img_idx, txt_idx), dtype=np.float64).reshape(-1)
    if scores.shape != (len(img_idx),):
        raise EvalError(f"itm_fn returned {scores.size} scores for {len(img_idx)} (image, text) pairs")
    return scores


def rerank_topk(itc: np.ndarray, itm_fn: ItmFn, k: int = EVAL_K_TEST) -> tuple[np.ndarray, np.ndarray]:
    """LAVIS re-ranking (`blip2.scoring.rerank_rows`): for each image its top-k texts by ITC, and for each text its
    top-k images, are scored `ITM + ITC`; every other pair gets -100.

    itc: (Ni, Nt) ITC similarity. itm_fn(image_indices, text_indices) -> (P,) ITM score of each pair (LAVIS uses
    the positive ITM logit averaged over queries); it is called once per image row and once per text column with
    min(k, N) pairs, so a model-backed callable gets a ready-made batch.
    Returns (scores_i2t (Ni, Nt), scores_t2i (Nt, Ni)) for `recall_at_k`."""
    sim = np.asarray(itc, dtype=np.float64)
    if sim.ndim != 2 or 0 in sim.shape:
        raise EvalError(f"itc must be a non-empty 2-D (images, texts) matrix, got shape {sim.shape}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise EvalError(f"k = {k!r}: the number of re-ranked candidates must be a positive integer")
    scores_i2t = rerank_rows(
        sim, int(k), lambda i, cand: _itm_scores(itm_fn, np.full(len(cand), i), cand), NON_CANDIDATE_SCORE
    )
    scores_t2i = rerank_rows(
        sim.T, int(k), lambda t, cand: _itm_scores(itm_fn, cand, np.full(len(cand), t)), NON_CANDIDATE_SCORE
    )
    return scores_i2t, scores_t2i
