"""Shapes that meet a parameter budget (Minitron's architecture search, scaled down).

For every way of keeping attention (KV groups from all down to one, query heads per group from all down to
one), the MLP keeps the most channels, on multiples of `round_to`, that still removes the budget; a layer's
units cost what their weights hold, counted from the model itself. The candidates that keep the most
attention come first; the caller scores a few by calibration perplexity and keeps the best.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from torch import nn

from tasks.surgery import architecture_of, layer_ids, total_params
from tasks.surgery.removed import is_removed
from tasks.surgery.width import WidthError, dense_widths, width_layout
from tasks.width.plan import WidthShape


@dataclass(frozen=True)
class UnitCosts:
    """Parameters one query head, one KV head and one MLP channel hold, summed over the present layers."""

    head: int
    kv_head: int
    channel: int


def _per_unit(*linears_and_axes: tuple[nn.Linear, int], units: int) -> int:
    total = 0
    for linear, axis in linears_and_axes:
        total += linear.weight.numel()
        if linear.bias is not None and axis == 0:  # a bias follows the output rows
            total += linear.bias.numel()
    return total // units


def unit_costs(model: nn.Module) -> UnitCosts:
    adapter, layout, dense = architecture_of(model), width_layout(model), dense_widths(model)
    head = kv_head = channel = 0
    for _lid, layer in zip(layer_ids(model), adapter.decoder_layers(model)):
        attn, mlp = getattr(layer, adapter.attn.slot), getattr(layer, adapter.mlp.slot)
        if not is_removed(attn):
            head += _per_unit((getattr(attn, layout.q), 0), (getattr(attn, layout.o), 1), units=dense["heads"])
            kv_head += _per_unit((getattr(attn, layout.k), 0), (getattr(attn, layout.v), 0), units=dense["kv_heads"])
        if not is_removed(mlp):
            channel += _per_unit((getattr(mlp, layout.gate), 0), (getattr(mlp, layout.up), 0),
                                 (getattr(mlp, layout.down), 1), units=dense["channels"])
    return UnitCosts(head, kv_head, channel)


def shapes_for_ratio(model: nn.Module, dense_params: int, ratio: float, round_to: int, limit: int) -> list[WidthShape]:
    """Up to `limit` uniform shapes that bring the parameters removed (counted against `dense_params`, the
    model before any pruning) to at least `ratio`, keeping as much attention as possible first."""
    dense, costs, now = dense_widths(model), unit_costs(model), total_params(model)
    need = ratio * dense_params - (dense_params - now)
    if need <= 0:
        raise WidthError(f"width.params_ratio {ratio}: the depth search already removed "
                         f"{1 - now / dense_params:.3f} of the parameters; give a larger ratio")
    group = dense["heads"] // dense["kv_heads"]
    # A family whose heads cannot be sliced (OLMo-2) meets the budget with channels alone.
    if width_layout(model).heads:
        attention_shapes = itertools.product(range(dense["kv_heads"], 0, -1), range(group, 0, -1))
    else:
        attention_shapes = [(dense["kv_heads"], group)]
    candidates = []
    for kv, per_group in attention_shapes:
        heads = kv * per_group
        attention = (dense["heads"] - heads) * costs.head + (dense["kv_heads"] - kv) * costs.kv_head
        if attention >= need or costs.channel == 0:
            continue  # attention alone would overshoot: a shape with fewer heads removed covers it
        kept = dense["channels"] - math.ceil((need - attention) / costs.channel)
        kept -= kept % round_to
        if kept >= round_to:
            candidates.append((attention, WidthShape(intermediate_size=kept, num_key_value_heads=kv,
                                                     num_attention_heads=heads)))
    if not candidates:
        raise WidthError(f"width.params_ratio {ratio} cannot be met with MLP channels on multiples of "
                         f"{round_to} (width.round_to); give a smaller ratio or round_to")
    return [shape for _, shape in sorted(candidates, key=lambda c: c[0])[:limit]]
