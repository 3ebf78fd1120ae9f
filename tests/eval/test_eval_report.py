"""Result files: atomic JSON and a readable table; a failure means a crash could leave a truncated results file or
the printed table would hide a skipped metric."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from blip2.eval import EvalError, format_table, save_eval, to_records, write_json_atomic


def test_json_is_written_atomically_and_strictly(tmp_path: Path) -> None:
    """NumPy values become plain JSON, NaN becomes null, and no temp file is left behind."""
    path = write_json_atomic(tmp_path / "out" / "r.json", {"a": np.float32(0.5), "b": float("nan"), 3: np.arange(2)})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 0.5, "b": None, "3": [0, 1]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    """An unserialisable result raises an error naming the file and leaves the old results intact."""
    path = write_json_atomic(tmp_path / "r.json", {"ok": 1})
    with pytest.raises(EvalError, match=r"r\.json"):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text(encoding="utf-8")) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_table_shows_values_nested_types_and_skip_reasons() -> None:
    """Nested per-type scores flatten to dotted rows; a skipped metric shows 'skipped' and why."""
    results = {
        "overall": 53.333,
        "per_answer_type": {"yes/no": 100.0},
        "n_questions": 3,
        "per_question": {1: 100.0},
        "SPICE": None,
        "skipped": {"SPICE": "no CoreNLP"},
    }
    table = format_table(results, title="vqa")
    assert "overall" in table and "53.3330" in table
    assert "per_answer_type.yes/no" in table and "100.0000" in table
    assert "per_question" not in table
    assert "SPICE skipped: no CoreNLP" in table


def test_save_eval_writes_predictions_beside_results(tmp_path: Path) -> None:
    """Predictions, results JSON and the table land side by side under one name."""
    preds = to_records({1: "yes"}, "question_id", "answer")
    paths = save_eval(tmp_path, "vqav2_val", {"overall": 100.0}, predictions=preds)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "vqav2_val_predictions.json",
        "vqav2_val_results.json",
        "vqav2_val_results.txt",
    ]
    assert json.loads(paths["predictions"].read_text(encoding="utf-8")) == [{"question_id": 1, "answer": "yes"}]
    assert "overall" in paths["table"].read_text(encoding="utf-8")
