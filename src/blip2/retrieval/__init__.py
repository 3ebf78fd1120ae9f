"""Image-text retrieval: ITC scoring, exact blocked top-k search, and the SQLite image index."""

from blip2.retrieval.index import FORMAT_VERSION, Hit, Index, IndexFileError, IndexRow, OptionalDependencyError
from blip2.retrieval.scoring import EmbeddingShapeError, itc_scores, search_blocks, topk_images

__all__ = [
    "FORMAT_VERSION",
    "EmbeddingShapeError",
    "Hit",
    "Index",
    "IndexFileError",
    "IndexRow",
    "OptionalDependencyError",
    "itc_scores",
    "search_blocks",
    "topk_images",
]
