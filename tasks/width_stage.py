"""Stage `width`: score the heads and channels of what the depth search left, and plan one target shape.

Runs after `search` (whose blocks are removed first, so depth and width make one plan) and before
`prune`, which applies both. The plan and every unit's score go to the catalog.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pydantic import Field, field_validator, model_validator

from tasks.load import ModelSpec, open_model
from tasks.refs import ArtifactRef
from tasks.settings import Settings
from tasks.surgery import remove_blocks
from tasks.surgery.width import WidthPlan, apply_width, dense_widths, layer_table
from tasks.width import WIDTH_METRICS, WIDTH_STRATEGIES, PerLayerSettings, WidthShape
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
    shape: WidthShape = Field(description="The widths every layer keeps (uniform), or keeps on average (per_layer).")
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
    def _settings_of_the_strategy(self) -> "WidthSpec":
        if self.per_layer is not None and self.strategy != "per_layer":
            raise ValueError(f"width.per_layer applies only with width.strategy: per_layer (not '{self.strategy}')")
        return self

    def plan(self, model, scores) -> WidthPlan:
        settings = (self.per_layer or PerLayerSettings()).model_dump() if self.strategy == "per_layer" else {}
        return WIDTH_STRATEGIES[self.strategy](model, scores, self.shape, **settings)


@dataclass(frozen=True)
class WidthResult:
    plan_json: str
    units: tuple[tuple[str, float], ...]  # (unit id, score), heads, groups and channels
    layers: tuple[dict, ...]  # per present layer after the plan: widths, removed halves, parameters
    seconds: float

    @property
    def plan(self) -> WidthPlan:
        return WidthPlan.from_json(self.plan_json)


def width_stage(model_path: str, calibration: ArtifactRef, blocks: tuple[str, ...], model: ModelSpec,
                width: WidthSpec, batch_windows: int) -> WidthResult:
    started = time.perf_counter()
    pruned = remove_blocks(open_model(model_path, model), list(blocks))
    scores = WIDTH_METRICS.lookup(width.metric).scores(pruned, load_windows(calibration), batch_windows)
    plan = width.plan(pruned, scores)
    dense = dense_widths(pruned)
    units = tuple(scores.rows(dense["heads"] // dense["kv_heads"]))
    layers = tuple(layer_table(apply_width(pruned, plan)))
    return WidthResult(plan.to_json(), units, layers, time.perf_counter() - started)
