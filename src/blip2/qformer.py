"""The Q-Former: a BERT-base encoder whose first `Nq` rows are learned queries.

Query rows cross-attend to the image (every `cross_attention_frequency`-th layer) and use their own FFN
(`intermediate_query`/`output_query`); text rows use the BERT FFN (`intermediate`/`output`). Parameter names are
those of `transformers`' `Blip2QFormerModel`, so checkpoints load without renaming.

The four attention modes of the paper are four masks over one sequence `[queries; text]`:

=====================  ============================  ===========================================
mode                   rows present                  who sees whom
=====================  ============================  ===========================================
queries only           queries                       queries <-> queries (+ image)
text only (ITC)        text                          text <-> text (padding masked)
bidirectional (ITM)    queries + text                everyone <-> everyone (padding masked)
causal (ITG)           queries + text                queries <-> queries; text -> queries, earlier text
=====================  ============================  ===========================================

In the causal mode query rows never see text, so their outputs equal the queries-only pass: one pass gives what
LAVIS computes with a cached query pass followed by a text pass.

InstructBLIP runs the bidirectional mode with the instruction as the text: the queries read it while they look at
the image. Its Q-Former holds the text embeddings itself, with the input LayerNorm (`qformer.embeddings.*`, as HF's
`InstructBlipQFormerModel`); BLIP-2's has only the LayerNorm (`qformer.layernorm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .config import QFormerConfig


def build_attention_mask(
    query_length: int, text_mask: torch.Tensor | None, batch: int, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask for `scaled_dot_product_attention` (True = may attend).

    Returns None when nothing is masked, (B, 1, 1, L) for the bidirectional modes, (B, 1, L, L) for causal.
    """
    if text_mask is None and not causal:
        return None
    T = 0 if text_mask is None else text_mask.shape[1]
    L = query_length + T
    keep = torch.ones(batch, L, dtype=torch.bool, device=device)  # (B, L) columns that are not padding
    if text_mask is not None:
        keep[:, query_length:] = text_mask.to(device=device, dtype=torch.bool)
    if not causal:
        return keep[:, None, None, :]
    idx = torch.arange(L, device=device)
    is_query_col = idx < query_length
    # text row i sees every query and text columns j <= i; query rows see only queries
    text_rows = is_query_col[None, :] | (idx[None, :] <= idx[:, None])  # (L, L)
    rows = torch.where((idx < query_length)[:, None], is_query_col[None, :].expand(L, L), text_rows)
    return rows[None, None] & keep[:, None, None, :]  # (B, 1, L, L)


class TextEmbeddings(nn.Module):
    """BERT word + position embeddings of the Q-Former's text side (top-level `embeddings.` in HF retrieval)."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Text positions start at 0 even when queries are prepended: queries have no position embedding.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]  # (B, T, D)


class InstructionEmbeddings(TextEmbeddings):
    """InstructBLIP's `qformer.embeddings`: the instruction's word + position embeddings and the LayerNorm that
    every Q-Former input (queries and text) goes through."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout = cfg.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        hd = D // self.num_heads
        q = self.query(x).view(B, T, self.num_heads, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.key(context).view(B, context.shape[1], self.num_heads, hd).transpose(1, 2)  # (B, H, S, hd)
        v = self.value(context).view(B, context.shape[1], self.num_heads, hd).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return y.transpose(1, 2).reshape(B, T, D)


class AddNorm(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): BERT's `SelfOutput` / `Output`."""

    def __init__(self, cfg: QFormerConfig, width_in: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(cfg, kv_width)
        self.output = AddNorm(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        return self.output(self.attention(x, x if context is None else context, mask), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int) -> None:
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size)
        self.has_cross_attention = index % cfg.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Attention(cfg, cfg.encoder_hidden_size)
        if cfg.use_qformer_text_input:
            self.intermediate = Intermediate(cfg)
            self.output = AddNorm(cfg, cfg.intermediate_size)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = AddNorm(cfg, cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        query_length: int,
        image_embeds: torch.Tensor | None,
        image_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        a = self.attention(x, mask=mask)  # (B, L, D)
        if query_length == 0:
            return self.output(self.intermediate(a), a)
        q = a[:, :query_length]
        if self.has_cross_attention:
            if image_embeds is None:
                raise ValueError("query rows need image_embeds: this layer cross-attends to the image")
            q = self.crossattention(q, context=image_embeds, mask=image_mask)
        out = self.output_query(self.intermediate_query(q), q)
        if a.shape[1] > query_length:
            t = a[:, query_length:]
            out = torch.cat([out, self.output(self.intermediate(t), t)], dim=1)
        return out


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))


class QFormer(nn.Module):
    """Embeddings `[queries; text]` (B, Nq + T, D) -> hidden states of the same shape."""

    def __init__(self, cfg: QFormerConfig, instruct: bool = False) -> None:
        super().__init__()
        self.config = cfg
        if instruct:
            self.embeddings = InstructionEmbeddings(cfg)
        else:
            self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.encoder = QFormerEncoder(cfg)

    def forward(
        self,
        embeds: torch.Tensor,
        query_length: int,
        text_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Run one of the four modes (see the module docstring).

        Args:
            embeds: (B, Nq + T, D): query tokens followed by text embeddings (either part may be empty).
            query_length: Nq, the number of query rows at the front of `embeds` (0 for text only).
            text_mask: (B, T) 1 for real text tokens, 0 for padding.
            image_embeds: (B, N, Dv) vision features the query rows cross-attend to.
            image_mask: (B, N) 1 for valid image tokens; None means all valid.
            causal: text rows see only earlier text (ITG).
        """
        norm = self.embeddings.layernorm if hasattr(self, "embeddings") else self.layernorm
        dtype = norm.weight.dtype  # its own dtype: fp32 under an fp16 model, as the reference
        x = self.dropout(norm(embeds.to(dtype)))
        mask = build_attention_mask(query_length, text_mask, x.shape[0], causal, x.device)
        if image_embeds is not None:
            image_embeds = image_embeds.to(dtype)
        if image_mask is not None:
            image_mask = image_mask.to(torch.bool)[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, mask, query_length, image_embeds, image_mask)
        return x
