"""`width.metric: magnitude`: the L2 norm of the weights a unit owns (a data-free baseline).

MLP channel c: its gate and up rows and its down column. Head h: its query rows and its o_proj columns
(key and value rows belong to the whole KV group, whose score sums its heads). Hidden channel c: its
embedding column (and output-embedding column when untied).
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.surgery.width import width_layout
from tasks.width.importance import UnitScores, WidthMetric, head_dim, present_layers, register_width_metric


@register_width_metric
class MagnitudeImportance(WidthMetric):
    name = "magnitude"
    description = "L2 norm of each unit's own weights (no data)"

    def scores(self, model: nn.Module, windows: torch.Tensor, batch_windows: int, settings=None) -> UnitScores:
        layout, size = width_layout(model), head_dim(model)
        result = UnitScores()
        with torch.no_grad():
            for layer in present_layers(model):
                if layer.mlp is not None:
                    parts = (getattr(layer.mlp, layout.gate).weight.pow(2).sum(dim=1),
                             getattr(layer.mlp, layout.up).weight.pow(2).sum(dim=1),
                             getattr(layer.mlp, layout.down).weight.pow(2).sum(dim=0))
                    result.channels[layer.layer_id] = torch.stack(parts).sum(dim=0).double().sqrt().float().cpu()
                if layer.attn is not None:
                    q = getattr(layer.attn, layout.q).weight.pow(2).sum(dim=1).view(-1, size).sum(dim=1)
                    o = getattr(layer.attn, layout.o).weight.pow(2).sum(dim=0).view(-1, size).sum(dim=1)
                    result.heads[layer.layer_id] = (q + o).double().sqrt().float().cpu()
            embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
            hidden = embed.pow(2).sum(dim=0) + (0 if head is embed else head.pow(2).sum(dim=0))
            result.hidden = hidden.double().sqrt().float().cpu()
        return result
