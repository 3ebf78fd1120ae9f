"""Batch captioning of large image collections: readers, writers, resume, and an optional Ray engine.

    from blip2.batch import caption_images
    for r in caption_images("photos/", model="Salesforce/blip2-opt-2.7b", out=["captions.jsonl"], recursive=True):
        ...

Nothing here imports Ray; `blip2.batch.ray_engine` does, and only the `--engine ray` path imports that.
"""

from ..sources import Item, expand_braces, iter_items
from .engine import BatchOptions, Result, Summary, generate_batch
from .run import BatchRun, caption_images

__all__ = [
    "BatchOptions",
    "BatchRun",
    "Item",
    "Result",
    "Summary",
    "caption_images",
    "expand_braces",
    "generate_batch",
    "iter_items",
]
