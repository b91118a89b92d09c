"""The `score` and `search` sections: which metric ranks which candidate blocks, and how the search
chooses among them (strategy, target, protections), with the settings of the methods that take some."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    field_validator,
    model_serializer,
    model_validator,
)

from tasks.settings import Settings

Granularity = Literal["layer", "attn", "mlp", "sublayer"]


def check_registered(kind: str, value: str) -> str:
    # Imported here: the registries fill themselves by importing their method modules.
    from tasks.score import METRICS
    from tasks.search.registry import STRATEGIES

    registry = {"metric": METRICS, "strategy": STRATEGIES}[kind]
    if value not in registry:
        raise ValueError(registry.unknown_message(value))
    return value


class AngularDistanceSettings(Settings):
    tokens: Literal["last", "all"] = Field(
        "last", description="last: the last token of each window (Gromov et al.); all: every token."
    )


class ShapleySettings(Settings):
    estimator: Literal["leave_one_out", "sampled"] = Field(
        "sampled",
        description=(
            "leave_one_out: loss rise without each block; sampled: random half-subnetworks and their complements."
        ),
    )
    samples: int = Field(
        16, ge=1, le=100_000, description="sampled: subnetworks drawn (each also evaluated with its complement)."
    )
    seed: int = Field(0, ge=0, description="sampled: seed that draws the subnetworks.")

    @model_validator(mode="after")
    def _sampling_keys_need_sampling(self) -> "ShapleySettings":
        given = sorted(self.model_fields_set & {"samples", "seed"})
        if self.estimator == "leave_one_out" and given:
            raise ValueError(f"{', '.join(given)} apply only to estimator 'sampled', not 'leave_one_out'")
        return self


# Settings sections of metrics that take some, named after the metric (`score.<metric>`).
_METRIC_SETTINGS: dict[str, type[Settings]] = {
    "angular_distance": AngularDistanceSettings,
    "shapley": ShapleySettings,
}


def _drop_unused_settings(data: dict[str, Any], table: dict[str, type[Settings]], active: str,
                          settings: dict[str, Any]) -> dict[str, Any]:
    """A section's canonical form: only the active method's settings, with their defaults filled in.

    Sections of other methods are always empty, so leaving them out keeps the identity (run id, cache
    keys) of pipelines written before those settings existed.
    """
    for name in table:
        data.pop(name, None)
    if active in table:
        data[active] = settings
    return data


class ScoreSpec(Settings):
    granularity: Granularity = Field(
        "sublayer",
        description="Candidate blocks: whole layers, attention only, MLP only, or both sub-blocks (BlockPruner).",
    )
    metric: str = Field("perplexity", description="Block-importance metric (registry name).")
    batch_windows: int = Field(
        1, ge=1, le=4096, description="Windows per forward micro-batch; fixed so results never depend on layout."
    )
    memory_budget_gb: float = Field(
        8.0, gt=0, le=4096,
        description="Most memory for the hidden states a search step keeps; beyond it states are recomputed.",
    )
    angular_distance: AngularDistanceSettings | None = Field(
        None, description="Settings of metric angular_distance (only with that metric)."
    )
    shapley: ShapleySettings | None = Field(None, description="Settings of metric shapley (only with that metric).")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        return check_registered("metric", value)

    @model_validator(mode="after")
    def _settings_and_granularity_fit_metric(self) -> "ScoreSpec":
        from tasks.search.fit import metric_problems

        problems = [
            f"score.{name} applies only with score.metric: {name} (the metric is '{self.metric}')"
            for name in _METRIC_SETTINGS
            if getattr(self, name) is not None and name != self.metric
        ]
        problems += metric_problems(self.metric, self.granularity)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def metric_settings(self) -> dict[str, Any]:
        """Keyword settings of the chosen metric (its section, defaults filled in), for SearchContext."""
        settings_cls = _METRIC_SETTINGS.get(self.metric)
        if settings_cls is None:
            return {}
        return (getattr(self, self.metric) or settings_cls()).model_dump()

    @model_serializer(mode="wrap")
    def _canonical(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _drop_unused_settings(handler(self), _METRIC_SETTINGS, self.metric, self.metric_settings())


class BlocksTarget(Settings):
    blocks: int = Field(ge=1, le=10_000, description="Number of candidate blocks to remove.")


class ParamsRatioTarget(Settings):
    params_ratio: float = Field(
        gt=0.0,
        lt=1.0,
        description="Fraction of the dense model's parameters (embeddings included) to remove, at least.",
    )


def _target_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        if "params_ratio" in value:
            return "params_ratio"
        if "blocks" in value:
            return "blocks"
        return None
    if isinstance(value, ParamsRatioTarget):
        return "params_ratio"
    if isinstance(value, BlocksTarget):
        return "blocks"
    return None


Target = Annotated[
    Union[Annotated[BlocksTarget, Tag("blocks")], Annotated[ParamsRatioTarget, Tag("params_ratio")]],
    Discriminator(
        _target_kind,
        custom_error_type="target",
        custom_error_message="search.target needs exactly one of 'blocks' (an integer) or 'params_ratio' (0 < r < 1)",
    ),
]


class BeamSettings(Settings):
    width: int = Field(4, ge=1, le=1024, description="Partial removal sets kept at every depth (1 = iterative).")


# Settings sections of strategies that take some, named after the strategy (`search.<strategy>`).
_STRATEGY_SETTINGS: dict[str, type[Settings]] = {"beam": BeamSettings}


class SearchSpec(Settings):
    strategy: str = Field("iterative", description="Search strategy (registry name).")
    target: Target = Field(description="When to stop removing blocks.")
    exact_scores: bool = Field(
        True,
        description="Evaluate every candidate fully; false stops hopeless candidates early and stores lower bounds.",
    )
    protect: tuple[str, ...] = Field(
        (), description="Block ids that are never removed, e.g. layers.0 or layers.3.mlp."
    )
    protect_first: int = Field(
        0, ge=0, le=10_000, description="Never remove the first N layers, attention and MLP (Shortened LLaMA's '+')."
    )
    protect_last: int = Field(0, ge=0, le=10_000, description="Never remove the last N layers, attention and MLP.")
    beam: BeamSettings | None = Field(None, description="Settings of strategy beam (only with that strategy).")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        return check_registered("strategy", value)

    @model_validator(mode="before")
    @classmethod
    def _one_target(cls, data: Any) -> Any:
        target = data.get("target") if isinstance(data, dict) else None
        if isinstance(target, dict) and "blocks" in target and "params_ratio" in target:
            raise ValueError("search.target takes either 'blocks' or 'params_ratio', not both")
        return data

    @model_validator(mode="after")
    def _settings_fit_strategy(self) -> "SearchSpec":
        problems = [
            f"search.{name} applies only with search.strategy: {name} (the strategy is '{self.strategy}')"
            for name in _STRATEGY_SETTINGS
            if getattr(self, name) is not None and name != self.strategy
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def strategy_settings(self) -> dict[str, Any]:
        """Keyword settings of the chosen strategy (its section, defaults filled in), for SearchContext."""
        settings_cls = _STRATEGY_SETTINGS.get(self.strategy)
        if settings_cls is None:
            return {}
        return (getattr(self, self.strategy) or settings_cls()).model_dump()

    @model_serializer(mode="wrap")
    def _canonical(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = _drop_unused_settings(handler(self), _STRATEGY_SETTINGS, self.strategy, self.strategy_settings())
        # Zero protections are the default; leaving them out keeps older pipelines' identity.
        for key in ("protect_first", "protect_last"):
            if data.get(key) == 0:
                data.pop(key)
        return data


def check_combination(score: ScoreSpec, search: SearchSpec) -> None:
    """Refuse a strategy that cannot use the metric, granularity or exact_scores setting given."""
    from tasks.search.fit import combination_problems

    problems = combination_problems(score.metric, score.granularity, search.strategy, search.exact_scores)
    if problems:
        raise ValueError("; ".join(problems))
