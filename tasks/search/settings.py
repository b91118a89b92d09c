"""The `score` and `search` sections: which metric ranks which candidate blocks, and how the search
chooses among them (strategy, target, protections), with the settings of the methods that take some."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    field_validator,
    model_serializer,
    model_validator,
)

from tasks.score.base import ScoringOptions
from tasks.score.racing import RacingOptions
from tasks.search.goal import SearchRules, Target as StopTarget
from tasks.search.scoring import MetricChoice
from tasks.settings import Settings, misplaced_sections, with_method_sections

Granularity = Literal["layer", "attn", "mlp", "sublayer"]


def check_registered(kind: str, value: str) -> str:
    # Imported here: the registries fill themselves by importing their method modules.
    from tasks.score import METRICS
    from tasks.search.registry import STRATEGIES

    registry = {"metric": METRICS, "strategy": STRATEGIES}[kind]
    if value not in registry:
        raise ValueError(registry.unknown_message(value))
    return value


def registered_names(kind: str):
    """A field's JSON-schema hook listing the registered names (plugins included) as its choices."""

    def add_enum(schema: dict[str, Any]) -> None:
        from tasks.score import METRICS
        from tasks.search.registry import STRATEGIES

        schema["enum"] = sorted(name for name, _ in {"metric": METRICS, "strategy": STRATEGIES}[kind].items())

    return add_enum


def metric_settings_classes() -> dict[str, type[Settings]]:
    """The metrics that take settings, and their section classes (`score.<metric>`)."""
    from tasks.score import METRICS

    return {name: metric.settings for name, metric in METRICS.items() if metric.settings is not None}


def strategy_settings_classes() -> dict[str, type[Settings]]:
    """The strategies that take settings, and their section classes (`search.<strategy>`)."""
    from tasks.search.registry import STRATEGY_SETTINGS

    return dict(STRATEGY_SETTINGS.items())


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


class ScoreSection(Settings):
    """The `score` section without the metrics' own sections, which `score_section` adds from the registry."""

    granularity: Granularity = Field(
        "sublayer",
        description="Candidate blocks: whole layers, attention only, MLP only, or both sub-blocks (BlockPruner).",
    )
    metric: str = Field("perplexity", description="Block-importance metric (a registered name).",
                        json_schema_extra=registered_names("metric"))
    batch_windows: int = Field(
        1, ge=1, le=4096, description="Windows per forward micro-batch; fixed so results never depend on layout."
    )
    memory_budget_gb: float = Field(
        8.0, gt=0, le=4096,
        description="Most memory for the hidden states a search step keeps; beyond it states are recomputed.",
    )

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        return check_registered("metric", value)

    @model_validator(mode="after")
    def _settings_and_granularity_fit_metric(self) -> "ScoreSection":
        from tasks.search.fit import metric_problems

        problems = misplaced_sections(self, "score", "metric", self.metric, metric_settings_classes())
        problems += metric_problems(self.metric, self.granularity)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def metric_settings(self) -> dict[str, Any]:
        """Keyword settings of the chosen metric (its section, defaults filled in), for its scorer."""
        settings_cls = metric_settings_classes().get(self.metric)
        if settings_cls is None:
            return {}
        return (getattr(self, self.metric, None) or settings_cls()).model_dump()

    def options(self, exact: bool, racing: RacingOptions | None = None) -> ScoringOptions:
        """How the scorer may spend work and memory (`exact` and `racing` come from the search's mode)."""
        return ScoringOptions(self.batch_windows, exact, self.memory_budget_gb * 2**30, racing)

    def metric_choice(self, exact: bool, parallel: int = 1, racing: RacingOptions | None = None) -> MetricChoice:
        return MetricChoice(self.metric, self.metric_settings(), self.options(exact, racing), parallel)

    @model_serializer(mode="wrap")
    def _canonical(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _drop_unused_settings(handler(self), metric_settings_classes(), self.metric, self.metric_settings())


class RacingSettings(Settings):
    """`search.racing`: how candidates race over the calibration windows (tasks/score/racing.py)."""

    confidence: float = Field(
        0.99, gt=0.5, lt=1.0,
        description="Probability that the exact best candidate stays in the race (and so is chosen).",
    )
    min_windows: int = Field(8, ge=3, le=100_000, description="Windows every candidate sees before it can leave.")
    round_windows: int = Field(4, ge=1, le=100_000, description="Windows added between two looks.")
    seed: int = Field(0, ge=0, description="Draws the order the windows go in.")


class BlocksTarget(Settings):
    model_config = ConfigDict(title="a number of blocks")  # the choice's name in the parameter form
    blocks: int = Field(ge=0, le=10_000, description="Number of candidate blocks to remove (0: none, with width).")


class ParamsRatioTarget(Settings):
    model_config = ConfigDict(title="a share of the parameters")
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


class SearchSection(Settings):
    """The `search` section without the strategies' own sections, which `search_section` adds."""

    strategy: str = Field("iterative", description="Search strategy (a registered name).",
                          json_schema_extra=registered_names("strategy"))
    target: Target = Field(description="When to stop removing blocks.")
    exact_scores: bool = Field(
        True,
        description="Evaluate every candidate fully; false stops hopeless candidates early and stores lower bounds "
                    "(the same as mode: bounded).",
    )
    mode: Literal["exact", "bounded", "racing", "auto"] | None = Field(
        None,
        description="How a step scores its candidates: exact (every window), bounded (stop those that cannot win, "
                    "store lower bounds), racing (drop those behind the leader, or behind the best k a strategy "
                    "keeps, with confidence; racing.*), auto (racing from twice racing.min_windows windows, else "
                    "bounded where it fits, else exact; the run says which and why). "
                    "Default: exact_scores decides.",
    )
    racing: RacingSettings | None = Field(None, description="Settings of search.mode: racing (or auto, when it races).")
    objective: Literal["ppl", "ppl_per_param"] | None = Field(
        None,
        description="What a step minimises: ppl (the candidate's calibration perplexity, the default) or "
                    "ppl_per_param (the rise in log-perplexity per parameter the candidate removes).",
    )
    protect: tuple[str, ...] = Field(
        (), description="Block ids that are never removed, e.g. layers.0 or layers.3.mlp."
    )
    protect_first: int = Field(
        0, ge=0, le=10_000, description="Never remove the first N layers, attention and MLP (Shortened LLaMA's '+')."
    )
    protect_last: int = Field(0, ge=0, le=10_000, description="Never remove the last N layers, attention and MLP.")

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
    def _settings_fit_strategy(self) -> "SearchSection":
        problems = misplaced_sections(self, "search", "strategy", self.strategy, strategy_settings_classes())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="before")
    @classmethod
    def _mode_sets_exact_scores(cls, data: Any) -> Any:
        """`exact_scores` stays the flag every scorer reads: a mode sets it (exact: true, else false)."""
        if not isinstance(data, dict) or data.get("mode") is None:
            return data
        if data["mode"] == "auto":
            if "exact_scores" in data:
                raise ValueError("search.mode 'auto' chooses between exact and lower-bound scores itself; "
                                 "give only search.mode, not search.exact_scores")
            return data
        exact = data["mode"] == "exact"
        if "exact_scores" in data and data["exact_scores"] is not exact:
            raise ValueError(f"search.mode '{data['mode']}' contradicts search.exact_scores: "
                             f"{str(data['exact_scores']).lower()}; give only search.mode")
        return {**data, "exact_scores": exact}

    @model_validator(mode="after")
    def _racing_settings_need_racing(self) -> "SearchSection":
        if self.racing is not None and self.scoring_mode() not in ("racing", "auto"):
            raise ValueError("search.racing applies only with search.mode: racing or auto "
                             f"(the mode is '{self.scoring_mode()}')")
        return self

    def scoring_mode(self) -> str:
        """exact | bounded | racing | auto: `mode`, or what `exact_scores` says when no mode is given (auto
        becomes one of the others once the windows are known: tasks.search.auto_mode)."""
        if self.mode is not None:
            return self.mode
        return "exact" if self.exact_scores else "bounded"

    def racing_options(self) -> RacingOptions | None:
        if self.scoring_mode() not in ("racing", "auto"):
            return None
        settings = self.racing or RacingSettings()
        return RacingOptions(**settings.model_dump())

    def rules(self, layer_ids, granularity: str) -> SearchRules:
        """The candidates that may go, on a model with these layers: the protections of this section."""
        return SearchRules.of(layer_ids, granularity, self.protect, self.protect_first, self.protect_last)

    def goal_target(self) -> StopTarget:
        """The target as the driver reads it."""
        return StopTarget(blocks=getattr(self.target, "blocks", None),
                          params_ratio=getattr(self.target, "params_ratio", None))

    def strategy_section(self) -> Settings | None:
        """The chosen strategy's settings (its section, defaults filled in), or None if it takes none."""
        settings_cls = strategy_settings_classes().get(self.strategy)
        return None if settings_cls is None else (getattr(self, self.strategy, None) or settings_cls())

    def strategy_settings(self) -> dict[str, Any]:
        """Keyword settings of the chosen strategy, for the strategy function."""
        section = self.strategy_section()
        return {} if section is None else section.model_dump()

    @model_serializer(mode="wrap")
    def _canonical(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = _drop_unused_settings(handler(self), strategy_settings_classes(), self.strategy,
                                     self.strategy_settings())
        # Zero protections are the default; leaving them out keeps older pipelines' identity.
        for key in ("protect_first", "protect_last"):
            if data.get(key) == 0:
                data.pop(key)
        # One canonical form per scoring mode: exact and bounded as exact_scores (as before modes existed),
        # racing as the mode with its settings, defaults filled in.
        mode = self.scoring_mode()
        data.pop("mode", None)
        data.pop("racing", None)
        if data.get("objective") in (None, "ppl"):  # the default, left out so older pipelines keep their id
            data.pop("objective", None)
        if mode == "auto":  # auto decides exact_scores per run, so the flag is no part of its identity
            data.pop("exact_scores", None)
        elif mode != "exact":  # exact is the default, which a dump without defaults leaves out
            data["exact_scores"] = False
        if mode in ("racing", "auto"):
            data["mode"] = mode
            data["racing"] = (self.racing or RacingSettings()).model_dump()
        return data


def score_section(module: str) -> type[ScoreSection]:
    """The `score` section with a field for each registered metric that takes settings (`score.<metric>`);
    the class is named ScoreSpec and lives in `module`, the spec that composes it."""
    return with_method_sections(ScoreSection, "ScoreSpec", "metric", metric_settings_classes(), module)


def search_section(module: str) -> type[SearchSection]:
    """The `search` section with a field for each registered strategy that takes settings."""
    return with_method_sections(SearchSection, "SearchSpec", "strategy", strategy_settings_classes(), module)


def check_combination(score: ScoreSection, search: SearchSection) -> None:
    """Refuse a strategy that cannot use the metric, granularity or exact_scores setting given."""
    from tasks.search.fit import combination_problems

    # auto only picks a mode that fits, exact at worst.
    mode = "exact" if search.scoring_mode() == "auto" else search.scoring_mode()
    problems = combination_problems(score.metric, score.granularity, search.strategy, mode)
    if search.objective == "ppl_per_param":
        if score.metric != "perplexity" or search.strategy != "iterative" or search.scoring_mode() == "bounded":
            problems.append(
                "search.objective ppl_per_param compares exact perplexities of one step per parameter: it needs "
                f"score.metric 'perplexity', search.strategy 'iterative' and search.mode 'exact' or 'racing' (given "
                f"'{score.metric}', '{search.strategy}', '{search.scoring_mode()}')")
    if problems:
        raise ValueError("; ".join(problems))
