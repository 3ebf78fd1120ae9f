"""Retrieval recall and LAVIS re-ranking on hand-built score matrices; a failure means R@k numbers that cannot be
compared with the paper's Table 5."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from blip2.eval import EvalError, load_retrieval_annotations, recall_at_k, rerank_topk

IMG2TXT = [[0, 1], [2, 3], [4, 5]]
TXT2IMG = [0, 0, 1, 1, 2, 2]
# Image 0's best gt text is ranked 0th, image 1's 1st (t2 behind t0), image 2's 4th (t4 behind t0..t3).
SCORES_I2T = np.array(
    [
        [0.9, 0.1, 0.5, 0.4, 0.3, 0.2],
        [0.8, 0.1, 0.7, 0.2, 0.3, 0.0],
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.1],
    ]
)
# Text ranks of their image: t0 0, t1 2, t2 0, t3 1, t4 0, t5 2.
SCORES_T2I = np.array(
    [[0.9, 0.1, 0.0], [0.1, 0.9, 0.5], [0.0, 1.0, 0.0], [0.5, 0.4, 0.3], [0.0, 0.1, 0.9], [0.3, 0.2, 0.1]]
)


def test_recall_at_k_from_known_ranks() -> None:
    """Ranks (0, 1, 4) image→text and (0, 2, 0, 1, 0, 2) text→image give these recalls exactly."""
    r = recall_at_k(SCORES_I2T, IMG2TXT, TXT2IMG, ks=(1, 2, 5, 10), scores_t2i=SCORES_T2I)
    assert r["txt_r1"] == pytest.approx(100 / 3)
    assert r["txt_r2"] == pytest.approx(200 / 3)
    assert r["txt_r5"] == r["txt_r10"] == 100.0
    assert r["img_r1"] == pytest.approx(50.0)
    assert r["img_r2"] == pytest.approx(400 / 6)
    assert r["img_r5"] == 100.0
    assert r["txt_r_mean"] == pytest.approx((100 / 3 + 200 / 3 + 200) / 4)
    assert r["img_r_mean"] == pytest.approx((50 + 400 / 6 + 200) / 4)
    assert r["r_mean"] == pytest.approx((r["txt_r_mean"] + r["img_r_mean"]) / 2)
    assert r["agg_metrics"] == r["txt_r_mean"]


def test_recall_defaults_to_transposed_matrix_for_text_to_image() -> None:
    """Without re-ranking one ITC matrix serves both directions; the default keys are LAVIS's r1/r5/r10."""
    r = recall_at_k(np.eye(3), [[0], [1], [2]], [0, 1, 2])
    assert {k: r[k] for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1")} == {
        "txt_r1": 100.0,
        "txt_r5": 100.0,
        "txt_r10": 100.0,
        "img_r1": 100.0,
    }


def test_recall_rejects_mismatched_links() -> None:
    """A gt index outside the matrix or a wrong-shaped t2i matrix must be a clear error, not an IndexError."""
    with pytest.raises(EvalError, match=r"img2txt\[2\]"):
        recall_at_k(SCORES_I2T, [[0], [1], [9]], TXT2IMG)
    with pytest.raises(EvalError, match="txt2img has 2 entries"):
        recall_at_k(SCORES_I2T, IMG2TXT, [0, 1])
    with pytest.raises(EvalError, match="scores_t2i has shape"):
        recall_at_k(SCORES_I2T, IMG2TXT, TXT2IMG, scores_t2i=SCORES_I2T)


def test_rerank_puts_minus_100_outside_topk_and_itm_plus_itc_inside() -> None:
    """Each image keeps its own top-k texts by ITC and each text its own top-k images; candidates score ITM + ITC."""
    rng = np.random.default_rng(0)
    itc = rng.permutation(20).reshape(4, 5) / 20.0  # distinct values: top-k is unambiguous
    calls: list[int] = []

    def itm_fn(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
        calls.append(len(img))
        return 10.0 * img + txt

    s_i2t, s_t2i = rerank_topk(itc, itm_fn, k=2)
    for i in range(4):
        top = set(np.argsort(-itc[i])[:2])
        for t in range(5):
            assert s_i2t[i, t] == (pytest.approx(10 * i + t + itc[i, t]) if t in top else -100.0)
    for t in range(5):
        top = set(np.argsort(-itc[:, t])[:2])
        for i in range(4):
            assert s_t2i[t, i] == (pytest.approx(10 * i + t + itc[i, t]) if i in top else -100.0)
    assert calls == [2] * 9  # one batch of k pairs per image, then per text


def test_rerank_lets_itm_fix_an_itc_mistake() -> None:
    """ITC prefers the wrong caption; ITM knows better, so re-ranking lifts R@1 from 0 to 100."""
    itc = np.array([[0.2, 0.3], [0.3, 0.2]])  # image 0 ↔ text 0 is the truth, ITC has it backwards

    def itm_fn(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
        return np.where(img == txt, 5.0, -5.0)

    assert recall_at_k(itc, [[0], [1]], [0, 1], ks=(1,))["txt_r1"] == 0.0
    s_i2t, s_t2i = rerank_topk(itc, itm_fn, k=128)  # k larger than the set: everything is a candidate
    r = recall_at_k(s_i2t, [[0], [1]], [0, 1], ks=(1,), scores_t2i=s_t2i)
    assert (r["txt_r1"], r["img_r1"]) == (100.0, 100.0)


def test_rerank_rejects_wrong_itm_output() -> None:
    """An itm_fn returning the wrong number of scores must say so rather than broadcast silently."""
    with pytest.raises(EvalError, match="itm_fn returned 1 scores for 2"):
        rerank_topk(np.zeros((2, 3)), lambda i, t: np.zeros(1), k=2)
    with pytest.raises(EvalError, match="k = 0"):
        rerank_topk(np.zeros((2, 3)), lambda i, t: np.zeros(len(i)), k=0)


def test_karpathy_retrieval_loader_builds_links(tmp_path: Path) -> None:
    """Captions are flattened in file order, normalised like LAVIS, and linked both ways."""
    path = tmp_path / "test.json"
    data = [{"image": "a.jpg", "caption": ["A Dog!", "a  puppy."]}, {"image": "b.jpg", "caption": "A cat"}]
    path.write_text(json.dumps(data), encoding="utf-8")
    ds = load_retrieval_annotations(path)
    assert ds.images == ["a.jpg", "b.jpg"]
    assert ds.texts == ["a dog", "a puppy", "a cat"]
    assert (ds.img2txt, ds.txt2img) == ([[0, 1], [2]], [0, 0, 1])


def test_bad_retrieval_files_raise_errors_naming_the_file(tmp_path: Path) -> None:
    """Broken JSON or an entry without captions names the file and entry."""
    broken = tmp_path / "broken.json"
    broken.write_text("[{", encoding="utf-8")
    with pytest.raises(EvalError, match=r"broken\.json.*not valid JSON"):
        load_retrieval_annotations(broken)
    nocap = tmp_path / "nocap.json"
    nocap.write_text(json.dumps([{"image": "a.jpg"}]), encoding="utf-8")
    with pytest.raises(EvalError, match=r"nocap\.json.*entry \[0\].*'caption'"):
        load_retrieval_annotations(nocap)
