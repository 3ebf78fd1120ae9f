"""The language model's key/value cache during generation: written in place into buffers reserved for it.

`transformers`' `DynamicLayer` concatenates each step's keys and values onto the whole cache: a new tensor per step
and layer, so for a batch of prompts the cache is copied every step and the freed copies fragment the heap (with
OPT-2.7B at 32 prompts of 62 positions, the process's peak grows by more than the cache itself). `ReservedLayer`
writes each step's positions into buffers reserved for the whole generation (the prompt's positions plus the new
tokens'), growing by half where they fill up (a chat's later turns); attention reads views onto them.

`storage` (dtype_policy.Placement.kv_storage) narrows the cache; attention reads it widened back to the arithmetic's
dtype, each position rounded once when written, the same in any batch:
- bf16 halves an fp32 cache;
- int8 quarters it (plus 4 bytes per position and head): each head's key (and value) at each position is quantized
  symmetrically, absmax / 127, and its fp32 scale is stored in the 4 bytes after the row's int8 values
  (`_Int8Rows`). The stored tensor stays one (batch, heads, positions, row) tensor, so `transformers`' crop, beam
  reordering and batch selection move keys and scales together.
Without it the keys and values that attention reads are the numbers `transformers`' cache holds.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from .quant import largest_magnitudes

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
            self._grow((key_states, value_states), end)
        for buffer, new in zip(self._buffers, (key_states, value_states)):
            self._rows.write(buffer[..., start:end, :], new)
        self.keys, self.values = (b[..., :end, :] for b in self._buffers)
        k, v = key_states.shape[-1], value_states.shape[-1]
        return self._rows.read(self.keys, self.arithmetic, k), self._rows.read(self.values, self.arithmetic, v)

    @property
    def _rows(self) -> type[_Rows]:
        return _Int8Rows if self.storage == torch.int8 else _Rows

    def _grow(self, new: tuple[torch.Tensor, torch.Tensor], end: int) -> None:
        """New buffers for at least `end` positions, shaped like this step's keys and values (a value head may be
        another size than a key head), holding the positions cached so far."""
        held = self._buffers[0].shape[-2] if self._buffers is not None else 0
        size = max(end, self.reserve, -(-held * 3 // (2 * GROWTH_STEP)) * GROWTH_STEP)
        n = self.get_seq_length()
        buffers = []
        for kept, like in zip((self.keys, self.values), new):
            width, dtype = self._rows.row(like.shape[-1], self.storage or like.dtype)
            buffer = like.new_empty((*like.shape[:-2], size, width), dtype=dtype)
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


class _Rows:
    """Each head's key or value at a position stored as it is, or cast to the storage dtype (bf16)."""

    @staticmethod
    def row(width: int, storage: torch.dtype) -> tuple[int, torch.dtype]:
        return width, storage

    @staticmethod
    def write(into: torch.Tensor, new: torch.Tensor) -> None:
        into.copy_(new)

    @staticmethod
    def read(stored: torch.Tensor, dtype: torch.dtype, width: int) -> torch.Tensor:
        return stored if stored.dtype == dtype else stored.to(dtype)


class _Int8Rows(_Rows):
    """Each row as int8 values q = round(x / s), s = absmax(x) / 127, padded to a multiple of 4 bytes, then the 4
    bytes of its fp32 scale."""

    @staticmethod
    def row(width: int, storage: torch.dtype) -> tuple[int, torch.dtype]:
        return -(-width // 4) * 4 + 4, torch.int8

    @staticmethod
    def write(into: torch.Tensor, new: torch.Tensor) -> None:
        x = new.float()
        scale = largest_magnitudes(x).clamp_(min=torch.finfo(torch.float32).tiny) / 127
        into[..., : x.shape[-1]].copy_(torch.round(x / scale))
        into[..., -4:].view(torch.float32).copy_(scale)

    @staticmethod
    def read(stored: torch.Tensor, dtype: torch.dtype, width: int) -> torch.Tensor:
        wide = stored[..., :width] * stored[..., -4:].view(torch.float32)  # one pass: int8 x fp32 gives fp32
        return wide if dtype == torch.float32 else wide.to(dtype)


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
