"""`blip2 eval caption | vqa | retrieval` end to end on tiny random checkpoints and a few images.

The models write gibberish, so every test recomputes what the command should have produced: predictions with the
Python API (`m.caption`, `m.ask`, `m.similarity`) on the same images and options, and the scores with the metric
functions on the saved predictions. A mismatch means the command's numbers are not the metric of its predictions,
or not the model's answers. METEOR and SPICE are turned off (the metric layer's own tests cover them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

import blip2
import blip2.pipeline
from blip2.cli import eval as eval_cli
from blip2.cli import main
from blip2.eval import (
    caption_scores,
    gqa_accuracy,
    load_caption_references,
    load_gqa_answers,
    load_retrieval_annotations,
    load_vqa_annotations,
    recall_at_k,
    rerank_topk,
    vqa_accuracy,
)
from blip2.eval import run as eval_run

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="caption metrics need Java (PTBTokenizer)")

GEN = ["--dtype", "fp32", "--max-new-tokens", "5"]
CAPTION_OPTS = {"num_beams": 5, "max_new_tokens": 5, "min_new_tokens": 5}  # min 8 is lowered to the given max
VQA_OPTS = {"num_beams": 5, "max_new_tokens": 5, "min_new_tokens": 1, "length_penalty": -1.0}


def run(*args: object) -> Result:
    return CliRunner().invoke(main, ["eval", *[str(a) for a in args]])


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def assert_one_line_failure(result: Result, name: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and name in lines[0], result.stderr


def read(path: Path) -> object:
    return json.loads(path.read_text())


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def opt_api(opt_ckpt: Path) -> blip2.Blip2:
    return blip2.load(opt_ckpt, dtype="fp32")


# ---- captioning ------------------------------------------------------------------------------------------------------
@pytest.fixture
def caption_set(tmp_path: Path, images: dict[str, Path]) -> dict[str, Path]:
    """Three readable images, one missing and one broken file, as a COCO-style caption file."""
    root = tmp_path / "images"
    root.mkdir()
    names = {1: "rgb.jpg", 2: "l.png", 3: "large.png", 4: "missing.jpg", 5: "not_image.png"}
    for key in ("rgb", "l", "large", "not_image"):
        shutil.copy(images[key], root / images[key].name)
    refs = ["a red cat sitting on a wooden table", "a dog running in a park", "a blue car on the street"]
    data = {
        "images": [{"id": i, "file_name": n} for i, n in names.items()],
        "annotations": [{"image_id": i, "caption": refs[(i + j) % 3]} for i in names for j in range(2)],
    }
    return {"annotations": write(tmp_path / "captions.json", data), "images": root, "out": tmp_path / "out"}


def caption_args(ckpt: Path, s: dict[str, Path]) -> list[object]:
    args = ["caption", "--annotations", s["annotations"], "--images", s["images"], "--out", s["out"]]
    return [*args, "--model", ckpt, *GEN, "--batch-size", 2, "--no-spice", "--no-meteor"]


@needs_java
def test_caption_predictions_are_the_api_captions_and_scores_their_metrics(opt_ckpt, opt_api, caption_set):
    result = ok(run(*caption_args(opt_ckpt, caption_set)))
    out = caption_set["out"]
    for name in ("results.json", "results.txt", "predictions.json", "skipped.json", "predictions.partial.jsonl"):
        assert (out / f"caption_{name}").is_file(), name
    preds = {r["image_id"]: r["caption"] for r in read(out / "caption_predictions.json")}
    files = [caption_set["images"] / n for n in ("rgb.jpg", "l.png", "large.png")]
    assert preds == dict(zip([1, 2, 3], opt_api.caption(files, **CAPTION_OPTS), strict=True))

    refs = load_caption_references(caption_set["annotations"]).captions
    expected = caption_scores(preds, refs, spice=False, meteor=False)
    results = read(out / "caption_results.json")
    for metric in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert results[metric] == pytest.approx(expected[metric], abs=1e-12), metric
    assert results["METEOR"] is None and results["SPICE"] is None
    assert results["n_images"] == 3 and results["n_skipped"] == 2
    assert results["settings"]["num_beams"] == 5 and results["settings"]["min_new_tokens"] == 5

    skipped = {r["image_id"]: r for r in read(out / "caption_skipped.json")}
    assert set(skipped) == {4, 5}
    assert "missing.jpg" in skipped[4]["reason"] and "not_image.png" in skipped[5]["reason"]
    assert result.stdout == (out / "caption_results.txt").read_text()
    assert "CIDEr" in result.stdout and "images skipped: 2" in result.stdout


@needs_java
def test_caption_resume_after_torn_write_redoes_only_the_lost_image(opt_ckpt, caption_set, monkeypatch):
    args = caption_args(opt_ckpt, caption_set)
    ok(run(*args))
    out = caption_set["out"]
    first = read(out / "caption_predictions.json")
    for f in ("caption_results.json", "caption_results.txt", "caption_predictions.json"):
        (out / f).unlink()
    partial = out / "caption_predictions.partial.jsonl"
    text = partial.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    partial.write_text(text[: len(text) - len(last) // 2 - 1])  # the last record, torn mid-line

    generated: list[int] = []
    original = blip2.pipeline.Blip2.generate

    def counting(self, images, *a, **kw):
        generated.append(len(images))
        return original(self, images, *a, **kw)

    monkeypatch.setattr(blip2.pipeline.Blip2, "generate", counting)
    ok(run(*args))
    assert sum(generated) == 1  # only the torn record's image
    assert read(out / "caption_predictions.json") == first
    records = [json.loads(line) for line in partial.read_text().splitlines()]
    assert "settings" in records[0]
    assert sorted(r["image_id"] for r in records[1:]) == [1, 2, 3]  # no duplicate, no torn line left

    # Everything predicted: a rerun only re-scores, without loading the model.
    monkeypatch.setattr(blip2.pipeline, "load", lambda *a, **k: pytest.fail("model loaded with nothing to do"))
    ok(run(*args))
    assert read(out / "caption_predictions.json") == first


def test_caption_resume_with_other_settings_is_refused(opt_ckpt, caption_set):
    partial = caption_set["out"] / "caption_predictions.partial.jsonl"
    partial.parent.mkdir()
    write(partial, {"settings": {"task": "caption", "model": "other"}})
    partial.write_text(partial.read_text() + "\n")
    assert_one_line_failure(run(*caption_args(opt_ckpt, caption_set)), str(partial))


# ---- VQA -------------------------------------------------------------------------------------------------------------
@pytest.fixture
def vqa_set(tmp_path: Path, images: dict[str, Path]) -> dict[str, Path]:
    """Image 1 named as VQAv2 names val2014 images, image 2 as `{image_id}.png`, image 3 missing."""
    root = tmp_path / "images"
    root.mkdir()
    shutil.copy(images["rgb"], root / "COCO_val2014_000000000001.jpg")
    shutil.copy(images["rgba"], root / "2.png")
    questions = [(10, 1, "what color is the cat?"), (11, 1, "is there a dog?"), (20, 2, "where is the car?")]
    questions.append((30, 3, "what is it?"))
    data = {
        "data_subtype": "val2014",
        "questions": [{"question_id": q, "image_id": i, "question": t} for q, i, t in questions],
    }
    return {"questions": write(tmp_path / "q.json", data), "images": root, "out": tmp_path / "out"}


def test_vqa_answers_are_the_api_answers_and_accuracy_is_the_official_metric(opt_ckpt, opt_api, vqa_set, tmp_path):
    root = vqa_set["images"]
    imgs = [root / "COCO_val2014_000000000001.jpg", root / "COCO_val2014_000000000001.jpg", root / "2.png"]
    qs = ["what color is the cat?", "is there a dog?", "where is the car?"]
    expected = dict(zip([10, 11, 20], opt_api.ask(imgs, qs, **VQA_OPTS), strict=True))
    # Ground truth that makes the score non-trivial: question 10 matches 3 humans, 11 none, 20 one.
    answers = {
        10: [expected[10]] * 3 + ["blue"] * 7,
        11: ["yes"] * 10,
        20: [expected[20]] + ["park"] * 9,
        30: ["x"] * 10,
    }
    types = {10: "other", 11: "yes/no", 20: "other", 30: "other"}
    anns = [
        {
            "question_id": q,
            "image_id": 0,
            "question_type": "what",
            "answer_type": types[q],
            "answers": [{"answer": a} for a in ans],
        }
        for q, ans in answers.items()
    ]
    ann_file = write(tmp_path / "a.json", {"annotations": anns})
    args = ["vqa", "--questions", vqa_set["questions"], "--annotations", ann_file, "--images", root]
    result = ok(run(*args, "--out", vqa_set["out"], "--model", opt_ckpt, *GEN, "--batch-size", 2))

    out = vqa_set["out"]
    preds = {r["question_id"]: r["answer"] for r in read(out / "vqa_predictions.json")}
    assert preds == expected
    results = read(out / "vqa_results.json")
    want = json.loads(json.dumps(vqa_accuracy(preds, load_vqa_annotations(ann_file))))
    for key in ("overall", "per_answer_type", "per_question_type", "per_question", "n_questions", "n_unanswered"):
        assert results[key] == want[key], key
    assert results["n_skipped"] == 1 and read(out / "vqa_skipped.json")[0]["question_id"] == 30
    assert "COCO_val2014_000000000003.jpg" in read(out / "vqa_skipped.json")[0]["reason"]
    assert results["settings"]["prompt"] == "Question: {} Answer:" and results["settings"]["length_penalty"] == -1
    assert "per_answer_type.yes/no" in result.stdout


def test_vqa_without_annotations_writes_predictions_only(opt_ckpt, vqa_set):
    pattern = ["--image-pattern", "{image_id}.png"]  # only image 2 exists under this name
    args = ["vqa", "--questions", vqa_set["questions"], "--images", vqa_set["images"], *pattern]
    ok(run(*args, "--out", vqa_set["out"], "--model", opt_ckpt, *GEN))
    out = vqa_set["out"]
    assert [r["question_id"] for r in read(out / "vqa_predictions.json")] == [20]
    assert read(out / "vqa_results.json")["n_skipped"] == 3


def test_gqa_exact_match_on_t5(t5_ckpt, images, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    shutil.copy(images["rgb"], root / "n1.jpg")
    shutil.copy(images["large"], root / "n2.jpg")
    m = blip2.load(t5_ckpt, dtype="fp32")
    qs = [("g1", "n1.jpg", "what is on the table?"), ("g2", "n2.jpg", "is it a cat?")]
    expected = dict(
        zip(["g1", "g2"], m.ask([root / f for _, f, _ in qs], [q for *_, q in qs], **VQA_OPTS), strict=True)
    )
    data = [
        {"question_id": q, "image": f, "question": t, "answer": expected[q] if q == "g1" else "no"} for q, f, t in qs
    ]
    qfile = write(tmp_path / "gqa.json", data)
    out = tmp_path / "out"
    ok(run("vqa", "--gqa", "--questions", qfile, "--images", root, "--out", out, "--model", t5_ckpt, *GEN))
    preds = {r["question_id"]: r["answer"] for r in read(out / "gqa_predictions.json")}
    assert preds == expected
    results = read(out / "gqa_results.json")
    assert results["accuracy"] == gqa_accuracy(preds, load_gqa_answers(qfile))["accuracy"]
    assert results["accuracy"] >= 50.0  # g1's answer is its own prediction


# ---- retrieval -------------------------------------------------------------------------------------------------------
def test_retrieval_recall_equals_recall_of_api_similarity_and_itm_reranking(itm_ckpt, images, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    names = ["rgb.jpg", "l.png", "large.png", "rgba.png"]
    for key in ("rgb", "l", "large", "rgba"):
        shutil.copy(images[key], root / images[key].name)
    caps = [["a red cat.", "A cat on a table"], ["a dog in a park", "dog running"], ["a car", "blue car"], ["a bird"]]
    ann = write(tmp_path / "test.json", [{"image": n, "caption": c} for n, c in zip(names, caps, strict=True)])
    out = tmp_path / "out"
    result = ok(
        run(
            "retrieval",
            "--annotations",
            ann,
            "--images",
            root,
            "--out",
            out,
            "--model",
            itm_ckpt,
            "--dtype",
            "fp32",
            "--k-test",
            2,
            "--batch-size",
            3,
        )
    )

    split = load_retrieval_annotations(ann)
    m = blip2.load(itm_ckpt, dtype="fp32")
    paths = [root / n for n in names]
    sim = m.similarity(paths, split.texts).numpy()
    with torch.no_grad():  # every pair's positive ITM logit in one pass
        feats = m.model.encode_image(m.pixel_values(paths))
        ids, mask = m.text_ids(split.texts)
        n_i, n_t = len(paths), len(split.texts)
        logits = m.model.itm_logits(feats.repeat_interleave(n_t, 0), ids.repeat(n_i, 1), mask.repeat(n_i, 1))
        itm = logits[:, 1].reshape(n_i, n_t).numpy()
    i2t, t2i = rerank_topk(sim, lambda i, t: itm[i, t], k=2)

    results = read(out / "retrieval_results.json")
    assert results["itc"] == pytest.approx(recall_at_k(sim, split.img2txt, split.txt2img))
    assert results["itc_itm"] == pytest.approx(recall_at_k(i2t, split.img2txt, split.txt2img, scores_t2i=t2i))
    scores = np.load(out / "retrieval_scores.npz")
    np.testing.assert_allclose(scores["itc"], sim, atol=1e-5)
    np.testing.assert_allclose(scores["i2t"], i2t, atol=1e-4)
    np.testing.assert_allclose(scores["t2i"], t2i, atol=1e-4)
    preds = read(out / "retrieval_predictions.json")
    assert len(preds["image_to_text"]) == 4 and len(preds["text_to_image"]) == 7
    assert "itc_itm.txt_r1" in result.stdout


def test_retrieval_missing_image_is_one_line(itm_ckpt, tmp_path):
    ann = write(tmp_path / "test.json", [{"image": "gone.jpg", "caption": ["a cat"]}])
    result = run("retrieval", "--annotations", ann, "--images", tmp_path, "--model", itm_ckpt, "--out", tmp_path / "o")
    assert_one_line_failure(result, "gone.jpg")


# ---- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command,flag", [("caption", "--annotations"), ("vqa", "--questions"), ("retrieval", "--annotations")]
)
def test_broken_annotation_file_is_one_line_exit_2(command, flag, opt_ckpt, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"annotations": [')
    result = run(command, flag, bad, "--images", tmp_path, "--out", tmp_path / "out", "--model", opt_ckpt)
    assert_one_line_failure(result, str(bad))


def test_missing_images_folder_is_one_line(opt_ckpt, caption_set, tmp_path):
    args = caption_args(opt_ckpt, caption_set)
    args[args.index("--images") + 1] = tmp_path / "nowhere"
    assert_one_line_failure(run(*args), "nowhere")


def test_vqa_prompt_without_placeholder_is_refused(opt_ckpt, vqa_set):
    args = ["vqa", "--questions", vqa_set["questions"], "--images", vqa_set["images"], "--prompt", "Answer:"]
    assert_one_line_failure(run(*args, "--model", opt_ckpt), "Answer:")


def test_help_defaults_are_the_defaults_used():
    assert eval_cli.CAPTION_HELP_DEFAULTS == eval_run.CAPTION_DEFAULTS
    assert eval_cli.VQA_HELP_DEFAULTS == eval_run.VQA_DEFAULTS
    opts = eval_run.task_options(eval_run.CAPTION_DEFAULTS, {})
    assert (opts.num_beams, opts.max_new_tokens, opts.min_new_tokens) == (5, 30, 8)


def test_gqa_official_dict_and_image_patterns(tmp_path):
    """Official GQA files key questions by string id and name images by `imageId`; the COCO patterns (`:012d`)
    do not apply to such ids and are passed over, `{image_id}.jpg` finds them."""
    qfile = write(tmp_path / "testdev.json", {"201": {"imageId": "n7", "question": "is it red?", "answer": "no"}})
    (qs,) = eval_run.load_gqa_questions(qfile)
    assert (qs.question_id, qs.image_id, qs.file_name) == ("201", "n7", None)
    (tmp_path / "n7.jpg").write_bytes(b"")
    (tmp_path / "COCO_val2014_000000000042.jpg").write_bytes(b"")
    finder = eval_run.ImageFinder(tmp_path, eval_run.default_image_patterns(["val2014"]))
    assert finder.find("n7") == (tmp_path / "n7.jpg", "")
    assert finder.find(42) == (tmp_path / "COCO_val2014_000000000042.jpg", "")
    path, why = finder.find(43)
    assert path is None and "43.png" in why
    with pytest.raises(blip2.eval.EvalError, match="split"):
        eval_run.check_image_pattern("COCO_{split}_{image_id}.jpg")
