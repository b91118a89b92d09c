"""Parameter-free stand-ins for removed sub-blocks: the layer then adds zero to the residual stream.

This module needs only torch: pruneflow's in-memory models use it, and checkpoints whose modeling code
keeps the family's own layers carry a copy of it (hence the relative import)."""

from __future__ import annotations

import torch
from torch import nn

from .kv_cache import layer_cache


class RemovedAttention(nn.Module):
    """Takes an attention module's place; keeps no weights and outputs zeros.

    It still writes a one-channel zero placeholder to its KV-cache slot. Transformers reads the cached
    length (positions, mask sizes) from the first attention layer's slot, so a slot that is never written
    would say 0 tokens and break cached decoding when that layer's attention was removed. The placeholder
    holds batch x tokens numbers (not heads x head_dim of them) and goes through the public `update`, so
    every cache type (dynamic, sliding, static, beam reordering) keeps its own length bookkeeping.

    A checkpoint whose cache has slots for kept attention only passes `holds_length=False`, except for
    one stand-in when no attention is kept at all (something must still count the cached tokens).
    """

    def __init__(self, layer_idx: int, holds_length: bool = True):
        super().__init__()
        self.layer_idx = layer_idx
        self.holds_length = holds_length

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        cache = layer_cache(kwargs)
        if cache is not None and self.holds_length:
            _hold_length(cache, hidden_states, self.layer_idx)
        return torch.zeros_like(hidden_states), None


def _hold_length(cache, hidden_states: torch.Tensor, layer_idx: int) -> None:
    # Encoder-decoder caches keep decoder self-attention in a sub-cache.
    cache = getattr(cache, "self_attention_cache", cache)
    batch, tokens = hidden_states.shape[:2]
    placeholder = hidden_states.new_zeros(batch, 1, tokens, 1)
    cache.update(placeholder, placeholder, layer_idx)


class RemovedMLP(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def is_removed(module: nn.Module) -> bool:
    return isinstance(module, (RemovedAttention, RemovedMLP))
