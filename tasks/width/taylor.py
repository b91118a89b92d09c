"""`width.metric: taylor` (LLM-Pruner): the loss change a unit's removal predicts.

For every weight, w · dL/dw with the gradient of the calibration language-model loss (summed over
windows), minus 1/2 w² F with F the squared per-window gradients summed (Fisher) at second order;
`element` sums |.| over the weights a unit owns, `vector` takes |.| of their sum. A unit owns: a
channel's gate and up rows and down column, a head's query rows and o_proj columns. A KV group adds its key and value rows when groups are
ranked (the plan sums its heads), so those are spread evenly over the group's heads here. A hidden channel
sums every weight that reads or writes it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tasks.settings import Settings

from tasks.surgery.width import width_layout
from tasks.width.importance import (UnitScores, WidthMetric, batches, head_dim, present_layers, register_width_metric,
                                   residual_norms)


class TaylorSettings(Settings):
    """`width.taylor`: LLM-Pruner's variants of the estimate."""

    variant: Literal["element", "vector"] = Field(
        "element", description="element: sum of |w·g| over a unit's weights; vector: |sum of w·g| over them.")
    order: Literal[1, 2] = Field(
        1, description="2 adds LLM-Pruner's second-order term, -1/2 w² times the squared gradients summed over "
                       "windows (a Fisher estimate of the Hessian's diagonal); needs one window per backward.")


@register_width_metric
class TaylorImportance(WidthMetric):
    name = "taylor"
    description = "Taylor estimate of the loss change per unit (LLM-Pruner: element or vector, first or second order)"
    settings = TaylorSettings

    def scores(self, model: nn.Module, windows: torch.Tensor, batch_windows: int, settings=None) -> UnitScores:
        settings = settings or TaylorSettings()
        layout, size = width_layout(model), head_dim(model)
        layers = present_layers(model)
        was_training = model.training
        requires = {p: p.requires_grad for p in model.parameters()}
        model.eval()
        try:
            for p in model.parameters():
                p.requires_grad_(True)
                p.grad = None
            fisher = _gradients(model, windows, 1 if settings.order == 2 else batch_windows, settings.order == 2)
            saliency = _Saliency(settings, fisher)
            result = _unit_sums(layers, layout, size, saliency)
            result.hidden = _hidden_sums(model, layers, layout, saliency)
            return result
        finally:
            for p, flag in requires.items():
                p.grad = None
                p.requires_grad_(flag)
            model.train(was_training)


def _gradients(model: nn.Module, windows: torch.Tensor, batch_windows: int, squares: bool) -> dict[int, torch.Tensor]:
    """Leaves the calibration loss's gradient, summed over windows, in every `.grad`; with `squares`, also
    returns each parameter's sum over windows of its squared per-window gradient."""
    fisher: dict[int, torch.Tensor] = {}
    with torch.enable_grad():
        for batch in batches(windows, batch_windows):
            batch = batch.to(model.device)
            before = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None} if squares else {}
            # Summed over windows, so the score does not depend on how windows are batched.
            (model(batch, labels=batch).loss * batch.shape[0]).backward()
            if squares:
                for p in model.parameters():
                    step = p.grad - before.get(id(p), 0)
                    fisher[id(p)] = fisher.get(id(p), 0) + step.double().pow(2)
    return fisher


class _Saliency:
    """Per weight, the Taylor estimate w·g (minus 1/2 w² F at second order); `element` takes |.| per weight,
    `vector` after the unit's sum (`unit_sum`)."""

    def __init__(self, settings: TaylorSettings, fisher: dict[int, torch.Tensor]):
        self.vector, self.fisher = settings.variant == "vector", fisher

    def __call__(self, module: nn.Module) -> torch.Tensor:
        w = module.weight.detach().double()
        value = w * module.weight.grad.double()
        if id(module.weight) in self.fisher:
            value = value - 0.5 * w.pow(2) * self.fisher[id(module.weight)]
        return value if self.vector else value.abs()

    def total(self, summed: torch.Tensor) -> torch.Tensor:
        return summed.abs() if self.vector else summed


def _unit_sums(layers, layout, size: int, saliency: _Saliency) -> UnitScores:
    result = UnitScores()
    for layer in layers:
        if layer.mlp is not None:
            channels = (saliency(getattr(layer.mlp, layout.gate)).sum(dim=1)
                        + saliency(getattr(layer.mlp, layout.up)).sum(dim=1)
                        + saliency(getattr(layer.mlp, layout.down)).sum(dim=0))
            result.channels[layer.layer_id] = saliency.total(channels).float().cpu()
        if layer.attn is not None:
            q = saliency(getattr(layer.attn, layout.q)).sum(dim=1).view(-1, size).sum(dim=1)
            o = saliency(getattr(layer.attn, layout.o)).sum(dim=0).view(-1, size).sum(dim=1)
            kv = (saliency(getattr(layer.attn, layout.k)).sum(dim=1)
                  + saliency(getattr(layer.attn, layout.v)).sum(dim=1)).view(-1, size).sum(dim=1)
            group = q.numel() // kv.numel()
            result.heads[layer.layer_id] = saliency.total(q + o + kv.repeat_interleave(group) / group).float().cpu()
    return result


def _hidden_sums(model: nn.Module, layers, layout, saliency: _Saliency) -> torch.Tensor:
    """|w · g| over every weight that touches a hidden channel: the embedding columns (and the output
    embedding's when untied), every residual norm's entry, the columns of what reads the residual stream and
    the rows of what writes it."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    total = saliency(embed).sum(dim=0)
    if head.weight is not embed.weight:
        total += saliency(head).sum(dim=0)
    for norm in residual_norms(model):
        total += saliency(norm)
    for layer in layers:
        for part, module in (("attn", layer.attn), ("mlp", layer.mlp)):
            if module is None:
                continue
            reads, writes = layout.stream_io(part)
            for name in reads:
                total += saliency(getattr(module, name)).sum(dim=0)
            total += saliency(getattr(module, writes)).sum(dim=1)
    return saliency.total(total).float().cpu()
