"""Two-stage search with a model, as LAVIS `compute_sim_matrix`: ITC over the index, then ITM re-ranking.

Text-to-image: ITC similarity (cosine, max over the query vectors) over the whole index (`Index.search`, exact),
then, with `rerank=K`, the top K candidates are re-scored with the ITM head: `score = ITM + ITC`, where ITM is the
**positive-class logit** of `itm_head` (`logit[:, 1]`, averaged over the query rows, not a probability) and ITC is
the similarity. Re-ranked results come first; candidates beyond K (and images that cannot be opened any more)
follow in ITC order with their ITC score. Re-ranking re-opens the images from the paths stored in the index (tar
members from their shard). Image-to-text ranks given texts for one image the same way; image-to-image compares the
mean-pooled query embeddings (`Index.search_by_image`). The scores and the re-ranking rule are `blip2.scoring`'s.
"""

from __future__ import annotations

import os
import tarfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import scoring
from ..defaults import TOP_K
from ..errors import ImageError
from ..scoring import itc_similarity, match_logit, rerank_list

if TYPE_CHECKING:
    from ..pipeline import Blip2, ImageInput
    from .index import Index

__all__ = ["ITM_CHUNK", "Ranked", "itm_logits", "open_indexed", "search_like", "search_text", "search_texts_for_image"]

ITM_CHUNK = 16  # image-text pairs per ITM forward pass


@dataclass
class Ranked:
    """One result: an image path (text-to-image, image-to-image) or a text (image-to-text), best first."""

    target: str
    score: float  # ITM + ITC when re-ranked, else ITC (or the image-image cosine)
    itc: float
    itm: float | None = None  # positive-class ITM logit; None when not re-ranked
    id: int | None = None  # the index row id of an image


def open_indexed(key: str) -> ImageInput:
    """What the index stored as a path, ready for `load_image`: the file, or a tar member's bytes."""
    from ..sources import TAR_SUFFIXES

    if os.path.isfile(key):
        return key
    low = key.lower()
    for suffix in TAR_SUFFIXES:
        cut = low.find(suffix + "/")
        if cut >= 0 and os.path.isfile(key[: cut + len(suffix)]):
            shard, member = key[: cut + len(suffix)], key[cut + len(suffix) + 1 :]
            try:
                with tarfile.open(shard, "r:*") as tar:
                    fp = tar.extractfile(member)
                    if fp is not None:
                        return fp.read()
            except (tarfile.TarError, KeyError, OSError) as e:
                raise ImageError(f"{key}: cannot read the member from {shard} ({e})") from e
    raise ImageError(f"{key}: no such file (indexed, but moved or deleted since)")


def itm_logits(m: Blip2, image_embeds: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """Positive-class ITM logit of the pairs (image_embeds[i] (N, Dv), texts[i]) -> float32 (B,), as LAVIS."""
    ids, mask = m.text_ids(texts)
    with torch.no_grad():
        return match_logit(scoring.itm_logits(m.model, image_embeds, ids, mask, chunk=ITM_CHUNK)).cpu()


def _rerank(ranked: list[Ranked], itm: Sequence[float | None], top: int) -> list[Ranked]:
    """Re-score the first `top` results that have an ITM logit; they come first, the rest follow in ITC order."""
    return [
        Ranked(ranked[i].target, score, ranked[i].itc, logit, ranked[i].id)
        for i, score, logit in rerank_list([r.itc for r in ranked], itm, top)
    ]


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def search_text(
    m: Blip2,
    index: Index,
    query: str,
    k: int = TOP_K,
    rerank: int = 0,
    approximate: bool = False,
    on_skip: Callable[[str], None] = _warn,
) -> list[Ranked]:
    """Text-to-image: ITC top-max(k, rerank) from the index, the top `rerank` re-scored with ITM; k results.

    An image that cannot be re-opened for re-ranking keeps its ITC score; `on_skip` gets a message naming it.
    """
    from ..processing import load_image

    hits = index.search(m.embed_texts([query])[0], max(k, rerank), approximate=approximate)[0]
    ranked = [Ranked(h.path, h.score, h.score, None, h.id) for h in hits]
    if not rerank:
        return ranked[:k]
    pixels, ok = [], []
    for i, h in enumerate(hits[:rerank]):
        try:
            pixels.append(m.transform([load_image(open_indexed(h.path))])[0])
            ok.append(i)
        except ImageError as e:
            on_skip(f"not re-ranked: {e}")
    itm: list[float | None] = [None] * len(hits)
    for s in range(0, len(ok), ITM_CHUNK):
        px = torch.stack(pixels[s : s + ITM_CHUNK]).to(m.device, m.dtype)
        with torch.no_grad():
            image_embeds = m.model.encode_image(px)  # (b, N, Dv)
        for i, logit in zip(ok[s : s + ITM_CHUNK], itm_logits(m, image_embeds, [query] * len(px)).tolist()):
            itm[i] = logit
    return _rerank(ranked, itm, rerank)[:k]


def search_texts_for_image(
    m: Blip2, image: ImageInput, texts: Sequence[str], k: int = TOP_K, rerank: int = 0
) -> list[Ranked]:
    """Image-to-text: rank `texts` for one image by ITC, the top `rerank` re-scored with ITM; k results."""
    with torch.no_grad():
        image_embeds = m.model.encode_image(m.pixel_values([image]))  # (1, N, Dv)
        img = m.model.image_embeddings(image_embeds).float()  # (1, Nq, E)
    itc = itc_similarity(img, m.embed_texts(texts))[0]  # (Nt,)
    order = sorted(range(len(texts)), key=lambda i: (-float(itc[i]), i))[: max(k, rerank)]
    ranked = [Ranked(texts[i], float(itc[i]), float(itc[i])) for i in order]
    if not rerank:
        return ranked[:k]
    top = [r.target for r in ranked[:rerank]]
    logits = itm_logits(m, image_embeds.expand(len(top), -1, -1), top).tolist()
    return _rerank(ranked, logits, rerank)[:k]


def search_like(m: Blip2, index: Index, image: ImageInput, k: int = TOP_K) -> list[Ranked]:
    """Image-to-image: cosine of the mean-pooled query embeddings (`Index.search_by_image`)."""
    hits = index.search_by_image(m.embed_images([image])[0], k)
    return [Ranked(h.path, h.score, h.score, None, h.id) for h in hits]
