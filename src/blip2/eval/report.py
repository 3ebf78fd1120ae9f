"""Results on disk: JSON written atomically (`durable.atomic_write`: a crash never leaves half a file) and a
plain-text table for people.

`save_eval` writes `<name>_predictions.json`, `<name>_results.json` and `<name>_results.txt` side by side, so
every score can be traced back to the answers that produced it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from blip2.durable import atomic_write
from blip2.eval._common import EvalError


def _jsonable(value: Any) -> Any:
    """NumPy scalars/arrays → Python; NaN/inf → null, because strict JSON readers reject NaN (SPICE can emit it)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write `data` as indented UTF-8 JSON via a temp file in the same folder and a rename; returns the path."""
    p = Path(path)
    try:
        text = json.dumps(_jsonable(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise EvalError(f"{p}: results are not JSON-serialisable ({e})") from None
    atomic_write(p, text)
    return p


def _rows(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _rows(value, f"{name}.")
        else:
            yield name, value


def _fmt(value: Any) -> str:
    if value is None:
        return "skipped"
    if isinstance(value, bool | str):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.4f}"
    return str(value)


def format_table(results: Mapping[str, Any], title: str | None = None) -> str:
    """Two aligned columns, nested dicts flattened as `per_answer_type.yes/no`; `skipped` reasons and the bulky
    `per_question` / `per_image` entries are left out of the table (they stay in the JSON)."""
    hidden = {"skipped", "per_question", "per_image"}
    rows = list(_rows({k: v for k, v in results.items() if k not in hidden}))
    width = max((len(name) for name, _ in rows), default=0)
    lines = [title, "=" * max(len(title), width + 12)] if title else []
    lines += [f"{name:<{width}}  {_fmt(value):>10}" for name, value in rows]
    for metric, reason in (results.get("skipped") or {}).items():
        lines.append(f"{metric} skipped: {reason}")
    return "\n".join(lines) + "\n"


def to_records(mapping: Mapping[Any, Any], key_name: str, value_name: str) -> list[dict[str, Any]]:
    """{id: value} → [{key_name: id, value_name: value}], the official result-file shape: ("question_id",
    "answer") for VQA, ("image_id", "caption") for COCO captions. Keeps ids' types, which JSON object keys would not."""
    return [{key_name: k, value_name: v} for k, v in mapping.items()]


def save_eval(
    out_dir: str | Path,
    name: str,
    results: Mapping[str, Any],
    predictions: Any = None,
    title: str | None = None,
) -> dict[str, Path]:
    """Write `<name>_results.json`, `<name>_results.txt` (the table) and, if given, `<name>_predictions.json` in
    `out_dir`, each atomically. Returns {"results", "table", "predictions"?} → paths."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    if predictions is not None:
        paths["predictions"] = write_json_atomic(out / f"{name}_predictions.json", predictions)
    paths["results"] = write_json_atomic(out / f"{name}_results.json", results)
    paths["table"] = out / f"{name}_results.txt"
    atomic_write(paths["table"], format_table(results, title or name))
    return paths
