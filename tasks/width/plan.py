"""From unit scores to a plan: width strategies, one function each, registered by name (`width.strategy`).

`uniform` (Minitron): each present layer keeps its `intermediate_size` best channels; for attention, the
`num_key_value_heads` KV groups with the largest summed head scores and, inside each, its best
`num_attention_heads / num_key_value_heads` query heads, so grouped-query attention stays consistent.

`per_layer` (LLM-Pruner): the same totals over the layers that are not protected, chosen by one ranking
across those layers, so a layer whose units matter less loses more; every layer keeps at least
`width.floor` of its units. Protected layers keep their full width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from pydantic import Field, model_validator
from torch import nn

from tasks.registry import Registry
from tasks.settings import Settings
from tasks.surgery.width import LayerWidth, WidthError, WidthPlan, dense_widths, width_layout
from tasks.width.importance import UnitScores
from tasks.width.ratios import Width, is_share, nearest, share, smallest_share


class WidthShape(Settings):
    """The widths every layer keeps; a size left out stays as the model has it. Each size is a count or a share
    of the source model's width (`"90%"`), resolved by `resolve_shape` on the model at hand."""

    intermediate_size: Width | None = Field(
        None, description="MLP channels kept in every layer: a count, or a share of the dense model's ('90%').")
    num_key_value_heads: Width | None = Field(
        None, description="KV heads (groups) kept in every layer: a count, or a share of the dense model's.")
    num_attention_heads: Width | None = Field(
        None, description="Query heads kept in every layer: a count, or a share of the dense model's (rounded to a "
        "multiple of the kept KV groups); default: every head of the kept KV groups.")
    hidden_size: Width | None = Field(
        None, description="Hidden (embedding) channels kept, the same everywhere: a count, or a share of the dense "
        "model's.")

    @model_validator(mode="after")
    def _some_size(self) -> "WidthShape":
        if all(v is None for v in self.model_dump().values()):
            raise ValueError("width.shape needs at least one of intermediate_size, num_key_value_heads, "
                             "num_attention_heads, hidden_size")
        return self

    def shares(self) -> dict[str, str]:
        """The sizes given as shares of the dense width (field -> `"90%"`)."""
        return {name: value for name, value in self.model_dump(exclude_none=True).items() if is_share(value)}


# Field -> (key of `dense_widths`, what its units are called in a refusal).
_SIZES = {"intermediate_size": ("channels", "MLP channels"), "num_key_value_heads": ("kv_heads", "KV heads"),
          "num_attention_heads": ("heads", "query heads"), "hidden_size": ("hidden", "hidden channels")}


def _count(shape: WidthShape, name: str, dense: dict[str, int], step: int = 1) -> int | None:
    """One size as a count: a share rounds to the nearest multiple of `step`; nothing is refused yet but zero."""
    value = getattr(shape, name)
    if not is_share(value):
        return value
    key, units = _SIZES[name]
    count = nearest(share(value) * dense[key], step)
    if count == 0:
        multiple = "" if step == 1 else f" (a multiple of the {step} kept KV groups)"
        raise WidthError(f"width.shape.{name} '{value}' of the model's {dense[key]} {units} resolves to 0{multiple}; "
                         f"give at least {smallest_share(step, dense[key])} or a count")
    return count


def resolve_shape(shape: WidthShape, dense: dict[str, int]) -> WidthShape:
    """The shape in counts on a model of these dense widths (`dense_widths`), or a refusal naming the field, the
    model's size and what the field resolves to. A share keeps the nearest whole number of units (halves up);
    query heads, the nearest multiple of the kept KV groups, since every kept group keeps as many."""
    group = dense["heads"] // dense["kv_heads"]
    sizes = {name: _count(shape, name, dense) for name in ("intermediate_size", "num_key_value_heads", "hidden_size")}
    kv = sizes["num_key_value_heads"] or dense["kv_heads"]
    if kv > dense["kv_heads"]:
        raise WidthError(f"width.shape.num_key_value_heads {kv} is above the model's {dense['kv_heads']}")
    heads = _count(shape, "num_attention_heads", dense, step=kv)
    if is_share(shape.num_attention_heads) and heads > kv * group:
        raise WidthError(f"width.shape.num_attention_heads '{shape.num_attention_heads}' of the model's "
                         f"{dense['heads']} query heads resolves to {heads}, but the kept KV groups ({kv}) hold at "
                         f"most {kv * group}; give at most {100 * kv * group / dense['heads']:.4g}% or leave "
                         "num_attention_heads out (every head of the kept groups)")
    if (heads or 0) > dense["heads"]:
        raise WidthError(f"width.shape.num_attention_heads {heads} is above the model's {dense['heads']}")
    if heads is not None and (heads % kv or heads // kv > group):
        raise WidthError(f"width.shape.num_attention_heads {heads} must be a multiple of num_key_value_heads {kv} "
                         f"and at most {kv * group} (each KV head serves at most {group} query heads here)")
    for name in ("intermediate_size", "hidden_size"):
        key = _SIZES[name][0]
        if sizes[name] is not None and sizes[name] > dense[key]:
            raise WidthError(f"width.shape.{name} {sizes[name]} is above the model's {dense[key]}")
    return WidthShape(**sizes, num_attention_heads=heads)


def share_record(shape: WidthShape, dense: dict[str, int]) -> dict[str, dict]:
    """Per size given as a share: the share, the model's width it is a share of, and the count it resolves to."""
    counts = resolve_shape(shape, dense)
    return {name: {"share": value, "of": dense[_SIZES[name][0]], "count": getattr(counts, name)}
            for name, value in shape.shares().items()}


def resolved_heads(shape: WidthShape, dense: dict[str, int]) -> tuple[int, int]:
    """(query heads, KV heads) the shape keeps on this model, the defaults filled in."""
    counts = resolve_shape(shape, dense)
    kv = counts.num_key_value_heads or dense["kv_heads"]
    return counts.num_attention_heads or kv * dense["heads"] // dense["kv_heads"], kv


def hidden_plan(scores: UnitScores, shape: WidthShape, dense: dict[str, int]) -> tuple[int, ...] | None:
    """The hidden channels every layer keeps (one ranking: the residual stream is shared), or None."""
    if shape.hidden_size in (None, dense["hidden"]):
        return None
    if scores.hidden is None:
        raise WidthError("width.shape.hidden_size: this width metric scores no hidden channels")
    return tuple(_top(scores.hidden, shape.hidden_size))


def _top(scores: torch.Tensor, k: int) -> list[int]:
    # Ties go to the lower index, so the plan does not depend on the sort's stability.
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


@dataclass(frozen=True)
class Calibration:
    """What a strategy that reads activations or trains gets: the calibration windows, the model's folder
    (its tokenizer) and a folder for resumable state."""

    windows: torch.Tensor
    batch_windows: int
    on_unit: Callable[..., None] | None = None  # (done, in all[, detail]): units or steps, for progress
    model_path: str | None = None
    state_dir: Path | None = None


@dataclass
class PlanOutcome:
    """A plan, and what a reconstructing strategy adds: new weights for the projections that read the pruned
    units (`layers.N.mlp` / `layers.N.attn` -> the sliced weight) and, per such unit, its errors by stage."""

    plan: WidthPlan
    # `layers.N.mlp` / `layers.N.attn` -> its output projection's new weight, or a parameter name of the
    # pruned model -> its new value (a strategy that trained the whole model).
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    scores: UnitScores | None = None  # the strategy's own unit scores, when it ranks units itself
    blocks: tuple[str, ...] = ()  # whole layers the strategy removes besides the depth search's
    trace: list[dict] = field(default_factory=list)  # per training step: loss, expected sizes, gaps


PlanBuilder = Callable[..., "WidthPlan | PlanOutcome"]


@dataclass(frozen=True)
class WidthStrategy:
    """A registered strategy: `build(model, scores, shape, **settings, calibration=...)`; `settings` is its
    section class (`width.<name>`), if any; `scores_units` False: it ranks units itself (no width.metric).
    Preflight reads `whole_layers` (it needs every present layer whole: no depth search that removes halves)
    and calls `check(settings, config)`, which returns why the model's config cannot take the settings."""

    build: PlanBuilder
    settings: type[Settings] | None = None
    scores_units: bool = True
    description: str = ""
    prunes_hidden: bool = True  # False: a shape with hidden_size is refused when the spec is read
    whole_layers: bool = False
    check: Callable[[Settings | None, object], str | None] | None = None

    def outcome(self, model: nn.Module, scores: UnitScores | None, shape: "WidthShape",
                settings: Settings | None, calibration: Calibration) -> PlanOutcome:
        given = {} if self.settings is None else (settings or self.settings()).model_dump()
        # A strategy (a plugin's too) is given counts, never shares.
        shape = resolve_shape(shape, dense_widths(model))
        result = self.build(model, scores, shape, calibration=calibration, **given)
        return result if isinstance(result, PlanOutcome) else PlanOutcome(result)


WIDTH_STRATEGIES: Registry[WidthStrategy] = Registry("width strategy", unknown=WidthError)


def register_width_strategy(name: str, settings: type[Settings] | None = None, **needs) -> Callable[[PlanBuilder],
                                                                                                   PlanBuilder]:
    """`needs`: the other fields of `WidthStrategy` (scores_units, description, prunes_hidden, whole_layers,
    check)."""
    def register(fn: PlanBuilder) -> PlanBuilder:
        WIDTH_STRATEGIES.add(name, WidthStrategy(fn, settings, **needs), origin=fn)
        return fn
    return register


def refuse_unprunable_heads(model: nn.Module, heads: int, kv: int) -> None:
    """A strategy asked to change the heads of a family that cannot lose them exactly (OLMo-2), before any work."""
    dense = dense_widths(model)
    if (heads, kv) != (dense["heads"], dense["kv_heads"]) and not width_layout(model).heads:
        raise WidthError(f"width.shape: model_type '{model.config.model_type}' normalises queries and keys over "
                         "all heads, so its heads cannot be pruned exactly; leave num_attention_heads and "
                         "num_key_value_heads out")


def width_strategy_settings() -> dict[str, type[Settings]]:
    """The width strategies that take settings, and their section classes (`width.<strategy>`)."""
    return {name: s.settings for name, s in WIDTH_STRATEGIES.items() if s.settings is not None}


@register_width_strategy("uniform", description="the shape in every layer (Minitron)")
def uniform_plan(model: nn.Module, scores: UnitScores, shape: WidthShape, **_context) -> WidthPlan:
    dense = dense_widths(model)
    shape = resolve_shape(shape, dense)
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
    return WidthPlan(layers=layers, hidden=hidden_plan(scores, shape, dense))


def _ranked_across(scores: dict[int, torch.Tensor], keep_each: int, total: int, floor: int) -> dict[int, list[int]]:
    """Per layer, the indices of its units among the `total` best across all layers (`keep_each` per layer on
    average), every layer keeping at least its `floor` best; ties go to the lower layer, then index."""
    kept = {lid: _top(values, floor) for lid, values in scores.items()}
    reserved = {lid: set(indices) for lid, indices in kept.items()}
    pool = sorted((-float(values[i]), lid, i) for lid, values in scores.items() for i in range(values.numel())
                  if i not in reserved[lid])
    for _, lid, i in pool[:max(0, total - sum(len(v) for v in kept.values()))]:
        kept[lid].append(i)
    return {lid: sorted(indices) for lid, indices in kept.items()}


class PerLayerSettings(Settings):
    """`width.per_layer`: how far the one ranking across layers may go."""

    floor: float = Field(0.1, gt=0.0, le=1.0, description="Share of its dense units every layer keeps at least.")
    protect_first: int = Field(0, ge=0, description="The first N present layers keep their full width.")
    protect_last: int = Field(0, ge=0, description="The last N present layers keep their full width.")


@register_width_strategy("per_layer", PerLayerSettings,
                         description="the shape's totals by one ranking across layers (LLM-Pruner)")
def per_layer_plan(model: nn.Module, scores: UnitScores, shape: WidthShape, floor: float = 0.1,
                   protect_first: int = 0, protect_last: int = 0, **_context) -> WidthPlan:
    dense = dense_widths(model)
    shape = resolve_shape(shape, dense)
    heads, kv = resolved_heads(shape, dense)
    group = dense["heads"] // dense["kv_heads"]
    present = sorted(set(scores.heads) | set(scores.channels))
    protected = set(present[:protect_first]) | set(present[len(present) - protect_last:] if protect_last else [])
    layers: dict[int, dict[str, tuple[int, ...]]] = {}
    free = {lid: v for lid, v in scores.channels.items() if lid not in protected}
    if free and shape.intermediate_size not in (None, dense["channels"]):
        least = max(1, math.ceil(floor * dense["channels"]))
        for lid, kept in _ranked_across(free, shape.intermediate_size, shape.intermediate_size * len(free),
                                        least).items():
            layers.setdefault(lid, {})["channels"] = tuple(kept)
    free = {lid: v.view(-1, group) for lid, v in scores.heads.items() if lid not in protected}
    if free and (heads, kv) != (dense["heads"], dense["kv_heads"]):
        least = max(1, math.ceil(floor * dense["kv_heads"]))
        groups = _ranked_across({lid: v.sum(dim=1) for lid, v in free.items()}, kv, kv * len(free), least)
        for lid, kept in groups.items():
            layers.setdefault(lid, {}).update(
                kv_heads=tuple(kept), heads=tuple(g * group + h for g in kept for h in _top(free[lid][g], heads // kv)))
    return WidthPlan(layers={lid: LayerWidth(**kept) for lid, kept in layers.items()
                             if any(len(v) < dense[k] for k, v in kept.items())},
                     hidden=hidden_plan(scores, shape, dense))
