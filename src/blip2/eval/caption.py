"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) through `pycocoevalcap`, as LAVIS reports them,
plus the LAVIS caption normaliser and loaders for COCO-style and Karpathy-style caption annotations.

What `caption_scores` does is what `pycocoevalcap.eval.COCOEvalCap.evaluate` does, without `pycocotools`: both the
predictions and the references go through the Stanford PTBTokenizer (Java, lower-cases and drops punctuation), then
each scorer runs on the tokenised text. Scores are in [0, 1] (CIDEr can exceed 1), not ×100, as COCOEvalCap gives
them. Predictions are scored as generated (LAVIS saves them with only `.strip()`); `normalize_caption` is not applied.
Differences: METEOR or SPICE failing (no Java heap, no Stanford CoreNLP models for SPICE) yields `None` and a reason
in `result["skipped"]` instead of an exception, and "\\r" in a caption becomes a space so the tokenizer's
one-caption-per-line protocol cannot be broken by it.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip2.eval._common import EvalError, karpathy_entry, read_json, top_list
from blip2.eval._common import field as get_field

ImageKey = int | str

_CAPTION_STRIP = re.compile(r"([.!\"()*#:;~])")
_MULTI_SPACE = re.compile(r"\s{2,}")


def normalize_caption(text: str, max_words: int = 50) -> str:
    """LAVIS `BlipCaptionProcessor.pre_caption`: lower-case, each of `.!"()*#:;~` becomes a space, runs of
    whitespace collapse to one space, trim, keep the first `max_words` words (LAVIS default 50)."""
    text = _CAPTION_STRIP.sub(" ", text.lower())
    text = _MULTI_SPACE.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


@dataclass
class CaptionReferences:
    """Reference captions per image, and the image file of each image where the annotation file names it."""

    captions: dict[ImageKey, list[str]] = field(default_factory=dict)
    images: dict[ImageKey, str] = field(default_factory=dict)


def _coco_references(data: dict, path: str | Path) -> CaptionReferences:
    refs = CaptionReferences()
    for i, ann in enumerate(top_list(data, "annotations", path)):
        where = f"annotations[{i}]"
        caption = get_field(ann, "caption", path, where)
        if not isinstance(caption, str):
            raise EvalError(f"{path}: {where}.caption is {caption!r}, expected text")
        refs.captions.setdefault(get_field(ann, "image_id", path, where), []).append(caption)
    # LAVIS's Karpathy *_gt.json files list images with an id only, so file_name is optional.
    for i, img in enumerate(data.get("images") or []):
        image_id = get_field(img, "id", path, f"images[{i}]")
        if isinstance(img.get("file_name"), str):
            refs.images[image_id] = img["file_name"]
    return refs


def _karpathy_references(data: list, path: str | Path) -> CaptionReferences:
    refs = CaptionReferences()
    for i, ann in enumerate(data):
        image, captions = karpathy_entry(ann, i, path)
        # Without an image_id (LAVIS coco_karpathy_test.json) the image path is the key predictions must use.
        key = ann.get("image_id", image)
        refs.captions.setdefault(key, []).extend(captions)
        refs.images[key] = str(image)
    return refs


def load_caption_references(path: str | Path) -> CaptionReferences:
    """Read COCO-style `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}` or a
    Karpathy-style list `[{"image": path, "caption": str | [str, ...], "image_id"?}]` (entries of one image merge).
    Images are keyed by `image_id`, or by the `image` path when a Karpathy entry has no `image_id`."""
    data = read_json(path)
    if isinstance(data, dict):
        refs = _coco_references(data, path)
    elif isinstance(data, list):
        refs = _karpathy_references(data, path)
    else:
        raise EvalError(f"{path}: expected a COCO caption object or a Karpathy-style list, got {type(data).__name__}")
    if not refs.captions:
        raise EvalError(f"{path}: no captions found")
    return refs


def _check_inputs(predictions: Mapping[ImageKey, str], references: Mapping[ImageKey, Sequence[str]]) -> list:
    if not predictions:
        raise EvalError("caption_scores: no predictions to score")
    for key, pred in predictions.items():
        if key not in references:
            raise EvalError(f"caption prediction for image {key!r}: no reference captions for this image")
        if not isinstance(pred, str):
            raise EvalError(f"caption prediction for image {key!r} is a {type(pred).__name__}, expected text")
        if not references[key] or isinstance(references[key], str):
            raise EvalError(f"reference captions for image {key!r} must be a non-empty list of texts")
    return list(predictions)


def _tokenize(
    predictions: Mapping[ImageKey, str], references: Mapping[ImageKey, Sequence[str]], keys: list
) -> tuple[dict, dict]:
    """PTB-tokenise both sides exactly as COCOEvalCap does; Java is required, so its absence is an error."""
    if shutil.which("java") is None:
        raise EvalError(
            "caption metrics need Java on PATH: pycocoevalcap's PTBTokenizer, METEOR and SPICE are Java programs "
            "(install a JRE, e.g. `apt-get install default-jre-headless`)"
        )
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    def clean(text: str) -> str:
        return text.replace("\r", " ")

    tokenizer = PTBTokenizer()
    try:
        gts = tokenizer.tokenize({k: [{"caption": clean(c)} for c in references[k]] for k in keys})
        res = tokenizer.tokenize({k: [{"caption": clean(predictions[k])}] for k in keys})
    except OSError as e:
        raise EvalError(f"PTBTokenizer (Java) failed to run: {e}") from None
    return gts, res


def _spice_missing_reason() -> str | None:
    """Why SPICE cannot run here, or None. Checked up front: pycocoevalcap would otherwise try to download the
    Stanford CoreNLP 3.6.0 models (~400 MB) from nlp.stanford.edu when `Spice()` is built."""
    from pycocoevalcap import spice as spice_pkg

    lib = Path(spice_pkg.__file__).parent / "lib"
    missing = [n for n in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar") if not (lib / n).exists()]
    if missing:
        return (
            f"SPICE needs the Stanford CoreNLP models, missing in {lib} ({', '.join(missing)}); "
            "run `python -m pycocoevalcap.spice.get_stanford_models` once with network access"
        )
    return None


def _run_optional(name: str, make_scorer: Any, gts: dict, res: dict, skipped: dict[str, str]) -> tuple[Any, Any]:
    """Run a Java-backed scorer whose failure must not lose the other metrics: (score, per-image) or (None, None)."""
    try:
        scorer = make_scorer()
        try:
            return scorer.compute_score(gts, res)
        finally:
            del scorer  # METEOR's __del__ stops its JVM
    except Exception as e:  # a JVM can fail many ways (OOM, killed, bad output); report, don't crash
        skipped[name] = f"{name} failed: {type(e).__name__}: {e}".strip()
        return None, None


def _per_image(keys: list, per_metric: dict[str, Any]) -> dict[ImageKey, dict[str, float | None]]:
    out: dict[ImageKey, dict[str, float | None]] = {k: {} for k in keys}
    for metric, values in per_metric.items():
        for k, v in zip(keys, values if values is not None else [None] * len(keys), strict=True):
            # SPICE gives a dict of categories per image; its headline number is the "All" F-score.
            out[k][metric] = float(v["All"]["f"]) if isinstance(v, dict) else (None if v is None else float(v))
    return out


def caption_scores(
    predictions: Mapping[ImageKey, str],
    references: Mapping[ImageKey, Sequence[str]],
    *,
    spice: bool = True,
    meteor: bool = True,
    per_image: bool = False,
) -> dict[str, Any]:
    """COCO caption metrics of `predictions` (image key → caption) against `references` (image key → captions).

    Returns {"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE", "n_images", "skipped"} with COCOEvalCap's
    names and scale. A metric that was turned off or could not run is `None`, and `skipped[name]` says why.
    CIDEr's document frequencies come from the references of the scored images, so score the whole split at once.
    With `per_image`, `result["per_image"][key]` holds each image's scores (COCOEvalCap's `imgToEval`)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.spice.spice import Spice
    except ImportError:
        raise EvalError("caption metrics need pycocoevalcap: pip install 'blip2[eval]'") from None
    keys = _check_inputs(predictions, references)
    gts, res = _tokenize(predictions, references, keys)
    skipped: dict[str, str] = {}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    per_metric: dict[str, Any] = {f"Bleu_{n + 1}": bleu_each[n] for n in range(4)}
    result: dict[str, Any] = {f"Bleu_{n + 1}": float(bleu[n]) for n in range(4)}

    result["METEOR"], per_metric["METEOR"] = None, None
    if not meteor:
        skipped["METEOR"] = "turned off"
    else:
        result["METEOR"], per_metric["METEOR"] = _run_optional("METEOR", Meteor, gts, res, skipped)

    result["ROUGE_L"], per_metric["ROUGE_L"] = Rouge().compute_score(gts, res)
    result["CIDEr"], per_metric["CIDEr"] = Cider().compute_score(gts, res)

    result["SPICE"], per_metric["SPICE"] = None, None
    reason = "turned off" if not spice else _spice_missing_reason()
    if reason is not None:
        skipped["SPICE"] = reason
    else:
        result["SPICE"], per_metric["SPICE"] = _run_optional("SPICE", Spice, gts, res, skipped)

    for name in ("METEOR", "ROUGE_L", "CIDEr", "SPICE"):
        result[name] = None if result[name] is None else float(result[name])
    result["n_images"] = len(keys)
    result["skipped"] = skipped
    if per_image:
        # Scorers iterate gts.keys(), which PTBTokenizer built in `keys` order; SPICE sorts, so realign it.
        if per_metric["SPICE"] is not None:
            order = {k: i for i, k in enumerate(sorted(gts.keys()))}
            per_metric["SPICE"] = [per_metric["SPICE"][order[k]] for k in gts.keys()]
        result["per_image"] = _per_image(list(gts.keys()), per_metric)
    return result
