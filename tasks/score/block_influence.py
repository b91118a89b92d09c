"""ShortGPT's Block Influence (Men et al., 2024): 1 - mean cosine between a layer's input and output.

A layer that barely turns the residual stream changes little and goes first. Whole layers only: the
sub-block version of the same quantity is `similarity` (LLM-Drop) or `cosine` (Siddiqui et al.).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.score.base import register_metric
from tasks.score.states import BlockStateMetric


@register_metric
class BlockInfluence(BlockStateMetric):
    name = "block_influence"
    remove = "lowest"
    granularities = frozenset({"layer"})

    def statistic(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return 1.0 - F.cosine_similarity(inputs, outputs, dim=-1)
