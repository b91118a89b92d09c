"""Stage `width`: score the heads and channels of what the depth search left, and plan a target shape (given,
or the best of a few that meet a parameter budget).

Runs after `search` (whose blocks are removed first, so depth and width make one plan) and before
`prune`, which applies both. The plan and every unit's score go to the catalog.
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from pydantic import Field, create_model, field_validator, model_validator

from tasks.load import ModelSpec, open_model
from tasks.refs import ArtifactRef
from tasks.settings import Settings, misplaced_sections, with_method_sections
from tasks.residual import perplexity
from tasks.surgery import remove_blocks, total_params
from tasks.surgery.width import WidthPlan, apply_width, dense_widths, layer_table
from tasks.width import WIDTH_METRICS, WIDTH_STRATEGIES, WidthShape
from tasks.width.importance import UnitScores, width_metric_settings
from tasks.width.plan import Calibration, PlanOutcome, resolve_shape, share_record, width_strategy_settings
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
    strategy: str = Field("uniform", description="How the plan is chosen: a registered width strategy (each is "
                          "described in the composed section, `width_section`).",
                          json_schema_extra=_names_of(WIDTH_STRATEGIES))
    shape: WidthShape | None = Field(
        None, description="The widths every layer keeps (uniform), or keeps on average (per_layer).")
    params_ratio: float | None = Field(
        None, gt=0.0, lt=1.0, description="Instead of a shape: the share of the model's parameters removed in all "
        "(depth and width); the best of a few shapes that meet it, by calibration perplexity, is kept.")
    round_to: int = Field(64, ge=1, description="With params_ratio: MLP widths on multiples of this.")
    candidates: int = Field(4, ge=1, le=64, description="With params_ratio: how many shapes are scored.")

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
        problems = misplaced_sections(self, "width", "strategy", self.strategy, width_strategy_settings())
        problems += misplaced_sections(self, "width", "metric", self.metric, width_metric_settings())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _what_the_strategy_reads(self) -> "WidthSpec":
        strategy = WIDTH_STRATEGIES[self.strategy]
        if not strategy.prunes_hidden and self.shape is not None and self.shape.hidden_size is not None:
            raise ValueError(f"width.shape.hidden_size: strategy {self.strategy} prunes heads and MLP channels, not "
                             "the hidden size; remove hidden_size or use strategy uniform")
        if self.scores_units:
            return self
        ranks = f"width.strategy {self.strategy} ranks the units itself"
        # The default may stand (a spec dumped whole, as deployments and the UI send it, names it).
        if self.metric != type(self).model_fields["metric"].default:
            raise ValueError(f"{ranks}: remove width.metric (given as '{self.metric}')")
        if self.params_ratio is not None:
            raise ValueError(f"{ranks} and reconstructs one shape: give width.shape instead of width.params_ratio")
        return self

    @property
    def scores_units(self) -> bool:
        """Whether the metric scores the units (False: the strategy ranks them itself)."""
        return WIDTH_STRATEGIES[self.strategy].scores_units

    @property
    def scored_by(self) -> str:
        """The name the unit scores are recorded under: the metric, or a self-ranking strategy."""
        return self.metric if self.scores_units else self.strategy

    def metric_settings(self) -> Settings | None:
        """The chosen metric's own section (`width.<metric>`), when it takes settings."""
        return getattr(self, self.metric, None)

    def outcome(self, model, scores, shape: WidthShape, calibration: Calibration) -> PlanOutcome:
        return WIDTH_STRATEGIES[self.strategy].outcome(model, scores, shape, getattr(self, self.strategy, None),
                                                       calibration)

    def plan(self, model, scores, shape: WidthShape) -> WidthPlan:
        """A plan from scores alone (the strategies that do not read calibration text)."""
        return self.outcome(model, scores, shape, Calibration(torch.empty(0, 0, dtype=torch.long), 1)).plan


def width_section(module: str) -> type[WidthSpec]:
    """The `width` section with a field for each registered width metric (`width.taylor`) and strategy
    (`width.per_layer`, `width.osscar`) that takes settings."""
    metrics = with_method_sections(WidthSpec, "WidthSpec", "metric", width_metric_settings(), module)
    composed = with_method_sections(metrics, "WidthSpec", "strategy", width_strategy_settings(), module)
    # The strategies' own descriptions, read after plugins registered theirs (the parameter form shows them).
    described = "; ".join(f"{name}: {s.description}" for name, s in WIDTH_STRATEGIES.items())
    return create_model("WidthSpec", __base__=composed, __module__=module, strategy=(str, Field(
        "uniform", description=f"How the plan is chosen ({described}).", json_schema_extra=_names_of(WIDTH_STRATEGIES))))


@dataclass(frozen=True)
class WidthResult:
    plan_json: str
    units: tuple[tuple[str, float], ...]  # (unit id, score): heads, groups, channels, hidden channels
    layers: tuple[dict, ...]  # per present layer after the plan: widths, removed halves, parameters
    seconds: float
    shape: dict  # the widths asked, or chosen for a params_ratio
    tried: tuple[tuple[str, float], ...] = ()  # with a params_ratio: (shape id, calibration perplexity)
    weights: ArtifactRef | None = None  # a reconstructing strategy's new weights (safetensors), for prune
    # Per reconstructed unit (`layers.N.mlp`): its relative output error after each stage of the strategy.
    errors: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()
    blocks: tuple[str, ...] = ()  # whole layers the strategy removed besides the depth search's
    trace: tuple[dict, ...] = ()  # a training strategy's steps: loss, expected sizes, constraint gaps
    shares: dict | None = None  # sizes asked as shares: {field: {"share": "90%", "of": dense, "count": resolved}}

    def summary(self, width: "WidthSpec") -> dict:
        out = {"metric": width.scored_by, "strategy": width.strategy, "shape": self.shape,
               "params_ratio": width.params_ratio, "layers": list(self.layers), "seconds": self.seconds}
        if self.errors:
            out["reconstruction"] = self.reconstruction()
        if self.blocks:
            out["blocks"] = list(self.blocks)
        if self.trace:
            out["training"] = list(self.trace)
        if self.shares:
            out["shares"] = self.shares
        return out

    def reconstruction(self) -> list[dict]:
        """Per reconstructed unit, in model order: `{"unit": ..., "<stage>": error, ...}`."""
        return [{"unit": unit, **dict(stages)} for unit, stages in self.errors]

    def error_rows(self) -> dict[str, list[tuple[str, float]]]:
        """Per stage (`reconstruction.refit`, ...): (unit, error) rows for the catalog's unit scores."""
        rows: dict[str, list[tuple[str, float]]] = {}
        for unit, stages in self.errors:
            for stage, value in stages:
                rows.setdefault(f"reconstruction.{stage}", []).append((unit, value))
        return rows


def width_stage(model_path: str, calibration: ArtifactRef, blocks: tuple[str, ...], model: ModelSpec,
                width: WidthSpec, batch_windows: int, out_dir: Path | None = None,
                on_unit: Callable[..., None] | None = None,
                on_windows: Callable[[str, int, int], None] | None = None) -> WidthResult:
    """`out_dir` receives a reconstructing strategy's weights (`width-weights.safetensors`) and a training
    strategy's resumable state; `on_unit(done, total[, detail])` follows the strategy's units or steps,
    `on_windows(what, done, total)` the calibration windows of the metric's scoring and of the shapes tried."""
    started = time.perf_counter()
    dense_model = open_model(model_path, model, "width")
    dense_params = total_params(dense_model)
    pruned = remove_blocks(dense_model, list(blocks))
    windows = load_windows(calibration)
    scores = None
    if width.scores_units:
        with _windows_through(pruned, windows.shape[0], on_windows, f"{width.metric} scores"):
            scores = WIDTH_METRICS.lookup(width.metric).scores(pruned, windows, batch_windows, width.metric_settings())
    shape, tried = width.shape, ()
    if shape is None:
        shape, tried = _best_shape(pruned, scores, width, dense_params, windows, batch_windows, on_windows)
    # Shares are of the source model's widths: removing whole blocks first leaves every layer's widths as they were.
    dense = dense_widths(pruned)
    counts = resolve_shape(shape, dense)
    state_dir = None if out_dir is None else out_dir / "width-state"
    outcome = width.outcome(pruned, scores, counts, Calibration(windows, batch_windows, on_unit, model_path,
                                                                state_dir))
    units = tuple((outcome.scores or scores or UnitScores()).rows(dense["heads"] // dense["kv_heads"]))
    weights = _write_weights(outcome.weights, out_dir) if outcome.weights else None
    layers = tuple(layer_table(apply_width(remove_blocks(pruned, list(outcome.blocks)), outcome.plan)))
    errors = tuple((unit, tuple(stages.items())) for unit, stages in outcome.errors.items())
    return WidthResult(outcome.plan.to_json(), units, layers, time.perf_counter() - started,
                       _kept_shape(counts, outcome.plan, dense), tried, weights, errors, outcome.blocks,
                       tuple(outcome.trace), share_record(shape, dense) or None)


@contextmanager
def _windows_through(model, total: int, report: Callable[[str, int, int], None] | None, what: str):
    """Counts the windows that go through the model's forward, whatever the metric does with them (the
    built-in metrics take each window once; a plugin's extra passes count past the total)."""
    if report is None:
        yield
        return
    seen = [0]

    def count(_module, args, kwargs, _output) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is not None:
            seen[0] += ids.shape[0]
            report(what, seen[0], max(total, seen[0]))

    handle = model.register_forward_hook(count, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _kept_shape(shape: WidthShape, plan: WidthPlan, dense: dict[str, int]) -> dict:
    """The shape asked, in counts, with the MLP width the plan keeps where a strategy rounded it (OSSCAR's
    round_to)."""
    asked = shape.model_dump(exclude_none=True)
    kept = {len(layer.channels) for layer in plan.layers.values() if layer.channels is not None}
    if "intermediate_size" in asked and len(kept) == 1:
        asked["intermediate_size"] = kept.pop()
    return asked


def _write_weights(weights: dict[str, torch.Tensor], out_dir: Path | None) -> ArtifactRef:
    """The reconstructed weights as one safetensors file, written whole or not at all."""
    if out_dir is None:
        raise ValueError("width_stage: a reconstructing strategy needs out_dir for its weights")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "width-weights.safetensors"
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    save_file({name: t.contiguous() for name, t in weights.items()}, str(tmp))
    os.replace(tmp, target)
    return ArtifactRef.of(target, "width-weights")


def shape_unit(shape: WidthShape) -> str:
    """A candidate shape's id among the unit scores: `shape:intermediate_size=1024,num_key_value_heads=3,...`."""
    return "shape:" + ",".join(f"{k}={v}" for k, v in shape.model_dump(exclude_none=True).items())


def _best_shape(model, scores, width: WidthSpec, dense_params: int, windows, batch_windows: int,
                on_windows: Callable[[str, int, int], None] | None = None):
    """Minitron's search, scaled down: each candidate shape's plan applied to a copy, scored by calibration
    perplexity; the lowest wins (ties: the one that keeps more attention, listed first)."""
    results = []
    shapes = shapes_for_ratio(model, dense_params, width.params_ratio, width.round_to, width.candidates)
    count = windows.shape[0]
    for k, shape in enumerate(shapes):
        candidate = apply_width(copy.deepcopy(model), width.plan(model, scores, shape))
        report = None if on_windows is None else (
            lambda done, _total, k=k: on_windows(f"{len(shapes)} shapes", k * count + done, len(shapes) * count))
        with torch.inference_mode():
            results.append((perplexity(candidate, windows, batch_windows, on_windows=report), shape))
        del candidate
    best = min(results, key=lambda r: r[0])[1]
    return best, tuple((shape_unit(shape), value) for value, shape in results)
