"""Moved to `blip2.sources` (what to read) and `blip2.imagemap` (`prepare`); kept so that old imports still work."""

from ..imagemap import prepare
from ..sources import (
    HEAD_BYTES,
    LIST_SUFFIXES,
    PATH_FIELDS,
    TAR_SUFFIXES,
    Item,
    expand_braces,
    iter_items,
    looks_like_image,
    read_item,
)

__all__ = [
    "HEAD_BYTES",
    "LIST_SUFFIXES",
    "PATH_FIELDS",
    "TAR_SUFFIXES",
    "Item",
    "expand_braces",
    "iter_items",
    "looks_like_image",
    "prepare",
    "read_item",
]
