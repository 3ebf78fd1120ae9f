"""Each loss against a hand computation on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from blip2.train.losses import (
    IGNORE,
    causal_lm_labels,
    itc_loss,
    itg_inputs,
    itg_loss,
    itm_labels,
    itm_loss,
    itm_triplets,
    sample_hard_negatives,
)


def smoothed_ce(logits: list[float], target: int, eps: float) -> float:
    """-(1 - eps) log p_target - eps / K * sum_k log p_k, written out."""
    z = math.log(sum(math.exp(v) for v in logits))
    logp = [v - z for v in logits]
    return -(1 - eps) * logp[target] - eps / len(logits) * sum(logp)


def test_itc_is_max_over_queries_over_temperature_with_label_smoothing():
    """If this fails, ITC does not use the best-matching query, the temperature, or LAVIS' label smoothing 0.1."""
    image = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])  # (B=2, Nq=2, E=2)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (B=2, E=2)
    out = itc_loss(image, text, temp=0.5)
    # image 0: queries score text0 {1, 0} -> 1, text1 {0, 1} -> 1; image 1: text0 {.6, -1} -> .6, text1 {.8, 0} -> .8
    i2t = [[2.0, 2.0], [1.2, 1.6]]
    # text 0: image0 -> 1, image1 -> .6; text 1: image0 -> 1, image1 -> .8
    t2i = [[2.0, 1.2], [2.0, 1.6]]
    torch.testing.assert_close(out.sim_i2t, torch.tensor(i2t))
    torch.testing.assert_close(out.sim_t2i, torch.tensor(t2i))
    expected = (
        sum(smoothed_ce(i2t[i], i, 0.1) for i in range(2)) / 2 + sum(smoothed_ce(t2i[i], i, 0.1) for i in range(2)) / 2
    ) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_itc_gradient_reaches_temperature_and_both_sides():
    image = torch.nn.functional.normalize(torch.randn(3, 2, 4), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1).requires_grad_()
    temp = torch.tensor(0.07, requires_grad=True)
    itc_loss(image, text, temp).loss.backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0 and temp.grad != 0


def test_hard_negatives_never_the_positive_and_follow_softmax():
    """If this fails, ITM trains on 'negatives' that are the positive pair, or ignores how hard a negative is."""
    sim = torch.tensor([[5.0, 1.0, 0.0], [0.0, 5.0, 2.0], [3.0, 3.0, 5.0]])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(3, 3)
    for _ in range(3000):
        neg_text, neg_image = sample_hard_negatives(sim, sim.T.contiguous(), generator=gen)
        counts[torch.arange(3), neg_text] += 1
        assert (neg_text != torch.arange(3)).all() and (neg_image != torch.arange(3)).all()
    masked = sim.clone().fill_diagonal_(float("-inf"))
    expected = torch.softmax(masked, dim=1) * 3000
    assert (counts - expected).abs().max() < 120  # ~4 sigma of a binomial with n=3000


def test_hard_negatives_need_two_pairs():
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1))


def test_itm_triplets_are_pos_negtext_negimage():
    """If this fails, the 3B ITM batch does not line up with labels [1]*B + [0]*2B."""
    images = torch.arange(3.0)[:, None, None].expand(3, 2, 1)  # image i is filled with i
    ids = torch.tensor([[10], [11], [12]])
    mask = torch.ones(3, 1, dtype=torch.long)
    neg_text, neg_image = torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])
    imgs, txt, _ = itm_triplets(images, ids, mask, neg_text, neg_image)
    assert imgs[:, 0, 0].tolist() == [0, 1, 2, 0, 1, 2, 1, 2, 0]
    assert txt[:, 0].tolist() == [10, 11, 12, 12, 10, 11, 10, 11, 12]
    assert itm_labels(3).tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_itm_loss_is_plain_cross_entropy():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.5, 0.5]])
    expected = (smoothed_ce([0.0, 2.0], 1, 0) + smoothed_ce([1.0, 0.0], 0, 0) + smoothed_ce([0.5, 0.5], 0, 0)) / 3
    assert itm_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="3B"):
        itm_loss(torch.zeros(4, 2))


def test_itg_inputs_replace_cls_with_dec_and_ignore_padding():
    ids = torch.tensor([[101, 7, 8, 102, 0, 0]])
    dec, labels = itg_inputs(ids, dec_token_id=5, pad_token_id=0)
    assert dec.tolist() == [[5, 7, 8, 102, 0, 0]]
    assert labels.tolist() == [[5, 7, 8, 102, IGNORE, IGNORE]]
    assert ids[0, 0] == 101  # the ITC/ITM ids are untouched


def test_itg_loss_predicts_the_next_token_with_smoothing():
    """If this fails, ITG predicts the current token (no shift) or counts padding."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [9.0, 9.0, 9.0]]])  # (1, T=3, V=3)
    labels = torch.tensor([[0, 2, IGNORE]])
    # position 0 predicts labels[1] = 2; position 1 would predict labels[2], ignored; position 2 predicts nothing
    assert itg_loss(logits, labels).item() == pytest.approx(smoothed_ce([2.0, 0.0, 0.0], 2, 0.1), rel=1e-6)


def test_causal_lm_labels_mask_prompt_and_padding():
    ids = torch.tensor([[2, 30, 31, 40, 41, 1], [2, 50, 51, 52, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    labels = causal_lm_labels(ids, mask, [3, 0])
    assert labels.tolist() == [[IGNORE, IGNORE, IGNORE, 40, 41, IGNORE], [2, 50, 51, 52, IGNORE, IGNORE]]
