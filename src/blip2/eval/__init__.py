"""Evaluation metrics without a model: VQA accuracy, GQA exact match, COCO caption metrics, retrieval recall,
and atomic result files. A CLI runs a model, then passes predictions dicts or score matrices to these functions.
`evaluate_caption/vqa/retrieval` (run.py) are that model-driving part, behind `blip2 eval`."""

from blip2.eval._common import EvalError
from blip2.eval.caption import CaptionReferences, caption_scores, load_caption_references, normalize_caption
from blip2.eval.report import format_table, save_eval, to_records, write_json_atomic
from blip2.eval.retrieval import RetrievalSet, load_retrieval_annotations, recall_at_k, rerank_topk
from blip2.eval.run import EvalOutput, evaluate_caption, evaluate_retrieval, evaluate_vqa
from blip2.eval.vqa import (
    VqaAnnotation,
    VqaQuestion,
    gqa_accuracy,
    load_gqa_answers,
    load_vqa_annotations,
    load_vqa_questions,
    normalize_vqa_answer,
    process_digit_article,
    process_punctuation,
    question_accuracy,
    vqa_accuracy,
)

__all__ = [
    "CaptionReferences",
    "EvalError",
    "EvalOutput",
    "RetrievalSet",
    "VqaAnnotation",
    "VqaQuestion",
    "caption_scores",
    "evaluate_caption",
    "evaluate_retrieval",
    "evaluate_vqa",
    "format_table",
    "gqa_accuracy",
    "load_caption_references",
    "load_gqa_answers",
    "load_retrieval_annotations",
    "load_vqa_annotations",
    "load_vqa_questions",
    "normalize_caption",
    "normalize_vqa_answer",
    "process_digit_article",
    "process_punctuation",
    "question_accuracy",
    "recall_at_k",
    "rerank_topk",
    "save_eval",
    "to_records",
    "vqa_accuracy",
    "write_json_atomic",
]
