"""Stage `width`: score the heads and channels of what the depth search left, and plan a target shape (given,
or the best of a few that meet a parameter budget).

Runs after `search` (whose blocks are removed first, so depth and width make one plan) and before
`prune`, which applies both. The plan and every unit's score go to the catalog.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from pydantic import Field, field_validator, model_validator

from tasks.load import ModelSpec, open_model
from tasks.refs import ArtifactRef
from tasks.settings import Settings, misplaced_sections, with_method_sections
from tasks.residual import perplexity
from tasks.surgery import remove_blocks, total_params
from tasks.surgery.width import WidthPlan, apply_width, dense_widths, layer_table
from tasks.width import WIDTH_METRICS, WIDTH_STRATEGIES, PerLayerSettings, WidthShape
from tasks.width.importance import width_metric_settings
from tasks.width.shapes import shapes_for_ratio
from tasks.windows import load_windows


def _names_of(registry):
    def add_enum(schema: dict) -> None:  # the parameter form offers the registered names
        schema["enum"] = registry.names()
    return add_enum


class WidthSpec(Settings):
    """The `width` section: which units to keep in every layer after the depth search."""

    metric: str = Field("activation", description="Unit importance: a registered width metric (activation: "
                        "Minitron; taylor: LLM-Pruner; magnitude: weight norms).",
                        json_schema_extra=_names_of(WIDTH_METRICS))
    strategy: str = Field("uniform", description="How the plan is chosen: uniform (the shape in every layer, "
                          "Minitron) or per_layer (the shape's totals by one ranking across layers, LLM-Pruner).",
                          json_schema_extra=_names_of(WIDTH_STRATEGIES))
    shape: WidthShape | None = Field(
        None, description="The widths every layer keeps (uniform), or keeps on average (per_layer).")
    params_ratio: float | None = Field(
        None, gt=0.0, lt=1.0, description="Instead of a shape: the share of the model's parameters removed in all "
        "(depth and width); the best of a few shapes that meet it, by calibration perplexity, is kept.")
    round_to: int = Field(64, ge=1, description="With params_ratio: MLP widths on multiples of this.")
    candidates: int = Field(4, ge=1, le=64, description="With params_ratio: how many shapes are scored.")
    per_layer: PerLayerSettings | None = Field(None, description="Settings of strategy per_layer (only with it).")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        WIDTH_METRICS.lookup(value)  # a UserError, so a ValueError: pydantic reports it under width.metric
        return value

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        WIDTH_STRATEGIES.lookup(value)
        return value

    @model_validator(mode="after")
    def _one_target(self) -> "WidthSpec":
        if (self.shape is None) == (self.params_ratio is None):
            raise ValueError("width needs exactly one of shape (the widths kept) and params_ratio (a budget)")
        return self

    @model_validator(mode="after")
    def _settings_of_the_strategy(self) -> "WidthSpec":
        if self.per_layer is not None and self.strategy != "per_layer":
            raise ValueError(f"width.per_layer applies only with width.strategy: per_layer (not '{self.strategy}')")
        problems = misplaced_sections(self, "width", "metric", self.metric, width_metric_settings())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def metric_settings(self) -> Settings | None:
        """The chosen metric's own section (`width.<metric>`), when it takes settings."""
        return getattr(self, self.metric, None)

    def plan(self, model, scores, shape: WidthShape) -> WidthPlan:
        settings = (self.per_layer or PerLayerSettings()).model_dump() if self.strategy == "per_layer" else {}
        return WIDTH_STRATEGIES[self.strategy](model, scores, shape, **settings)


def width_section(module: str) -> type[WidthSpec]:
    """The `width` section with a field for each registered width metric that takes settings (`width.taylor`)."""
    return with_method_sections(WidthSpec, "WidthSpec", "metric", width_metric_settings(), module)


@dataclass(frozen=True)
class WidthResult:
    plan_json: str
    units: tuple[tuple[str, float], ...]  # (unit id, score): heads, groups, channels, hidden channels
    layers: tuple[dict, ...]  # per present layer after the plan: widths, removed halves, parameters
    seconds: float
    shape: dict  # the widths asked, or chosen for a params_ratio
    tried: tuple[tuple[str, float], ...] = ()  # with a params_ratio: (shape id, calibration perplexity)

    def summary(self, width: "WidthSpec") -> dict:
        return {"metric": width.metric, "strategy": width.strategy, "shape": self.shape,
                "params_ratio": width.params_ratio, "layers": list(self.layers), "seconds": self.seconds}


def width_stage(model_path: str, calibration: ArtifactRef, blocks: tuple[str, ...], model: ModelSpec,
                width: WidthSpec, batch_windows: int) -> WidthResult:
    started = time.perf_counter()
    dense_model = open_model(model_path, model)
    dense_params = total_params(dense_model)
    pruned = remove_blocks(dense_model, list(blocks))
    windows = load_windows(calibration)
    scores = WIDTH_METRICS.lookup(width.metric).scores(pruned, windows, batch_windows, width.metric_settings())
    dense = dense_widths(pruned)
    units = tuple(scores.rows(dense["heads"] // dense["kv_heads"]))
    shape, tried = width.shape, ()
    if shape is None:
        shape, tried = _best_shape(pruned, scores, width, dense_params, windows, batch_windows)
    plan = width.plan(pruned, scores, shape)
    layers = tuple(layer_table(apply_width(pruned, plan)))
    return WidthResult(plan.to_json(), units, layers, time.perf_counter() - started,
                       shape.model_dump(exclude_none=True), tried)


def shape_unit(shape: WidthShape) -> str:
    """A candidate shape's id among the unit scores: `shape:intermediate_size=1024,num_key_value_heads=3,...`."""
    return "shape:" + ",".join(f"{k}={v}" for k, v in shape.model_dump(exclude_none=True).items())


def _best_shape(model, scores, width: WidthSpec, dense_params: int, windows, batch_windows: int):
    """Minitron's search, scaled down: each candidate shape's plan applied to a copy, scored by calibration
    perplexity; the lowest wins (ties: the one that keeps more attention, listed first)."""
    results = []
    for shape in shapes_for_ratio(model, dense_params, width.params_ratio, width.round_to, width.candidates):
        candidate = apply_width(copy.deepcopy(model), width.plan(model, scores, shape))
        with torch.inference_mode():
            results.append((perplexity(candidate, windows, batch_windows), shape))
        del candidate
    best = min(results, key=lambda r: r[0])[1]
    return best, tuple((shape_unit(shape), value) for value, shape in results)
