"""Shared helpers of the evaluation room: the error class and JSON reading that names the file on failure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blip2.errors import Blip2Error


class EvalError(Blip2Error):
    """Evaluation input is unusable: an annotation file, predictions that do not match it, or a missing tool."""


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; every failure becomes an `EvalError` that names the file (and line, for bad JSON)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"{p}: annotation file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{p}: cannot read annotation file ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def field(record: Any, key: str, path: str | Path, where: str) -> Any:
    """`record[key]`, or an `EvalError` saying which file and which entry (`where`) lacks it."""
    if not isinstance(record, dict):
        raise EvalError(f"{path}: {where} is a {type(record).__name__}, expected a JSON object")
    if key not in record:
        raise EvalError(f"{path}: {where} has no '{key}' key")
    return record[key]


def top_list(data: Any, key: str, path: str | Path) -> list:
    """`data[key]` as a list: the top level of the official VQA / COCO files is `{key: [...]}`."""
    if not isinstance(data, dict) or key not in data:
        raise EvalError(f"{path}: expected a JSON object with a '{key}' list at the top level")
    items = data[key]
    if not isinstance(items, list):
        raise EvalError(f"{path}: '{key}' is a {type(items).__name__}, expected a list")
    return items


def karpathy_entry(ann: Any, i: int, path: str | Path) -> tuple[Any, list[str]]:
    """Entry `i` of a Karpathy-style list: its `image` and its captions (`caption`: a text or a non-empty list)."""
    where = f"entry [{i}]"
    image = field(ann, "image", path, where)
    caption = field(ann, "caption", path, where)
    captions = [caption] if isinstance(caption, str) else caption
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise EvalError(f"{path}: {where}.caption must be text or a non-empty list of texts, got {caption!r}")
    return image, captions
