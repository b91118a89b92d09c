"""Parameter-free stand-ins for removed sub-blocks: the layer then adds zero to the residual stream."""

from __future__ import annotations

import torch
from torch import nn


class RemovedAttention(nn.Module):
    """Takes an attention module's place; keeps no weights and writes nothing to a KV cache."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def is_removed(module: nn.Module) -> bool:
    return isinstance(module, (RemovedAttention, RemovedMLP))
