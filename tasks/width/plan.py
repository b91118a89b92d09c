"""From unit scores to a plan of one target shape in every layer (Minitron's uniform width pruning).

Each present layer keeps its `intermediate_size` best channels; for attention, the `num_key_value_heads`
KV groups with the largest summed head scores and, inside each, its best `num_attention_heads /
num_key_value_heads` query heads, so grouped-query attention stays consistent.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import nn

import torch

from tasks.settings import Settings
from tasks.surgery.width import LayerWidth, WidthError, WidthPlan, dense_widths
from tasks.width.importance import UnitScores


class WidthShape(Settings):
    """The widths every layer keeps; a size left out stays as the model has it."""

    intermediate_size: int | None = Field(None, ge=1, description="MLP channels kept in every layer.")
    num_key_value_heads: int | None = Field(None, ge=1, description="KV heads (groups) kept in every layer.")
    num_attention_heads: int | None = Field(
        None, ge=1, description="Query heads kept in every layer; default: every head of the kept KV groups.")

    @model_validator(mode="after")
    def _some_size(self) -> "WidthShape":
        if self.intermediate_size is None and self.num_key_value_heads is None and self.num_attention_heads is None:
            raise ValueError("width.shape needs at least one of intermediate_size, num_key_value_heads, "
                             "num_attention_heads")
        return self


def resolved_heads(shape: WidthShape, dense: dict[str, int]) -> tuple[int, int]:
    """(query heads, KV heads) the shape asks of this model, or a refusal naming the field and the limits."""
    group = dense["heads"] // dense["kv_heads"]
    kv = shape.num_key_value_heads or dense["kv_heads"]
    if kv > dense["kv_heads"]:
        raise WidthError(f"width.shape.num_key_value_heads {kv} is above the model's {dense['kv_heads']}")
    heads = shape.num_attention_heads or kv * group
    if heads > dense["heads"]:
        raise WidthError(f"width.shape.num_attention_heads {heads} is above the model's {dense['heads']}")
    if heads % kv or heads // kv > group:
        raise WidthError(f"width.shape.num_attention_heads {heads} must be a multiple of num_key_value_heads {kv} "
                         f"and at most {kv * group} (each KV head serves at most {group} query heads here)")
    return heads, kv


def check_shape(shape: WidthShape, dense: dict[str, int]) -> None:
    resolved_heads(shape, dense)
    if shape.intermediate_size is not None and shape.intermediate_size > dense["channels"]:
        raise WidthError(f"width.shape.intermediate_size {shape.intermediate_size} is above the model's "
                         f"{dense['channels']}")


def _top(scores: torch.Tensor, k: int) -> list[int]:
    # Ties go to the lower index, so the plan does not depend on the sort's stability.
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def uniform_plan(model: nn.Module, scores: UnitScores, shape: WidthShape) -> WidthPlan:
    dense = dense_widths(model)
    check_shape(shape, dense)
    heads, kv = resolved_heads(shape, dense)
    group = dense["heads"] // dense["kv_heads"]
    layers: dict[int, LayerWidth] = {}
    for lid in sorted(set(scores.heads) | set(scores.channels)):
        kept: dict[str, tuple[int, ...]] = {}
        if lid in scores.channels and shape.intermediate_size not in (None, dense["channels"]):
            kept["channels"] = tuple(_top(scores.channels[lid], shape.intermediate_size))
        if lid in scores.heads and (heads, kv) != (dense["heads"], dense["kv_heads"]):
            per_head = scores.heads[lid].view(-1, group)
            groups = _top(per_head.sum(dim=1), kv)
            kept["kv_heads"] = tuple(groups)
            kept["heads"] = tuple(g * group + h for g in groups for h in _top(per_head[g], heads // kv))
        if kept:
            layers[lid] = LayerWidth(**kept)
    return WidthPlan(layers=layers)
