"""Image-text scores in one place: ITC similarity, ITM match, and the re-ranking that combines them.

- **ITC similarity** of an image and a text: the maximum over the image's Nq query embeddings of their cosine with
  the text embedding (both L2-normalised, so a dot product), no temperature, as `Blip2ForImageTextRetrieval` and
  LAVIS `compute_sim_matrix`. Training divides it by the learned temperature (`train.losses.itc_loss`).
- **ITM**: the Q-Former runs queries and text together (bidirectional) and `itm_head`, averaged over the query
  rows, gives two logits (no match, match). `Blip2.match` reports the probability of a match (softmax, second
  column); re-ranking adds the match logit itself (LAVIS's `[:, 1]`) to the ITC similarity.
- **Re-ranking** (LAVIS `compute_sim_matrix`): a query's top k candidates by ITC are re-scored `ITM logit + ITC`.
  `rerank_rows` does it for every row of a score matrix (evaluation), `rerank_list` for one best-first list whose
  candidates may lack an ITM logit (search, where an indexed image may be gone).

Layering: this module imports only torch and numpy. `pipeline` (the user-facing model) and the product rooms
(`retrieval`, `eval`, `train`) import it and it imports none of them, so there is no cycle; `retrieval.scoring`
adds what is specific to searching an index (exact blocked top-k, the int8 pre-filter) on top of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "itc_similarity",
    "itm_logits",
    "match_logit",
    "match_probability",
    "rerank_list",
    "rerank_rows",
    "top_k",
]


# ---- ITC -------------------------------------------------------------------------------------------------------------
def _itc(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    return torch.einsum("iqe,te->itq", image_emb, text_emb).amax(dim=-1)  # (Ni, Nt, Nq) -> (Ni, Nt)


def itc_similarity(
    image_emb: Tensor, text_emb: Tensor, *, chunk: int | None = None, device: torch.device | str | None = None
) -> Tensor:
    """ITC similarity (Ni, Nt) of query embeddings (Ni, Nq, E) and text embeddings (Nt, E): max over the queries.

    Computed in the inputs' dtype, differentiably. With `chunk`, `chunk` images at a time, so the (chunk, Nt, Nq)
    products stay small (COCO 5k x 25k x 32 floats at once would be 16 GB); with `device`, there (e.g. the model's
    GPU, for embeddings kept on the CPU). The result is on the images' device.
    """
    if chunk is None and device is None:
        return _itc(image_emb, text_emb)
    dev = image_emb.device if device is None else torch.device(device)
    txt = text_emb.to(dev)
    step = max(1, chunk or len(image_emb))
    rows = [_itc(image_emb[s : s + step].to(dev), txt).to(image_emb.device) for s in range(0, len(image_emb), step)]
    return torch.cat(rows) if rows else image_emb.new_zeros((0, len(text_emb)))


# ---- ITM -------------------------------------------------------------------------------------------------------------
def itm_logits(model: Any, image_embeds: Tensor, ids: Tensor, mask: Tensor, *, chunk: int | None = None) -> Tensor:
    """The two ITM logits (B, 2) float32 of each pair (image_embeds[b] (N, Dv) vision features, text ids[b]).

    `model` is a `Blip2Model` with a text side; `chunk` pairs per forward pass (all at once by default).
    """
    step = max(1, chunk or len(ids))
    out = [
        model.itm_logits(image_embeds[s : s + step], ids[s : s + step], mask[s : s + step])
        for s in range(0, len(ids), step)
    ]
    return torch.cat(out).float() if out else torch.zeros((0, 2))


def match_logit(logits: Tensor) -> Tensor:
    """(..., 2) ITM logits -> (...,) the match logit: the ITM score re-ranking adds to ITC (LAVIS)."""
    return logits[..., 1]


def match_probability(logits: Tensor) -> Tensor:
    """(..., 2) ITM logits -> (...,) the probability that the text describes the image."""
    return logits.float().softmax(dim=-1)[..., 1]


# ---- re-ranking ------------------------------------------------------------------------------------------------------
def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest of (n,) scores, in no particular order (each gets its own re-ranked score)."""
    return np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))


def rerank_rows(
    itc: np.ndarray, k: int, itm: Callable[[int, np.ndarray], np.ndarray], fill: float = -np.inf
) -> np.ndarray:
    """Re-rank every row of an ITC matrix (R, C): its top k columns score `ITM + ITC`, every other entry `fill`.

    itm(row, columns) -> the (len(columns),) ITM match logits of that row's candidates; it is called once per row,
    in row order, so a model-backed callable gets one ready-made batch. Returns float64 (R, C).
    """
    sim = np.asarray(itc, dtype=np.float64)
    out = np.full(sim.shape, fill, dtype=np.float64)
    k = min(k, sim.shape[1])
    for r, row in enumerate(sim):
        cand = top_k(row, k)
        out[r, cand] = np.asarray(itm(r, cand), dtype=np.float64).reshape(-1) + row[cand]
    return out


def rerank_list(itc: Sequence[float], itm: Sequence[float | None], k: int) -> list[tuple[int, float, float | None]]:
    """Re-rank a best-first ITC list: of its first k, those with an ITM match logit (`itm[i]`, None: not scored)
    score `ITM + ITC` and come first, best first (ties keep the ITC order); the rest follow in ITC order with their
    ITC score. Returns (position in `itc`, score, ITM logit or None) per entry."""
    head: list[tuple[int, float, float | None]] = []
    tail: list[tuple[int, float, float | None]] = []
    for i, sim in enumerate(itc):
        logit = itm[i] if i < min(k, len(itm)) else None
        if logit is None:
            tail.append((i, sim, None))
        else:
            head.append((i, logit + sim, logit))
    return sorted(head, key=lambda h: -h[1]) + tail
