"""VQA accuracy and GQA exact match against hand-computed values; a failure here means reported VQA numbers would
not be comparable with the paper's (Table 2) or with LAVIS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip2.eval import (
    EvalError,
    VqaAnnotation,
    gqa_accuracy,
    load_gqa_answers,
    load_vqa_annotations,
    load_vqa_questions,
    normalize_vqa_answer,
    question_accuracy,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),  # number words become digits
        ("a dog.", "dog"),  # article dropped, trailing period stripped
        ("yes!", "yes"),
        ("The Red One", "red 1"),  # lower-cased; "one" is a number word too
        ("none", "0"),
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("1,000", "1000"),  # digit-comma-digit: all punctuation deleted, not spaced
        ("red, white", "red white"),  # ", " touches a space: deleted
        ("t-shirt", "t shirt"),  # "-" touches no space: becomes a space
        ("dont", "don't"),  # contractions table
        ("  left\tside\n", "left side"),  # tabs/newlines become spaces, then strip
    ],
)
def test_answer_normalisation_matches_official(raw: str, expected: str) -> None:
    """If this fails, correct answers like "Two" or "a dog." would be scored wrong against "2" / "dog"."""
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(("n_match", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_accuracy_by_hand(n_match: int, expected: float) -> None:
    """min(1, matches/3) over the 10 leave-one-out subsets. 2 of 10 humans agree: 2 subsets keep 1 match (1/3) and
    8 keep 2 (2/3), so (2/3 + 16/3) / 10 = 0.6. 3 agree: (3 * 2/3 + 7 * 1) / 10 = 0.9, not 1 — only 4 reach 100.
    A failure means per-question VQA scores differ from the official script."""
    answers = ["dog"] * n_match + ["cat"] * (10 - n_match)
    assert question_accuracy("dog", answers) == pytest.approx(expected)


def test_ground_truth_is_only_punctuation_processed_when_humans_disagree() -> None:
    """The official script leaves unanimous gt answers untouched and never lower-cases gt: a unanimous "Yes" does
    not match the prediction "yes". If this fails the port no longer reproduces official numbers."""
    assert question_accuracy("yes", ["Yes"] * 10) == 0.0
    # Disagreeing humans: gt gets punctuation processing, so "t-shirt" (→ "t shirt") matches the prediction.
    assert question_accuracy("t-shirt", ["t-shirt"] * 5 + ["shirt"] * 5) == 1.0
    # ...but not digit/article processing: gt "two" never equals the normalised prediction "2".
    assert question_accuracy("two", ["two"] * 5 + ["2"] * 5) == 1.0  # matches via the five "2"s
    assert question_accuracy("two", ["two"] * 5 + ["three"] * 5) == 0.0


def _ann(qid: int, qtype: str, atype: str, answers: list[str]) -> VqaAnnotation:
    return VqaAnnotation(qid, 100 + qid, qtype, atype, tuple(answers))


def test_overall_and_per_type_breakdown_by_hand() -> None:
    """Three questions scoring 1, 0.6 and 0: overall 100 * 1.6 / 3 = 53.33; each type its own mean. A failure means
    the per-answer-type table (yes/no, number, other) a user compares with papers is wrong."""
    annotations = {
        1: _ann(1, "is the", "yes/no", ["yes"] * 10),
        2: _ann(2, "how many", "number", ["2"] * 2 + ["3"] * 8),
        3: _ann(3, "what color", "other", ["red"] * 10),
        4: _ann(4, "what color", "other", ["blue"] * 10),
    }
    result = vqa_accuracy({1: "Yes", 2: "two", "3": "blue"}, annotations)
    assert result["overall"] == 53.33
    assert result["per_answer_type"] == {"number": 60.0, "other": 0.0, "yes/no": 100.0}
    assert result["per_question_type"] == {"how many": 60.0, "is the": 100.0, "what color": 0.0}
    assert result["per_question"] == {1: 100.0, 2: 60.0, 3: 0.0}
    assert (result["n_questions"], result["n_unanswered"]) == (3, 1)


def test_prediction_for_unknown_question_is_an_error_naming_it() -> None:
    """A predictions file from another split must not be silently half-scored."""
    with pytest.raises(EvalError, match="999"):
        vqa_accuracy({999: "yes"}, {1: _ann(1, "is", "yes/no", ["yes"] * 10)})


def test_gqa_exact_match_normalises_both_sides() -> None:
    """GQA: one gt answer, exact match after the VQA normalisation on prediction and gt (LAVIS GQATask)."""
    answers = {"q1": "red one", "q2": "2", "q3": "blue"}
    result = gqa_accuracy({"q1": "The red one.", "q2": "two", "q3": "red"}, answers)
    assert result["accuracy"] == pytest.approx(200 / 3)
    assert result["n_questions"] == 3


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_loaders_read_official_files(tmp_path: Path) -> None:
    """The official VQAv2 question and annotation JSON load into what vqa_accuracy takes."""
    q = _write(tmp_path / "q.json", {"questions": [{"image_id": 7, "question": "What?", "question_id": 70}]})
    a = _write(
        tmp_path / "a.json",
        {
            "annotations": [
                {
                    "question_id": 70,
                    "image_id": 7,
                    "question_type": "what",
                    "answer_type": "other",
                    "multiple_choice_answer": "dog",
                    "answers": [{"answer": "dog", "answer_id": i + 1, "answer_confidence": "yes"} for i in range(10)],
                }
            ]
        },
    )
    assert load_vqa_questions(q)[70].question == "What?"
    annotations = load_vqa_annotations(a)
    assert annotations[70].answers == ("dog",) * 10
    assert vqa_accuracy({70: "a dog"}, annotations)["overall"] == 100.0


def test_bad_vqa_files_raise_errors_naming_the_file(tmp_path: Path) -> None:
    """Broken JSON, a missing key or an empty answer list must say which file and entry, not raise KeyError."""
    broken = tmp_path / "broken.json"
    broken.write_text('{"annotations": [', encoding="utf-8")
    with pytest.raises(EvalError, match=r"broken\.json.*not valid JSON"):
        load_vqa_annotations(broken)
    no_type = _write(tmp_path / "no_type.json", {"annotations": [{"question_id": 1, "image_id": 1, "answers": []}]})
    with pytest.raises(EvalError, match=r"no_type\.json.*annotations\[0\].*question_type"):
        load_vqa_annotations(no_type)
    empty = _write(
        tmp_path / "empty.json",
        {"annotations": [{"question_id": 1, "image_id": 1, "question_type": "x", "answer_type": "y", "answers": []}]},
    )
    with pytest.raises(EvalError, match=r"empty\.json.*answers"):
        load_vqa_annotations(empty)
    with pytest.raises(EvalError, match=r"q\.json.*'questions'"):
        load_vqa_questions(_write(tmp_path / "q.json", [1, 2]))
    with pytest.raises(EvalError, match=r"missing\.json.*not found"):
        load_vqa_questions(tmp_path / "missing.json")


def test_gqa_loader_reads_official_dict_and_lavis_list(tmp_path: Path) -> None:
    """Both GQA annotation shapes in the wild load; a missing answer names the file."""
    official = _write(tmp_path / "gqa.json", {"201": {"question": "?", "answer": "no", "imageId": "n1"}})
    lavis = _write(tmp_path / "gqa_lavis.json", [{"question_id": 201, "answer": ["yes"]}])
    assert load_gqa_answers(official) == {"201": "no"}
    assert load_gqa_answers(lavis) == {201: "yes"}
    with pytest.raises(EvalError, match=r"bad\.json.*answer"):
        load_gqa_answers(_write(tmp_path / "bad.json", [{"question_id": 1}]))
