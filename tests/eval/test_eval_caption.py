"""Caption metrics through pycocoevalcap on tiny cases with hand-computed answers; a failure means COCO/NoCaps
numbers that are not comparable with the paper's Table 3. Tests that run Java skip when `java` is absent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from blip2.eval import EvalError, caption_scores, load_caption_references, normalize_caption
from blip2.eval import caption as caption_mod

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="pycocoevalcap's PTBTokenizer and METEOR are Java programs; no `java` on PATH"
)


def _scores(preds: dict, refs: dict, **kw: bool) -> dict:
    return caption_scores(preds, refs, spice=False, meteor=kw.pop("meteor", False), **kw)


def test_normalize_caption_matches_lavis_pre_caption() -> None:
    """Lower-case, `.!"()*#:;~` become spaces, whitespace collapses, commas stay, at most max_words words."""
    assert normalize_caption('A Dog, running!  (fast)~ "really"') == "a dog, running fast really"
    assert normalize_caption("one two three four", max_words=2) == "one two"


@needs_java
def test_bleu_by_hand() -> None:
    """ "a cat sat on the mat" vs "the cat is on the mat": 4/6 unigrams and 2/5 bigrams match, equal lengths (no
    brevity penalty), so BLEU-1 = 2/3 and BLEU-2 = sqrt(2/3 * 2/5). PTB tokenisation lower-cases and drops the
    final period, so capitals and "." do not change the score."""
    r = _scores({1: "A cat sat on the mat."}, {1: ["the cat is on the mat"]})
    assert r["Bleu_1"] == pytest.approx(2 / 3, abs=1e-6)
    assert r["Bleu_2"] == pytest.approx((2 / 3 * 2 / 5) ** 0.5, abs=1e-6)


@needs_java
def test_identical_caption_gives_bleu4_of_one() -> None:
    """A prediction equal to its reference must score BLEU-4 = 1."""
    sentence = "a man riding a wave on top of a surfboard"
    r = _scores({"img.jpg": sentence}, {"img.jpg": [sentence]})
    assert r["Bleu_4"] == pytest.approx(1.0, abs=1e-6)


@needs_java
def test_rouge_l_by_hand() -> None:
    """LCS("a cat on a mat", "the cat sat on the red mat") = "cat on mat" = 3, so P = 3/5, R = 3/7 and ROUGE-L =
    (1 + b^2) P R / (R + b^2 P) with b = 1.2 (pycocoevalcap's beta)."""
    p, r_, b2 = 3 / 5, 3 / 7, 1.2**2
    r = _scores({1: "a cat on a mat"}, {1: ["the cat sat on the red mat"]})
    assert r["ROUGE_L"] == pytest.approx((1 + b2) * p * r_ / (r_ + b2 * p))


@needs_java
def test_cider_prefers_matching_captions_over_swapped_ones() -> None:
    """CIDEr with each prediction equal to its own references must beat the same predictions given to the wrong
    images; otherwise the metric is being fed misaligned ids."""
    refs = {
        1: ["a dog runs on the grass", "a brown dog running in a field"],
        2: ["a plate of pasta with tomato sauce", "spaghetti on a white plate"],
        3: ["a red bus on a city street", "a double decker bus driving down the road"],
    }
    matched = {k: v[0] for k, v in refs.items()}
    swapped = {1: refs[2][0], 2: refs[3][0], 3: refs[1][0]}
    good, bad = _scores(matched, refs), _scores(swapped, refs)
    assert good["CIDEr"] > 1.0 > bad["CIDEr"]
    assert good["n_images"] == 3


@needs_java
def test_meteor_runs_and_ranks_identical_above_different() -> None:
    """METEOR (Java jar shipped in pycocoevalcap) runs and scores an exact match above a wrong caption."""
    refs = {1: ["a dog runs on the grass"], 2: ["a plate of pasta with sauce"]}
    r = caption_scores({1: "a dog runs on the grass", 2: "a red bus"}, refs, spice=False, per_image=True)
    assert "METEOR" not in r["skipped"]
    assert 0.9 < r["per_image"][1]["METEOR"] <= 1.0
    assert r["per_image"][2]["METEOR"] < r["per_image"][1]["METEOR"]


@needs_java
def test_spice_without_corenlp_is_skipped_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Stanford CoreNLP models (no network to fetch them): SPICE is None with a reason; the rest still score."""
    monkeypatch.setattr(caption_mod, "_spice_missing_reason", lambda: "SPICE needs the Stanford CoreNLP models")
    r = caption_scores({1: "a cat"}, {1: ["a cat"]}, meteor=False, spice=True)
    assert r["SPICE"] is None
    assert "Stanford CoreNLP" in r["skipped"]["SPICE"]
    assert r["CIDEr"] is not None


@needs_java
def test_failing_meteor_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """A METEOR JVM that dies (e.g. no 2 GB heap) must not throw away BLEU/CIDEr computed minutes before."""

    class DeadMeteor:
        def compute_score(self, gts: dict, res: dict) -> None:
            raise ValueError("could not convert string to float: ''")

    monkeypatch.setattr("pycocoevalcap.meteor.meteor.Meteor", DeadMeteor)
    r = caption_scores({1: "a cat"}, {1: ["a cat"]}, spice=False)
    assert r["METEOR"] is None and "ValueError" in r["skipped"]["METEOR"]
    assert r["Bleu_1"] == pytest.approx(1.0, abs=1e-6)


def test_missing_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Java nothing can be tokenised; the user is told to install a JRE rather than seeing FileNotFoundError."""
    monkeypatch.setattr(caption_mod.shutil, "which", lambda name: None)
    with pytest.raises(EvalError, match="Java"):
        caption_scores({1: "a cat"}, {1: ["a cat"]})


def test_prediction_without_references_is_an_error() -> None:
    """Predictions keyed differently from the references (e.g. path vs id) must fail loudly, naming the key."""
    with pytest.raises(EvalError, match="'x.jpg'"):
        caption_scores({"x.jpg": "a cat"}, {1: ["a cat"]})


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_loads_coco_and_karpathy_caption_files(tmp_path: Path) -> None:
    """COCO-style groups captions by image_id; Karpathy lists key by image_id or, without one, the image path."""
    coco = {
        "images": [{"id": 5, "file_name": "val/5.jpg"}, {"id": 6}],
        "annotations": [{"image_id": i, "caption": c} for i, c in ((5, "a"), (5, "b"), (6, "c"))],
    }
    refs = load_caption_references(_write(tmp_path / "coco.json", coco))
    assert refs.captions == {5: ["a", "b"], 6: ["c"]}
    assert refs.images == {5: "val/5.jpg"}
    karpathy = [{"image": "x.jpg", "caption": ["a", "b"]}, {"image": "y.jpg", "caption": "c", "image_id": 9}]
    refs = load_caption_references(_write(tmp_path / "k.json", karpathy))
    assert refs.captions == {"x.jpg": ["a", "b"], 9: ["c"]}
    assert refs.images == {"x.jpg": "x.jpg", 9: "y.jpg"}


def test_bad_caption_files_raise_errors_naming_the_file(tmp_path: Path) -> None:
    """Broken JSON, a missing key or a non-text caption names the file and the entry."""
    broken = tmp_path / "broken.json"
    broken.write_text('{"annotations": [}', encoding="utf-8")
    with pytest.raises(EvalError, match=r"broken\.json.*not valid JSON"):
        load_caption_references(broken)
    with pytest.raises(EvalError, match=r"noid\.json.*annotations\[0\].*'image_id'"):
        load_caption_references(_write(tmp_path / "noid.json", {"annotations": [{"caption": "a"}]}))
    with pytest.raises(EvalError, match=r"num\.json.*entry \[0\]\.caption"):
        load_caption_references(_write(tmp_path / "num.json", [{"image": "a.jpg", "caption": 3}]))
    with pytest.raises(EvalError, match=r"noann\.json.*'annotations'"):
        load_caption_references(_write(tmp_path / "noann.json", {"images": []}))
