"""VQA accuracy as the official VQAv2 evaluation computes it (ported from LAVIS `common/vqa_tools/vqa_eval.py`,
itself the official `vqaEval.py`), GQA exact match as LAVIS `GQATask`, and loaders for the official JSON files.

Differences from the official scripts (none changes a score on the official VQAv2/OK-VQA files):
- leave-one-out drops the i-th ground-truth answer by position; the official code drops every answer *dict* equal to
  it, which differs only if two answer dicts are identical (the official files give each a distinct `answer_id`);
- the official script asserts that predictions cover every annotated question; here the predicted questions are
  scored, a prediction for an unknown question is an error, and `n_unanswered` reports the annotated questions
  without a prediction so a partial run is visible rather than silent.
The later `vqaEval.py` in GT-Vision-Lab/VQA differs from this (earlier) version that LAVIS ships and that produced
the BLIP-2 numbers: it strips "\n"/"\t" from gt answers and normalises gt *and* prediction only when the humans
disagree. This module follows LAVIS.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from blip2.eval._common import EvalError, field, read_json, top_list

# The official tables, verbatim (including entries that can never match after lower-casing, such as "Im").
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# `(?!<=\d)` is the official typo for a look-behind; as a look-ahead before "\." it never fires, so the effect is
# "drop every period not followed by a digit" ("3.5" keeps its point). Kept verbatim for identical output.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official call is `periodStrip.sub("", text, re.UNICODE)`: the flag lands in the `count` slot, so at most
# int(re.UNICODE) == 32 periods are removed. Reproduced so that pathological answers score identically.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


@dataclass(frozen=True)
class VqaQuestion:
    """One entry of an official VQAv2 question file."""

    question_id: int
    image_id: int
    question: str


@dataclass(frozen=True)
class VqaAnnotation:
    """One entry of an official VQAv2 annotation file; `answers` are the (usually 10) human answers, raw."""

    question_id: int
    image_id: int
    question_type: str
    answer_type: str
    answers: tuple[str, ...]
    multiple_choice_answer: str | None = None


def process_punctuation(text: str) -> str:
    """Official `processPunctuation`: each of 21 characters is deleted when it touches a space (or the text has a
    digit-comma-digit, so "1,000" → "1000"), else replaced by a space ("t-shirt" → "t shirt"); then periods that
    are not followed by a digit are dropped. The tests look at the *original* text, as in the official code."""
    out = text
    comma_between_digits = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if p + " " in text or " " + p in text or comma_between_digits:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lower-case, number words → digits, drop a/an/the, restore contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The full normalisation the official script applies to a predicted answer: "Two dogs." → "2 dogs"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def question_accuracy(prediction: str, gt_answers: tuple[str, ...] | list[str]) -> float:
    """Accuracy of one answer in [0, 1]: min(1, #humans agreeing / 3), averaged over the leave-one-out subsets.

    As in the official code, the prediction is fully normalised while the ground-truth answers only get
    `process_punctuation`, and only when the humans disagree (len(set(answers)) > 1): the official files are
    already normalised, so lower-casing or number words in hand-made ground truth will not be fixed here."""
    if not gt_answers:
        raise EvalError("question_accuracy: the ground-truth answer list is empty")
    pred = normalize_vqa_answer(prediction)
    gts = list(gt_answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    matches = sum(a == pred for a in gts)
    # Leaving out answer i removes one match exactly when answer i itself matches.
    per_subset = [min(1.0, (matches - (a == pred)) / 3) for a in gts]
    return sum(per_subset) / len(per_subset)


def _resolve_qid(qid: object, annotations: Mapping[int, VqaAnnotation]) -> int:
    """Accept `123` or `"123"` (JSON object keys are strings) and insist the question is annotated."""
    if qid in annotations:
        return qid  # type: ignore[return-value]
    if isinstance(qid, str) and qid.strip().lstrip("-").isdigit() and int(qid) in annotations:
        return int(qid)
    raise EvalError(f"prediction for question_id {qid!r}: no such question in the annotations")


def _mean_x100(values: list[float]) -> float:
    return round(100 * sum(values) / len(values), 2)


def vqa_accuracy(predictions: Mapping[int, str], annotations: Mapping[int, VqaAnnotation]) -> dict:
    """Official VQA accuracy of `predictions` (question_id → answer text) against loaded `annotations`.

    Returns {"overall", "per_answer_type", "per_question_type"} as ×100 rounded to 2 decimals (the official
    rounding, each average taken before rounding), "per_question" (×100, 2 decimals, like the official `evalQA`),
    "n_questions" scored and "n_unanswered" (annotated questions with no prediction)."""
    if not predictions:
        raise EvalError("vqa_accuracy: no predictions to score")
    scores: dict[int, float] = {}
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for raw_qid, answer in predictions.items():
        qid = _resolve_qid(raw_qid, annotations)
        if not isinstance(answer, str):
            raise EvalError(f"prediction for question_id {qid}: answer is a {type(answer).__name__}, expected text")
        ann = annotations[qid]
        acc = question_accuracy(answer, ann.answers)
        scores[qid] = acc
        by_answer_type.setdefault(ann.answer_type, []).append(acc)
        by_question_type.setdefault(ann.question_type, []).append(acc)
    return {
        "overall": _mean_x100(list(scores.values())),
        "per_answer_type": {k: _mean_x100(v) for k, v in sorted(by_answer_type.items())},
        "per_question_type": {k: _mean_x100(v) for k, v in sorted(by_question_type.items())},
        "per_question": {qid: round(100 * acc, 2) for qid, acc in scores.items()},
        "n_questions": len(scores),
        "n_unanswered": len(annotations) - len(scores),
    }


def gqa_accuracy(predictions: Mapping[int | str, str], answers: Mapping[int | str, str]) -> dict:
    """GQA exact-match accuracy (×100, unrounded as in LAVIS `GQATask`) after `normalize_vqa_answer` on both the
    prediction and the single ground-truth answer. Returns {"accuracy", "n_questions", "n_unanswered"}."""
    if not predictions:
        raise EvalError("gqa_accuracy: no predictions to score")
    correct = 0
    for qid, pred in predictions.items():
        if qid not in answers:
            raise EvalError(f"prediction for question_id {qid!r}: no such question in the GQA answers")
        correct += normalize_vqa_answer(pred) == normalize_vqa_answer(answers[qid])
    return {
        "accuracy": 100.0 * correct / len(predictions),
        "n_questions": len(predictions),
        "n_unanswered": len(answers) - len(predictions),
    }


def load_vqa_questions(path: str | Path) -> dict[int, VqaQuestion]:
    """Read an official question file `{"questions": [{"image_id", "question", "question_id"}, ...]}`."""
    out: dict[int, VqaQuestion] = {}
    for i, q in enumerate(top_list(read_json(path), "questions", path)):
        where = f"questions[{i}]"
        qid = _int_id(field(q, "question_id", path, where), path, where)
        out[qid] = VqaQuestion(qid, field(q, "image_id", path, where), str(field(q, "question", path, where)))
    return out


def _int_id(value: object, path: str | Path, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EvalError(f"{path}: {where}.question_id is {value!r}, expected an integer")
    return value


def _parse_answers(raw: object, path: str | Path, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        raise EvalError(f"{path}: {where}.answers must be a non-empty list of {{'answer': ...}} objects")
    return tuple(str(field(a, "answer", path, f"{where}.answers[{j}]")) for j, a in enumerate(raw))


def load_vqa_annotations(path: str | Path) -> dict[int, VqaAnnotation]:
    """Read an official annotation file `{"annotations": [{"question_id", "image_id", "question_type",
    "answer_type", "answers": [{"answer", ...}], "multiple_choice_answer"}, ...]}` (VQAv2, OK-VQA)."""
    out: dict[int, VqaAnnotation] = {}
    for i, a in enumerate(top_list(read_json(path), "annotations", path)):
        where = f"annotations[{i}]"
        qid = _int_id(field(a, "question_id", path, where), path, where)
        out[qid] = VqaAnnotation(
            question_id=qid,
            image_id=field(a, "image_id", path, where),
            question_type=str(field(a, "question_type", path, where)),
            answer_type=str(field(a, "answer_type", path, where)),
            answers=_parse_answers(field(a, "answers", path, where), path, where),
            multiple_choice_answer=a.get("multiple_choice_answer"),
        )
    return out


def _gqa_answer(record: object, path: str | Path, where: str) -> str:
    answer = field(record, "answer", path, where)
    # Some converted GQA files wrap the single answer in a list.
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if not isinstance(answer, str):
        raise EvalError(f"{path}: {where}.answer is {answer!r}, expected one answer string")
    return answer


def load_gqa_answers(path: str | Path) -> dict[int | str, str]:
    """question_id → answer from an official GQA question file (`{qid: {"answer", ...}}`) or a LAVIS-style list
    (`[{"question_id", "answer"}, ...]`). GQA question ids are strings in the official files; they stay so."""
    data = read_json(path)
    if isinstance(data, dict):
        return {qid: _gqa_answer(q, path, f"question {qid!r}") for qid, q in data.items()}
    if isinstance(data, list):
        out: dict[int | str, str] = {}
        for i, q in enumerate(data):
            out[field(q, "question_id", path, f"entry [{i}]")] = _gqa_answer(q, path, f"entry [{i}]")
        return out
    raise EvalError(f"{path}: expected a JSON object of questions or a list of {{question_id, answer}} entries")
