"""`width.metric: taylor` (LLM-Pruner, first order, element-wise): the loss change a unit's removal predicts.

For every weight, |w · dL/dw| with the gradient of the calibration language-model loss (summed over
windows); a unit's score sums it over the weights the unit owns: a channel's gate and up rows and down
column, a head's query rows and o_proj columns. A KV group adds its key and value rows when groups are
ranked (the plan sums its heads), so those are spread evenly over the group's heads here. A hidden channel
sums every weight that reads or writes it.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.surgery.width import width_layout
from tasks.width.importance import (UnitScores, WidthMetric, batches, head_dim, present_layers, register_width_metric,
                                   residual_norms)


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
            result = _unit_sums(layers, layout, size)
            result.hidden = _hidden_sums(model, layers, layout)
            return result
        finally:
            for p, flag in requires.items():
                p.grad = None
                p.requires_grad_(flag)
            model.train(was_training)


def _saliency(module: nn.Module) -> torch.Tensor:
    return (module.weight.detach() * module.weight.grad).abs().double()


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


def _hidden_sums(model: nn.Module, layers, layout) -> torch.Tensor:
    """|w · g| over every weight that touches a hidden channel: the embedding columns (and the output
    embedding's when untied), every residual norm's entry, the columns of what reads the residual stream and
    the rows of what writes it."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    total = _saliency(embed).sum(dim=0)
    if head.weight is not embed.weight:
        total += _saliency(head).sum(dim=0)
    for norm in residual_norms(model):
        total += _saliency(norm)
    for layer in layers:
        for module, reads, writes in ((layer.attn, (layout.q, layout.k, layout.v), layout.o),
                                      (layer.mlp, (layout.gate, layout.up), layout.down)):
            if module is None:
                continue
            for name in reads:
                total += _saliency(getattr(module, name)).sum(dim=0)
            total += _saliency(getattr(module, writes)).sum(dim=1)
    return total.float().cpu()
