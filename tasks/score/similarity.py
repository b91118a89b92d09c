"""LLM-Drop's similarity (He et al., "What Matters in Transformers?"): cosine between a sub-block's
residual input X and X + sub-block(X), averaged over tokens. The most similar (highest) goes first.

Attention and MLP sub-blocks only (Attention Drop, MLP Drop, and Joint Drop at `sublayer`); the
whole-layer version is ShortGPT's `block_influence`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.score.base import register_metric
from tasks.score.states import BlockStateMetric


@register_metric
class Similarity(BlockStateMetric):
    name = "similarity"
    remove = "highest"
    granularities = frozenset({"attn", "mlp", "sublayer"})

    def statistic(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(inputs, outputs, dim=-1)
