"""The language model's key/value cache during generation: written in place into buffers reserved for it.

`transformers`' `DynamicLayer` concatenates each step's keys and values onto the whole cache: a new tensor per step
and layer, so for a batch of prompts the cache is copied every step and the freed copies fragment the heap (with
OPT-2.7B at 32 prompts of 62 positions, the process's peak grows by more than the cache itself). `ReservedLayer`
writes each step's positions into buffers reserved for the whole generation (the prompt's positions plus the new
tokens'), growing by half where they fill up (a chat's later turns); attention reads views onto them.

`storage` (e.g. bf16 where quantized layers compute in fp32: dtype_policy.Placement.kv_storage) halves the cache;
attention then reads it widened back to the arithmetic's dtype, each position rounded once, the same in any batch.
Without it the keys and values that attention reads are the numbers `transformers`' cache holds.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

GROWTH_STEP = 16  # positions: a buffer that fills up grows by half, rounded up to this


class ReservedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views onto buffers of `reserve` positions or more."""

    def __init__(self, reserve: int = 0, storage: torch.dtype | None = None) -> None:
        super().__init__()
        self.reserve = reserve
        self.storage = storage
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.arithmetic = key_states.dtype

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._adopt()
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if self._buffers is None or end > self._buffers[0].shape[-2]:
            self._grow(key_states, end)
        for buffer, new in zip(self._buffers, (key_states, value_states)):
            buffer[..., start:end, :].copy_(new)
        self.keys, self.values = (b[..., :end, :] for b in self._buffers)
        if self.keys.dtype == self.arithmetic:
            return self.keys, self.values
        return self.keys.to(self.arithmetic), self.values.to(self.arithmetic)

    def _grow(self, like: torch.Tensor, end: int) -> None:
        """New buffers for at least `end` positions, holding the positions cached so far."""
        held = self._buffers[0].shape[-2] if self._buffers is not None else 0
        size = max(end, self.reserve, -(-held * 3 // (2 * GROWTH_STEP)) * GROWTH_STEP)
        n = self.get_seq_length()
        buffers = []
        for kept in (self.keys, self.values):
            buffer = like.new_empty((*like.shape[:-2], size, like.shape[-1]), dtype=self.storage or like.dtype)
            if n:
                buffer[..., :n, :].copy_(kept)
            buffers.append(buffer)
        self._buffers = (buffers[0], buffers[1])

    def _adopt(self) -> None:
        """Take over keys/values that `transformers` replaced (its `crop`, `reorder_cache` and batch selection
        assign new tensors): a view onto the buffers (a crop) keeps them; anything else is copied into new buffers
        by `update`."""
        if self._buffers is not None and not _same_storage(self.keys, self._buffers[0]):
            self._buffers = None

    def reset(self) -> None:
        self._buffers = None
        super().reset()


class ReservedCache(DynamicCache):
    """A `DynamicCache` of `ReservedLayer`s, each reserved for `positions` positions."""

    def __init__(self, positions: int = 0, storage: torch.dtype | None = None) -> None:
        Cache.__init__(self, layer_class_to_replicate=lambda: ReservedLayer(positions, storage))


def reserved_cache(lm: nn.Module, positions: int, storage: torch.dtype | None = None) -> ReservedCache | None:
    """A `ReservedCache` for one `generate` of `lm` (`positions`: the prompt's plus the new tokens'), or None where
    `transformers`' own cache must stay: encoder-decoder LMs, and layers that are not plain full attention (sliding
    windows, linear attention)."""
    if lm.config.is_encoder_decoder:
        return None
    if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=lm.config).layers):
        return None
    return ReservedCache(positions, storage)


def _same_storage(t: torch.Tensor, buffer: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() and t.shape[:-2] == buffer.shape[:-2]
