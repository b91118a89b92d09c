"""`width.metric: taylor` (LLM-Pruner, first order, element-wise): the loss change a unit's removal predicts.

For every weight, |w · dL/dw| with the gradient of the calibration language-model loss (summed over
windows); a unit's score sums it over the weights the unit owns: a channel's gate and up rows and down
column, a head's query rows and o_proj columns. A KV group adds its key and value rows when groups are
ranked (the plan sums its heads), so those are spread evenly over the group's heads here.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.surgery.width import width_layout
from tasks.width.importance import UnitScores, WidthMetric, batches, head_dim, present_layers, register_width_metric


@register_width_metric
class TaylorImportance(WidthMetric):
    name = "taylor"
    description = "first-order Taylor |w * grad| summed over each unit's weights (LLM-Pruner)"

    def scores(self, model: nn.Module, windows: torch.Tensor, batch_windows: int) -> UnitScores:
        layout, size = width_layout(model), head_dim(model)
        layers = present_layers(model)
        was_training = model.training
        requires = {p: p.requires_grad for p in model.parameters()}
        model.eval()
        try:
            for p in model.parameters():
                p.requires_grad_(True)
                p.grad = None
            with torch.enable_grad():
                for batch in batches(windows, batch_windows):
                    batch = batch.to(model.device)
                    # Summed over windows, so the score does not depend on how windows are batched.
                    (model(batch, labels=batch).loss * batch.shape[0]).backward()
            return _unit_sums(layers, layout, size)
        finally:
            for p, flag in requires.items():
                p.grad = None
                p.requires_grad_(flag)
            model.train(was_training)


def _saliency(linear: nn.Linear) -> torch.Tensor:
    return (linear.weight.detach() * linear.weight.grad).abs().double()


def _unit_sums(layers, layout, size: int) -> UnitScores:
    result = UnitScores()
    for layer in layers:
        if layer.mlp is not None:
            channels = (_saliency(getattr(layer.mlp, layout.gate)).sum(dim=1)
                        + _saliency(getattr(layer.mlp, layout.up)).sum(dim=1)
                        + _saliency(getattr(layer.mlp, layout.down)).sum(dim=0))
            result.channels[layer.layer_id] = channels.float().cpu()
        if layer.attn is not None:
            q = _saliency(getattr(layer.attn, layout.q)).sum(dim=1).view(-1, size).sum(dim=1)
            o = _saliency(getattr(layer.attn, layout.o)).sum(dim=0).view(-1, size).sum(dim=1)
            kv = (_saliency(getattr(layer.attn, layout.k)).sum(dim=1)
                  + _saliency(getattr(layer.attn, layout.v)).sum(dim=1)).view(-1, size).sum(dim=1)
            group = q.numel() // kv.numel()
            result.heads[layer.layer_id] = (q + o + kv.repeat_interleave(group) / group).float().cpu()
    return result
