"""BLIP-2's training losses, tensors in and tensors out (no model, no tokenizer).

Stage 1 (`Blip2Qformer.forward` in LAVIS) sums three losses over one batch of image-text pairs:

* ITC, image-text contrastive: cosine similarity of the text CLS embedding with each query embedding, **max over
  the queries**, divided by a learnable temperature; cross-entropy both ways with label smoothing 0.1; the other
  processes' features are gathered as extra negatives.
* ITM, image-text matching: for each pair one hard negative text and one hard negative image are sampled with
  probability `softmax(sim)` (the positive masked); a 3B batch (pos, neg-text, neg-image) is classified
  matched / not matched, labels `[1]*B + [0]*2B`, no label smoothing (as LAVIS).
* ITG, image-grounded text generation: the text with `[CLS]` replaced by `[DEC]` is decoded causally with the
  queries visible; next-token cross-entropy with label smoothing 0.1, padding ignored.

Stage 2 is a language-modelling loss through the frozen LM (`Blip2Model.forward(..., labels=)`); this module only
builds its labels (`causal_lm_labels`).

Distributed: `gather` concatenates a tensor over processes when `torch.distributed` is initialised and returns it
unchanged otherwise, so every function here runs the same in one process and in many.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..scoring import itc_similarity

IGNORE = -100  # cross-entropy's ignore_index: padding, prompts and image positions carry no loss


# ---- processes ----------------------------------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every process' gradient for this process' rows (LAVIS' `GatherLayer`).

    Written here rather than `torch.distributed.nn.all_gather`, whose backward on gloo does not sum (torch 2.13)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every process' loss depends on our rows: sum their gradients
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]


def gather(x: torch.Tensor, with_grad: bool = False) -> torch.Tensor:
    """Concatenate `x` (B, ...) over all processes along dim 0 -> (B * world, ...), in rank order.

    Without `with_grad` the other processes' rows are constants (as LAVIS' `concat_all_gather`), but this process'
    own rows are put back so they keep their gradient (open_clip's `gather_features`). With `with_grad` every row
    carries gradient back to the process that made it, which makes the processes' averaged gradients (DDP) equal
    those of one process over the whole batch. All processes must give the same shape.
    """
    rank, world = rank_and_world()
    if world == 1:
        return x
    if with_grad:
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


# ---- ITC ----------------------------------------------------------------------------------------------------------
@dataclass
class ItcOutput:
    loss: torch.Tensor
    sim_i2t: torch.Tensor  # (B, B*world): this process' images against every text, already divided by temp
    sim_t2i: torch.Tensor  # (B, B*world): this process' texts against every image


def itc_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    temp: torch.Tensor | float,
    label_smoothing: float = 0.1,
    gather_with_grad: bool = False,
) -> ItcOutput:
    """Contrastive loss between L2-normalised query embeddings (B, Nq, E) and text CLS embeddings (B, E).

    The similarity of an image and a text is the best-matching query: `max_q <image_q, text>`
    (`scoring.itc_similarity`). Pair i of this process is the target at column `rank * B + i` of the gathered batch.
    """
    rank, _ = rank_and_world()
    B = image_feats.shape[0]
    image_all = gather(image_feats, gather_with_grad)  # (B*W, Nq, E)
    text_all = gather(text_feats, gather_with_grad)  # (B*W, E)
    sim_i2t = itc_similarity(image_feats, text_all) / temp  # (B, B*W)
    sim_t2i = itc_similarity(image_all, text_feats).T / temp  # (B*W, B) -> (B, B*W)
    targets = torch.arange(rank * B, rank * B + B, device=image_feats.device)
    loss = (
        F.cross_entropy(sim_i2t.float(), targets, label_smoothing=label_smoothing)
        + F.cross_entropy(sim_t2i.float(), targets, label_smoothing=label_smoothing)
    ) / 2
    return ItcOutput(loss=loss, sim_i2t=sim_i2t, sim_t2i=sim_t2i)


# ---- ITM ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of this process' pairs, one negative text and one negative image, indices into the gathered batch.

    Negatives are drawn with probability `softmax(sim)` over the gathered batch with the positive masked out, so
    texts (images) that the current ITC model confuses with the image (text) are chosen more often.
    Returns (neg_text (B,), neg_image (B,)).
    """
    rank, _ = rank_and_world()
    B, N = sim_i2t.shape
    if N < 2:
        raise ValueError(f"ITM needs at least 2 pairs in the (gathered) batch to draw a negative, got {N}")
    own = torch.arange(B, device=sim_i2t.device)
    weights = []
    for sim in (sim_i2t, sim_t2i):
        s = sim.float().clone()
        s[own, rank * B + own] = float("-inf")  # never the positive itself
        weights.append(F.softmax(s, dim=1))
    neg_text = torch.multinomial(weights[0], 1, generator=generator).squeeze(1)
    neg_image = torch.multinomial(weights[1], 1, generator=generator).squeeze(1)
    return neg_text, neg_image


def itm_labels(batch: int, device: torch.device | None = None) -> torch.Tensor:
    """`[1]*B + [0]*2B`: the 3B ITM batch is (image, text), (image, negative text), (negative image, text)."""
    return torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)]).to(device)


def itm_triplets(
    image_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    neg_text: torch.Tensor,
    neg_image: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 3B ITM inputs: images (pos, pos, neg) paired with texts (pos, neg, pos).

    `image_embeds` (B, N, Dv), `text_ids`/`text_mask` (B, T) are this process'; the negatives index the gathered
    batch. Image features come from the frozen encoder, so gathering them without gradient loses nothing.
    """
    images_all = gather(image_embeds.detach())  # (B*W, N, Dv)
    ids_all, mask_all = gather(text_ids), gather(text_mask)  # (B*W, T)
    images = torch.cat([image_embeds, image_embeds, images_all[neg_image]], dim=0)  # (3B, N, Dv)
    ids = torch.cat([text_ids, ids_all[neg_text], text_ids], dim=0)  # (3B, T)
    mask = torch.cat([text_mask, mask_all[neg_text], text_mask], dim=0)
    return images, ids, mask


def itm_loss(logits: torch.Tensor) -> torch.Tensor:
    """(3B, 2) logits of `itm_triplets` order -> cross-entropy against `itm_labels`."""
    if logits.shape[0] % 3:
        raise ValueError(f"ITM logits must be a 3B batch (pos, neg-text, neg-image), got {logits.shape[0]} rows")
    return F.cross_entropy(logits.float(), itm_labels(logits.shape[0] // 3, logits.device))


# ---- ITG ----------------------------------------------------------------------------------------------------------
def itg_inputs(input_ids: torch.Tensor, dec_token_id: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder ids (the text with position 0, `[CLS]`, replaced by `[DEC]`) and labels (padding -> -100)."""
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = dec_token_id
    labels = decoder_ids.masked_fill(decoder_ids == pad_token_id, IGNORE)
    return decoder_ids, labels


def itg_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Next-token loss: logits (B, T, V) at position t predict labels[t + 1]; -100 is ignored."""
    shifted = logits[:, :-1].float()
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        label_smoothing=label_smoothing,
    )


# ---- stage 2 ------------------------------------------------------------------------------------------------------
def causal_lm_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor | list[int]
) -> torch.Tensor:
    """Labels for a decoder-only LM: the ids with padding and the first `prompt_lengths[i]` tokens of row i (the
    prompt, BOS included) set to -100, so only the answer or caption is learned. Right padding assumed."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
    lengths = torch.as_tensor(prompt_lengths, device=input_ids.device)[:, None]  # (B, 1)
    return labels.masked_fill(positions < lengths, IGNORE)
