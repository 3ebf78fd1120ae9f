"""Running a model over an evaluation split: batched, resumable generation for captioning and VQA, and ITC scoring
with ITM re-ranking for retrieval. The metrics live in `caption.py`, `vqa.py` and `retrieval.py`; this module only
makes the predictions and score matrices they take, then writes the files with `save_eval`.

Defaults are LAVIS's evaluation configs (`lavis/projects/blip2/eval/`) and the paper (§4.2, Table 2): captions use
5 beams, 30 new tokens at most, 8 at least (`caption_coco_*_eval.yaml`); VQA uses 5 beams, 10 new tokens at most,
1 at least, length penalty -1 and the prompt "Question: {} Answer:" (paper; LAVIS's YAML says "Short answer:").

Resuming (`blip2.durable`): each batch's predictions are appended to `<out>/<name>_predictions.partial.jsonl`
(flushed and fsynced) after a first line holding the settings (model, dtype, prompt, generation options). A rerun
with the same settings predicts only what is missing; a torn last line (the process died mid-write) is cut off and
redone; different settings are a `ConfigError` naming them, so one file never mixes two configurations. The
partial file stays after the final files are written, so a rerun only re-scores (e.g. once SPICE's models are
installed); delete it to start over.

Missing or unreadable images: caption and VQA skip them and go on. They are listed in `<name>_skipped.json`,
counted in the results (`n_skipped`, `skipped.images`) and never written to the partial file, so a rerun tries them
again. When no image at all can be read, nothing can be scored: `EvalError` (exit 2). Retrieval needs every image
of the split (a missing one changes the gallery every query ranks), so there a missing image is an `EvalError`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blip2.defaults import (
    EVAL_BATCH_SIZE,
    EVAL_CAPTION,
    EVAL_K_TEST,
    EVAL_RETRIEVAL_BATCH_SIZE,
    EVAL_VQA,
    MAX_PIXELS,
    VQA_TEMPLATE,
)
from blip2.durable import append_jsonl, atomic_path, atomic_write, check_settings, repair_jsonl
from blip2.eval._common import EvalError, read_json
from blip2.eval._common import field as get_field
from blip2.eval.caption import caption_scores, load_caption_references
from blip2.eval.report import format_table, save_eval, to_records, write_json_atomic
from blip2.eval.retrieval import load_retrieval_annotations, recall_at_k, rerank_topk
from blip2.eval.vqa import gqa_accuracy, load_gqa_answers, load_vqa_annotations, load_vqa_questions, vqa_accuracy
from blip2.scoring import itc_similarity, itm_logits, match_logit

if TYPE_CHECKING:
    import torch

    from blip2.pipeline import Blip2, GenerationOptions
    from blip2.processing import ImageTransform

# The tasks' generation settings (LAVIS's COCO caption eval; the paper's zero-shot VQA): blip2.defaults gives sources.
CAPTION_DEFAULTS: Mapping[str, Any] = EVAL_CAPTION
VQA_DEFAULTS: Mapping[str, Any] = EVAL_VQA
VQA_PROMPT = VQA_TEMPLATE  # the paper's template; LAVIS's YAML uses "Question: {} Short answer:"
# Tried in order when no --image-pattern is given: the VQAv2/COCO-2014 names (with the split from the question file's
# `data_subtype`, else val2014/train2014/test2015, in the folder or a split sub-folder), COCO-2017 names, then plain.
COCO_SPLITS = ("val2014", "train2014", "test2015")
PLAIN_PATTERNS = ("{image_id:012d}.jpg", "{image_id}.jpg", "{image_id}.png")
TOP_PREDICTIONS = 10  # ranked candidates saved per query in retrieval_predictions.json


@dataclass
class EvalOutput:
    """What an evaluation wrote: the results dict, the table printed for people, and the file paths."""

    results: dict[str, Any]
    table: str
    paths: dict[str, Path]


# ---- generation options and the model --------------------------------------------------------------------------------
def task_options(defaults: Mapping[str, Any], given: Mapping[str, Any]) -> GenerationOptions:
    """`GenerationOptions` from a task's defaults overridden by what the user gave. A `max_new_tokens` given below
    the task's default minimum (and no `min_new_tokens`) lowers the minimum to it rather than failing."""
    from blip2.pipeline import GenerationOptions

    merged = {**defaults, **given}
    if "max_new_tokens" in given and "min_new_tokens" not in given:
        merged["min_new_tokens"] = min(merged.get("min_new_tokens", 0), given["max_new_tokens"])
    merged["num_return_sequences"] = 1  # one prediction per input
    return GenerationOptions(**merged)


@dataclass
class _Loader:
    """The model by name, loaded only when something is left to predict; its image transform, without loading it
    (the images are decoded first: a rerun where only unreadable images are left needs no model)."""

    name: str
    load: Callable[[], Blip2]
    transform: Callable[[], ImageTransform]


def _loader(model: Any, device: str, dtype: str) -> _Loader:
    from blip2.checkpoint import resolve
    from blip2.pipeline import Blip2, load
    from blip2.processing import ImageTransform

    if isinstance(model, Blip2):
        return _Loader(model.name, lambda: model, lambda: model.transform)
    # A local folder is named by its absolute path, so `./ckpt` and `/abs/ckpt` resume the same partial file.
    name = str(Path(model).resolve()) if Path(model).exists() else str(model)
    cache: list[Blip2] = []

    def get() -> Blip2:
        if not cache:
            cache.append(load(model, device=device, dtype=dtype))
        return cache[0]

    def transform() -> ImageTransform:
        return cache[0].transform if cache else ImageTransform.from_pretrained(resolve(model))

    return _Loader(name, get, transform)


def _progress(total: int, desc: str, unit: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None, dynamic_ncols=True)


# ---- images ----------------------------------------------------------------------------------------------------------
def _images_dir(images: str | os.PathLike[str]) -> Path:
    root = Path(images)
    if not root.is_dir():
        raise EvalError(f"{root}: images folder not found" if not root.exists() else f"{root}: not a folder")
    return root


def default_image_patterns(splits: Sequence[str] = ()) -> list[str]:
    """COCO-2014 names for each split (given ones first), in the folder and in a split sub-folder, then the rest."""
    ordered = list(dict.fromkeys([*splits, *COCO_SPLITS]))
    coco = [f"COCO_{s}_{{image_id:012d}}.jpg" for s in ordered]
    return coco + [f"{s}/COCO_{s}_{{image_id:012d}}.jpg" for s in ordered] + list(PLAIN_PATTERNS)


def check_image_pattern(pattern: str) -> None:
    """A pattern must format with only `image_id` (e.g. "{image_id}.jpg", "COCO_val2014_{image_id:012d}.jpg")."""
    try:
        pattern.format(image_id=1)
    except (KeyError, IndexError, ValueError) as e:
        raise EvalError(f"image pattern {pattern!r}: use only {{image_id}} (with an optional format spec): {e}") from e
    if "{image_id" not in pattern:
        raise EvalError(f"image pattern {pattern!r} has no {{image_id}} field, so every image would be one file")


class ImageFinder:
    """image_id (or an annotation's file name) → file under `root`, trying `patterns` in order; results cached."""

    def __init__(self, root: Path, patterns: Sequence[str]) -> None:
        self.root = root
        self.patterns = list(patterns)
        self._cache: dict[Any, tuple[Path | None, str]] = {}

    def find(self, image_id: Any, file_name: str | None = None) -> tuple[Path | None, str]:
        """(path, "") or (None, why): a named file must exist; otherwise the first pattern that exists wins."""
        if file_name is not None:
            path = self.root / file_name
            return (path, "") if path.is_file() else (None, f"{path}: image not found")
        if image_id not in self._cache:
            self._cache[image_id] = self._search(image_id)
        return self._cache[image_id]

    def _search(self, image_id: Any) -> tuple[Path | None, str]:
        tried = []
        for pattern in self.patterns:
            try:
                name = pattern.format(image_id=image_id)
            except (ValueError, TypeError):  # "{image_id:012d}" with a string id: the pattern does not apply
                continue
            if (self.root / name).is_file():
                return self.root / name, ""
            tried.append(name)
        return None, f"{self.root}: no image file for image_id {image_id!r} (tried {', '.join(tried) or 'nothing'})"


# ---- resumable predictions -------------------------------------------------------------------------------------------
class PartialPredictions:
    """An append-only JSON-lines file: a `{"settings": ...}` line, then one `{key: id, value: text}` per prediction.

    A torn tail is cut off (`durable.repair_jsonl`); other settings are refused (`durable.check_settings`)."""

    def __init__(self, path: Path, settings: Mapping[str, Any], key: str, value: str) -> None:
        self.path = path
        self.settings = json.loads(json.dumps(settings))  # as it reads back from JSON (tuples → lists)
        self.key, self.value = key, value

    def open(self) -> dict[Any, str]:
        """Predictions made so far (creating the file if needed); a torn tail is cut off the file."""
        records = repair_jsonl(self.path, lambda r: isinstance(r, dict))
        if not records:
            atomic_write(self.path, json.dumps({"settings": self.settings}, ensure_ascii=False) + "\n")
            return {}
        old = records[0].get("settings")
        if not isinstance(old, dict):
            raise EvalError(f"{self.path}: first line is not a settings record; delete the file or use another --out")
        check_settings(old, self.settings, self.path, "delete it or use another --out")
        done: dict[Any, str] = {}
        for n, record in enumerate(records[1:], start=2):
            if self.key not in record or not isinstance(record.get(self.value), str):
                raise EvalError(f"{self.path}, line {n}: expected {{{self.key!r}: ..., {self.value!r}: text}}")
            done[record[self.key]] = record[self.value]
        return done

    def append(self, predictions: Sequence[tuple[Any, str]]) -> None:
        append_jsonl(self.path, [{self.key: k, self.value: v} for k, v in predictions])


@dataclass
class _Job:
    key: Any  # image_id (captions) or question_id (VQA)
    image: Path | None  # None: no file was found; `reason` says why
    prompt: str
    reason: str = ""


@dataclass
class _Run:
    predictions: dict[Any, str] = field(default_factory=dict)
    skipped: dict[Any, dict[str, str | None]] = field(default_factory=dict)


def _batches(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _generate(
    model: _Loader, jobs: Sequence[_Job], opts: GenerationOptions, batch_size: int, partial, desc: str
) -> _Run:
    """Predict every job not yet in `partial`, appending each batch of predictions to it as it is done.

    Images go through the image-map engine (`blip2.imagemap`: decoded once each, in worker processes, while the
    model predicts); each image's jobs (one caption, or all the questions about it) follow it into the model, in
    batches of `batch_size` (image, prompt) pairs. An unreadable image skips its jobs, with the reason.
    """
    from blip2.imagemap import default_workers, image_batches
    from blip2.sources import Item

    run = _Run(predictions=partial.open())
    known = {j.key for j in jobs}
    run.predictions = {k: v for k, v in run.predictions.items() if k in known}
    for j in jobs:
        if j.image is None:
            run.skipped[j.key] = {"file": None, "reason": j.reason}
    by_image: dict[str, list[_Job]] = {}
    for j in jobs:
        if j.image is not None and j.key not in run.predictions:
            by_image.setdefault(str(j.image), []).append(j)
    if not by_image:
        return run
    items = [Item(key=path, path=path, root=str(Path(path).parent)) for path in by_image]
    pending: list[tuple[_Job, Any]] = []  # (job, its image's (3, S, S) pixels)

    def predict(pairs: list[tuple[_Job, Any]]) -> None:
        m = model.load()
        gens = m.generate([px for _, px in pairs], [j.prompt for j, _ in pairs], opts, batch_size=batch_size)
        new = [(j.key, g.text) for (j, _), g in zip(pairs, gens, strict=True)]
        partial.append(new)
        run.predictions.update(new)
        bar.update(len(pairs))

    n_jobs = sum(len(js) for js in by_image.values())
    with _progress(n_jobs, desc, "it") as bar:
        for batch in image_batches(items, model.transform(), MAX_PIXELS, batch_size, default_workers()):
            for item, reason in batch.failures:  # one unreadable image must not sink its batch
                for j in by_image[item.key]:
                    run.skipped[j.key] = {"file": item.key, "reason": reason}
                bar.update(len(by_image[item.key]))
            for i, item in enumerate(batch.items):
                pending += [(j, batch.pixels[i]) for j in by_image[item.key]]
            while len(pending) >= batch_size:
                predict(pending[:batch_size])
                pending = pending[batch_size:]
        if pending:
            predict(pending)
    return run


def _settings(task: str, model: str, dtype: str, prompt: str, opts: GenerationOptions) -> dict[str, Any]:
    return {"task": task, "model": model, "dtype": dtype, "prompt": prompt, "options": asdict(opts)}


def _summary(settings: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Settings for the results: model, prompt, the task's options and any other option changed from the base."""
    from blip2.pipeline import GenerationOptions

    base = asdict(GenerationOptions())
    opts = {k: v for k, v in settings["options"].items() if k in defaults or v != base[k]}
    return {"model": settings["model"], "dtype": settings["dtype"], "prompt": settings["prompt"], **opts}


def _finish(out: Path, name: str, results: dict[str, Any], run: _Run, key: str, value: str, title: str) -> EvalOutput:
    """Record skipped inputs, then write predictions, results and table with `save_eval`."""
    skipped_path = out / f"{name}_skipped.json"
    write_json_atomic(skipped_path, [{key: k, **v} for k, v in run.skipped.items()])
    results["n_skipped"] = len(run.skipped)
    results["settings"] = results.pop("settings")  # last in the table, after the numbers
    if run.skipped:
        results.setdefault("skipped", {})["images"] = (
            f"{len(run.skipped)} missing or unreadable, listed in {skipped_path.name}"
        )
    paths = save_eval(out, name, results, to_records(run.predictions, key, value), title=title)
    paths["skipped"] = skipped_path
    return EvalOutput(results, format_table(results, title), paths)


def _nothing_scored(run: _Run, what: str) -> EvalError:
    first = next(iter(run.skipped.values()), {"reason": "the annotation file lists none"})
    return EvalError(f"no {what} could be predicted; first reason: {first['reason']}")


# ---- captioning ------------------------------------------------------------------------------------------------------
def evaluate_caption(
    model: Any,
    annotations: str | os.PathLike[str],
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    options: Mapping[str, Any] | None = None,
    prompt: str | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    spice: bool = True,
    meteor: bool = True,
    image_pattern: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> EvalOutput:
    """Caption every image of a COCO-style (or Karpathy-style) caption file, resumably, and score the captions
    with `caption_scores`. `options` override `CAPTION_DEFAULTS`; `prompt` is the text captions continue (LAVIS's
    COCO-fine-tuned configs use "a photo of"; the prediction is the continuation). Writes caption_* files in `out`."""
    refs = load_caption_references(annotations)
    root = _images_dir(images)
    if image_pattern is not None:
        check_image_pattern(image_pattern)
    if shutil.which("java") is None:  # fail before hours of generation, not after
        raise EvalError("caption metrics need Java on PATH (pycocoevalcap's PTBTokenizer); install a JRE")
    opts = task_options(CAPTION_DEFAULTS, options or {})
    loader = _loader(model, device, dtype)
    out = Path(out)
    settings = _settings("caption", loader.name, dtype, prompt or "", opts)
    finder = ImageFinder(root, [image_pattern] if image_pattern else default_image_patterns())
    jobs = []
    for key in refs.captions:
        path, why = finder.find(key, None if image_pattern else refs.images.get(key))
        jobs.append(_Job(key, path, prompt or "", why))
    partial = PartialPredictions(out / "caption_predictions.partial.jsonl", settings, "image_id", "caption")
    run = _generate(loader, jobs, opts, batch_size, partial, "captions")
    if not run.predictions:
        raise _nothing_scored(run, "caption")
    results = caption_scores(run.predictions, refs.captions, spice=spice, meteor=meteor)
    results["settings"] = _summary(settings, CAPTION_DEFAULTS)
    return _finish(out, "caption", results, run, "image_id", "caption", "COCO captioning")


# ---- VQA / GQA -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Question:
    question_id: Any
    image_id: Any
    question: str
    file_name: str | None = None


def load_gqa_questions(path: str | os.PathLike[str]) -> list[_Question]:
    """Questions of an official GQA file (`{qid: {"imageId", "question", "answer"}}`, image `<imageId>.jpg` via the
    patterns) or a LAVIS-style list (`[{"question_id", "question", "image": file name}]`)."""
    data = read_json(path)
    if isinstance(data, dict):
        return [
            _Question(qid, get_field(q, "imageId", path, f"question {qid!r}"), _text(q, path, f"question {qid!r}"))
            for qid, q in data.items()
        ]
    if not isinstance(data, list):
        raise EvalError(f"{path}: expected a JSON object of GQA questions or a list of question entries")
    out = []
    for i, q in enumerate(data):
        where = f"entry [{i}]"
        qid = get_field(q, "question_id", path, where)
        if "image" in q:
            out.append(_Question(qid, q["image"], _text(q, path, where), str(q["image"])))
        else:
            image_id = q.get("imageId", q.get("image_id"))
            if image_id is None:
                raise EvalError(f"{path}: {where} has no 'image', 'imageId' or 'image_id' key")
            out.append(_Question(qid, image_id, _text(q, path, where)))
    return out


def _text(record: Mapping[str, Any], path: Any, where: str) -> str:
    question = get_field(record, "question", path, where)
    if not isinstance(question, str) or not question.strip():
        raise EvalError(f"{path}: {where}.question is {question!r}, expected a non-empty question")
    return question


def _vqa_questions(path: str | os.PathLike[str]) -> tuple[list[_Question], list[str]]:
    """VQAv2 / OK-VQA questions, and the COCO split their file names use (its `data_subtype`, e.g. "val2014")."""
    data = read_json(path)
    subtype = data.get("data_subtype") if isinstance(data, dict) else None
    questions = [_Question(q.question_id, q.image_id, q.question) for q in load_vqa_questions(path).values()]
    return questions, [subtype] if isinstance(subtype, str) else []


def _format_prompt(prompt: str, question: str) -> str:
    return prompt.format(question.strip())


def _check_prompt(prompt: str) -> None:
    try:
        ok = prompt.format("\x00") != prompt.format("\x01")
    except (IndexError, KeyError, ValueError) as e:
        raise EvalError(f"VQA prompt {prompt!r}: needs exactly one {{}} for the question ({e})") from None
    if not ok:
        raise EvalError(f"VQA prompt {prompt!r} has no {{}} for the question, e.g. {VQA_PROMPT!r}")


def evaluate_vqa(
    model: Any,
    questions: str | os.PathLike[str],
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    annotations: str | os.PathLike[str] | None = None,
    gqa: bool = False,
    options: Mapping[str, Any] | None = None,
    prompt: str = VQA_PROMPT,
    batch_size: int = EVAL_BATCH_SIZE,
    image_pattern: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> EvalOutput:
    """Answer every question, resumably, and score with `vqa_accuracy` (VQAv2/OK-VQA annotation file) or, with
    `gqa`, `gqa_accuracy` (answers from `annotations`, else from the GQA question file itself). Without annotations
    (VQAv2 test-dev) only the predictions are written, in the official result format. Writes vqa_*/gqa_* in `out`."""
    _check_prompt(prompt)
    if image_pattern is not None:
        check_image_pattern(image_pattern)
    if gqa:
        qs, splits = load_gqa_questions(questions), []
        answers = load_gqa_answers(annotations if annotations is not None else questions)
        missing = [q.question_id for q in qs if q.question_id not in answers]
    else:
        qs, splits = _vqa_questions(questions)
        anns = load_vqa_annotations(annotations) if annotations is not None else None
        missing = [q.question_id for q in qs if anns is not None and q.question_id not in anns]
    if missing:
        raise EvalError(
            f"{annotations or questions}: no answer for question_id {missing[0]!r} ({len(missing)} missing)"
        )
    root = _images_dir(images)
    opts = task_options(VQA_DEFAULTS, options or {})
    loader = _loader(model, device, dtype)
    out, task = Path(out), "gqa" if gqa else "vqa"
    settings = _settings(task, loader.name, dtype, prompt, opts)
    finder = ImageFinder(root, [image_pattern] if image_pattern else default_image_patterns(splits))
    jobs = []
    for q in qs:
        path, why = finder.find(q.image_id, None if image_pattern else q.file_name)
        jobs.append(_Job(q.question_id, path, _format_prompt(prompt, q.question), why))
    partial = PartialPredictions(out / f"{task}_predictions.partial.jsonl", settings, "question_id", "answer")
    run = _generate(loader, jobs, opts, batch_size, partial, "answers")
    if not run.predictions:
        raise _nothing_scored(run, "answer")
    if gqa:
        results = gqa_accuracy(run.predictions, answers)
    elif anns is not None:
        results = vqa_accuracy(run.predictions, anns)
    else:
        results = {"n_questions": len(run.predictions), "skipped": {"accuracy": "no annotation file given"}}
    results["settings"] = _summary(settings, VQA_DEFAULTS)
    return _finish(out, task, results, run, "question_id", "answer", "GQA" if gqa else "VQA")


# ---- retrieval -------------------------------------------------------------------------------------------------------
def _encode_images(m: Blip2, paths: Sequence[Path], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ni, N, Dv) ViT features, kept on the CPU for ITM, and (Ni, Nq, E) normalised ITC query embeddings.
    The same numbers as `m.embed_images`, but the ViT runs once for both uses."""
    import torch

    from blip2.imagemap import default_workers, image_batches
    from blip2.sources import Item

    m.require_text_side()
    feats, embeds = [], []
    items = [Item(key=str(p), path=str(p), root=str(p.parent)) for p in paths]
    batches = image_batches(items, m.transform, MAX_PIXELS, batch_size, default_workers(), short_batches=False)
    with torch.no_grad(), _progress(len(paths), "images", "img") as bar:
        for batch in batches:
            if batch.failures:  # every image is a row and a column of the score matrices: none may be missing
                raise EvalError(batch.failures[0][1])
            f = m.model.encode_image(batch.pixels.to(m.device, m.dtype))  # (B, N, Dv)
            embeds.append(m.model.image_embeddings(f).float().cpu())  # (B, Nq, E)
            feats.append(f.cpu())
            bar.update(len(batch))
    return torch.cat(feats), torch.cat(embeds)


def itm_scorer(m: Blip2, feats: torch.Tensor, texts: Sequence[str], batch_size: int) -> Callable[..., np.ndarray]:
    """`itm_fn` for `rerank_topk`: the positive ITM logit (`itm_head` averaged over queries, LAVIS's `[:, 1]`) of
    each (image index, text index) pair, `batch_size` pairs per forward pass."""
    import torch

    def score(img_idx: np.ndarray, txt_idx: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for s in range(0, len(img_idx), batch_size):
                ii, tt = img_idx[s : s + batch_size], txt_idx[s : s + batch_size]
                ids, mask = m.text_ids([texts[int(t)] for t in tt])
                if len(ii) and (ii == ii[0]).all():  # one image's candidates: copy its features once, then expand
                    image_embeds = feats[int(ii[0])].to(m.device).expand(len(ii), -1, -1)
                else:
                    image_embeds = feats[torch.as_tensor(np.asarray(ii), dtype=torch.long)].to(m.device)
                out.append(match_logit(itm_logits(m.model, image_embeds, ids, mask)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    return score


def _top(scores: np.ndarray, n: int) -> list[list[int]]:
    return [[int(i) for i in np.argsort(row)[::-1][:n]] for row in scores]


def evaluate_retrieval(
    model: Any,
    annotations: str | os.PathLike[str],
    images: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    k_test: int = EVAL_K_TEST,
    batch_size: int = EVAL_RETRIEVAL_BATCH_SIZE,
    device: str = "auto",
    dtype: str = "auto",
) -> EvalOutput:
    """Image-text retrieval on a Karpathy-style split, as LAVIS `compute_sim_matrix`: ITC similarity of every pair,
    then the top `k_test` candidates of each image and of each text re-ranked by ITM logit + ITC (`k_test` 0: ITC
    only). Reports `recall_at_k` of both; writes retrieval_* files and the score matrices (retrieval_scores.npz)."""
    import torch

    split = load_retrieval_annotations(annotations)
    root = _images_dir(images)
    paths = [root / p for p in split.images]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise EvalError(f"{missing[0]}: image not found ({len(missing)} of {len(paths)} missing; retrieval needs all)")
    loader = _loader(model, device, dtype)
    m = loader.load()
    feats, image_embeds = _encode_images(m, paths, batch_size)
    with torch.no_grad():
        text_embeds = torch.cat([m.embed_texts(b) for b in _batches(split.texts, batch_size)])  # (Nt, E)
    itc = itc_similarity(image_embeds, text_embeds, chunk=64, device=m.device).numpy()  # (Ni, Nt), as m.similarity
    results: dict[str, Any] = {"n_images": len(paths), "n_texts": len(split.texts), "k_test": k_test}
    results["itc"] = recall_at_k(itc, split.img2txt, split.txt2img)
    i2t, t2i = itc, itc.T
    if k_test > 0:
        itm = itm_scorer(m, feats, split.texts, batch_size)
        with _progress(len(paths) + len(split.texts), "re-ranking", "query") as bar:

            def counted(ii: np.ndarray, tt: np.ndarray) -> np.ndarray:
                bar.update(1)
                return itm(ii, tt)

            i2t, t2i = rerank_topk(itc, counted, k=k_test)
        results["itc_itm"] = recall_at_k(i2t, split.img2txt, split.txt2img, scores_t2i=t2i)
    else:
        results["skipped"] = {"itc_itm": "--k-test 0: no ITM re-ranking"}
    results["settings"] = {"model": loader.name, "dtype": dtype}
    out = Path(out)
    scores_path = out / "retrieval_scores.npz"
    _save_npz(scores_path, itc=itc, i2t=i2t, t2i=t2i)
    predictions = {
        "image_to_text": [
            {"image": f, "top": t} for f, t in zip(split.images, _top(i2t, TOP_PREDICTIONS), strict=True)
        ],
        "text_to_image": [{"text": s, "top": t} for s, t in zip(split.texts, _top(t2i, TOP_PREDICTIONS), strict=True)],
    }
    title = "Image-text retrieval"
    paths_out = save_eval(out, "retrieval", results, predictions, title=title)
    paths_out["scores"] = scores_path
    return EvalOutput(results, format_table(results, title), paths_out)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # streamed: COCO's three matrices are gigabytes
        np.savez(f, **arrays)


__all__ = [
    "CAPTION_DEFAULTS",
    "VQA_DEFAULTS",
    "VQA_PROMPT",
    "EvalOutput",
    "ImageFinder",
    "PartialPredictions",
    "default_image_patterns",
    "evaluate_caption",
    "evaluate_retrieval",
    "evaluate_vqa",
    "itm_scorer",
    "load_gqa_questions",
    "task_options",
]
