"""The Q-Former's four attention modes and the freezing rule."""

from __future__ import annotations

import fixtures
import torch

import blip2
from blip2.config import QFormerConfig
from blip2.qformer import QFormer, build_attention_mask


def _qformer(text: bool = True) -> QFormer:
    torch.manual_seed(0)
    cfg = QFormerConfig(**fixtures.TINY_QFORMER, encoder_hidden_size=24, use_qformer_text_input=text)
    q = QFormer(cfg).eval()
    with torch.no_grad():
        for p in q.parameters():
            p.normal_(0, 0.3)
    return q


def test_masks_are_the_papers():
    """If this fails, ITG text can see the future or queries can see text (the paper's Figure 2 masks)."""
    text_mask = torch.tensor([[1, 1, 1, 0]])
    causal = build_attention_mask(2, text_mask, 1, True, torch.device("cpu"))[0, 0].int()
    expected = torch.tensor(
        [  # q0 q1 t0 t1 t2 pad
            [1, 1, 0, 0, 0, 0],  # q0: queries only
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],  # t0: queries + itself
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 0],  # padding never attended
        ]
    )
    assert torch.equal(causal, expected)
    bi = build_attention_mask(2, text_mask, 1, False, torch.device("cpu"))
    assert bi.shape == (1, 1, 1, 6) and bi.int().flatten().tolist() == [1, 1, 1, 1, 1, 0]
    assert build_attention_mask(2, None, 1, False, torch.device("cpu")) is None


def test_causal_mode_queries_equal_queries_only():
    """If this fails, ITG's query rows are contaminated by text (LAVIS runs them in a separate cached pass)."""
    q = _qformer()
    queries, text, image = torch.randn(2, 3, 32), torch.randn(2, 5, 32), torch.randn(2, 7, 24)
    alone = q(queries, 3, image_embeds=image)
    joint = q(torch.cat([queries, text], 1), 3, torch.ones(2, 5), image_embeds=image, causal=True)
    torch.testing.assert_close(joint[:, :3], alone, atol=1e-5, rtol=0)


def test_causal_text_does_not_see_the_future():
    """If this fails, the ITG loss is trivially low because each token sees the next."""
    q = _qformer()
    queries, image = torch.randn(1, 3, 32), torch.randn(1, 7, 24)
    text = torch.randn(1, 5, 32)
    changed = text.clone()
    changed[:, 3:] = torch.randn(1, 2, 32)  # not a constant shift: the input LayerNorm would remove it
    a = q(torch.cat([queries, text], 1), 3, torch.ones(1, 5), image_embeds=image, causal=True)
    b = q(torch.cat([queries, changed], 1), 3, torch.ones(1, 5), image_embeds=image, causal=True)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-5, rtol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_bidirectional_mode_queries_see_text_and_padding_is_ignored():
    """If this fails, ITM cannot compare image and text, or the score depends on how much padding was added."""
    q = _qformer()
    queries, image, text = torch.randn(1, 3, 32), torch.randn(1, 7, 24), torch.randn(1, 4, 32)
    alone = q(queries, 3, image_embeds=image)
    joint = q(torch.cat([queries, text], 1), 3, torch.ones(1, 4), image_embeds=image)
    assert (joint[:, :3] - alone).abs().max() > 1e-3
    padded = torch.cat([queries, text, torch.randn(1, 2, 32)], 1)
    joint_padded = q(padded, 3, torch.tensor([[1, 1, 1, 1, 0, 0]]), image_embeds=image)
    torch.testing.assert_close(joint_padded[:, :7], joint, atol=1e-5, rtol=0)


def test_text_only_mode_ignores_image_and_padding():
    """If this fails, ITC text embeddings change with batch padding."""
    q = _qformer()
    text = torch.randn(1, 4, 32)
    a = q(text, 0, torch.ones(1, 4))
    b = q(torch.cat([text, torch.randn(1, 3, 32)], 1), 0, torch.tensor([[1, 1, 1, 1, 0, 0, 0]]))
    torch.testing.assert_close(b[:, :4], a, atol=1e-5, rtol=0)


def test_gradients_reach_exactly_the_trainable_parameters(opt_ckpt, images):
    """If this fails, training updates the frozen ViT or LLM (or misses part of the Q-Former)."""
    m = blip2.load(opt_ckpt, dtype="fp32").model
    trainable = ("query_tokens", "qformer.", "language_projection.")
    for name, p in m.named_parameters():
        p.requires_grad_(name.startswith(trainable))
    m.train()
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(4, 100, (2, 6))
    out = m(ids, pixel_values=pixels, labels=ids)
    out.loss.backward()
    for name, p in m.named_parameters():
        if name.startswith(trainable):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
