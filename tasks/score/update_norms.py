"""The static metrics of Siddiqui et al. ("A deeper look at depth pruning of LLMs", 2024): the size
of a block's update y - x relative to its input x (L1 or L2 per token), and the cosine distance
1 - cos(x, y). Averaged over tokens; the smallest update goes first. Any granularity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.score.base import register_metric
from tasks.score.states import BlockStateMetric


@register_metric
class RelativeL1(BlockStateMetric):
    name = "relative_l1"
    remove = "lowest"

    def statistic(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return (outputs - inputs).abs().sum(dim=-1) / inputs.abs().sum(dim=-1)


@register_metric
class RelativeL2(BlockStateMetric):
    name = "relative_l2"
    remove = "lowest"

    def statistic(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(outputs - inputs, dim=-1) / torch.linalg.vector_norm(inputs, dim=-1)


@register_metric
class Cosine(BlockStateMetric):
    name = "cosine"
    remove = "lowest"

    def statistic(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return 1.0 - F.cosine_similarity(inputs, outputs, dim=-1)
