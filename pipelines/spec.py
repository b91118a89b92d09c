"""The pipeline spec: pydantic models that every YAML pipeline is validated against.

Field names here are contract (see the README): rename only with a migration note.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from pipelines.names import check_registered

_STRICT = ConfigDict(extra="forbid", frozen=True)

Granularity = Literal["layer", "attn", "mlp", "sublayer"]
DType = Literal["float32", "bfloat16", "float16", "auto"]
Device = Literal["auto", "cpu", "cuda"]


class ModelSpec(BaseModel):
    model_config = _STRICT

    source: str = Field(
        description=(
            "Model to prune: a local Hugging Face directory, a hub id, a path to a .gguf file, "
            "or builtin:smollm2-135m."
        ),
        min_length=1,
    )
    dtype: DType = Field("float32", description="Weights and compute dtype; auto: bfloat16 on a CUDA device that supports it, else float32.")
    device: Device = Field("auto", description="auto picks cuda when available, else cpu.")


class CalibrationSpec(BaseModel):
    model_config = _STRICT

    dataset: str = Field(
        "builtin:wiki-vital-en",
        description="builtin:wiki-vital-en, a local .txt/.jsonl/.parquet file, or a hub dataset NAME[:CONFIG][@SPLIT].",
        min_length=1,
    )
    samples: int = Field(32, ge=1, le=100_000, description="Number of calibration windows.")
    seq_len: int = Field(512, ge=8, le=131_072, description="Tokens per calibration window.")
    seed: int = Field(0, ge=0, description="Seed that draws the calibration windows.")


class AngularDistanceSettings(BaseModel):
    model_config = _STRICT

    tokens: Literal["last", "all"] = Field(
        "last", description="last: the last token of each window (Gromov et al.); all: every token."
    )


class ShapleySettings(BaseModel):
    model_config = _STRICT

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
_METRIC_SETTINGS: dict[str, type[BaseModel]] = {
    "angular_distance": AngularDistanceSettings,
    "shapley": ShapleySettings,
}


def _drop_unused_settings(data: dict[str, Any], table: dict[str, type[BaseModel]], active: str,
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


class ScoreSpec(BaseModel):
    model_config = _STRICT

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


class BlocksTarget(BaseModel):
    model_config = _STRICT

    blocks: int = Field(ge=1, le=10_000, description="Number of candidate blocks to remove.")


class ParamsRatioTarget(BaseModel):
    model_config = _STRICT

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


class BeamSettings(BaseModel):
    model_config = _STRICT

    width: int = Field(4, ge=1, le=1024, description="Partial removal sets kept at every depth (1 = iterative).")


# Settings sections of strategies that take some, named after the strategy (`search.<strategy>`).
_STRATEGY_SETTINGS: dict[str, type[BaseModel]] = {"beam": BeamSettings}


class SearchSpec(BaseModel):
    model_config = _STRICT

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


PruneFormat = Literal["auto", "hf", "pruneflow", "remote_code", "nemotron_nas"]


class PruneSpec(BaseModel):
    model_config = _STRICT

    format: PruneFormat = Field(
        "auto",
        description=(
            "auto: a standard checkpoint when only whole layers go, else a self-contained one; "
            "hf: original architecture (whole layers only); remote_code: modeling code in the checkpoint; "
            "nemotron_nas: DeciLM block_configs that vLLM serves."
        ),
    )


class NoRecovery(BaseModel):
    model_config = _STRICT

    method: Literal["none"] = "none"


class _AdapterRecovery(BaseModel):
    """Adapters fitted in closed form on the dense model's calibration activations, optionally refined."""

    model_config = _STRICT

    ridge: float = Field(
        1e-4, ge=0.0, le=1.0,
        description="Ridge term of the least-squares fit, relative to the mean input variance (0: plain least squares).",
    )
    fit: Literal["dense", "pruned"] = Field(
        "dense",
        description=(
            "dense: each adapter maps the block's input to the output it added, in the dense model (Siddiqui et al.); "
            "pruned: fitted in model order on the pruned model's own stream toward the dense stream after the block."
        ),
    )
    refine_steps: int = Field(
        0, ge=0, le=1_000_000,
        description="Optional gradient refinement: steps of Adam on the language-model loss of calibration windows.",
    )
    refine_lr: float = Field(1e-3, gt=0.0, le=1.0, description="Learning rate of the refinement.")
    batch_windows: int = Field(4, ge=1, le=4096, description="Calibration windows per refinement step.")
    seed: int = Field(0, ge=0, description="Seed of the refinement's batch order.")


class BiasRecovery(_AdapterRecovery):
    """Each removed block becomes a learned additive bias on the residual stream (Siddiqui et al. 2024)."""

    method: Literal["bias"]


class LowRankRecovery(_AdapterRecovery):
    """Each removed block becomes a low-rank linear map of its input plus a bias (Siddiqui et al. 2024)."""

    method: Literal["low_rank"]
    rank: int = Field(8, ge=1, le=65_536, description="Rank of each adapter's linear map.")


class _TrainingRecovery(BaseModel):
    model_config = _STRICT

    lr: float = Field(2e-4, gt=0.0, le=1.0, description="Peak learning rate (linear warm-up, then linear decay).")
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Steps of linear learning-rate warm-up.")
    seq_len: int = Field(256, ge=8, le=131_072, description="Tokens per training window.")
    batch_size: int = Field(4, ge=1, le=4096, description="Windows per optimizer step.")
    seed: int = Field(0, ge=0, description="Seed of initialisation and of the windows each step draws.")
    checkpoint_every: int = Field(
        50, ge=1, le=1_000_000, description="Steps between resumable training checkpoints in the output folder."
    )


class LoraRecovery(_TrainingRecovery):
    """LoRA fine-tuning of the pruned model with PEFT, merged into the weights (Shortened LLaMA, scaled down)."""

    method: Literal["lora"]
    dataset: str = Field(
        "builtin:wiki-vital-en",
        min_length=1,
        description="Training text (builtin corpora train on their calibration part, never the evaluation split).",
    )
    steps: int = Field(100, ge=1, le=10_000_000, description="Optimizer steps.")
    rank: int = Field(8, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0.0, description="LoRA scaling numerator (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: tuple[str, ...] = Field(
        ("all-linear",),
        min_length=1,
        description="Module names LoRA adapts (PEFT's target_modules); all-linear: every linear layer but the head.",
    )


class WeightedSource(BaseModel):
    model_config = _STRICT

    source: str = Field(min_length=1, description="Training text: builtin corpus, local file or hub dataset.")
    weight: float = Field(1.0, gt=0.0, description="Mixing weight (relative to the other sources').")


class ContinuedPretrainingRecovery(_TrainingRecovery):
    """Full-parameter training for a token budget (Shortened LLaMA v2, Sheared LLaMA), optionally mixing domains."""

    method: Literal["continued_pretraining"]
    tokens: int = Field(65_536, ge=8, le=10**13, description="Training token budget (steps = tokens / (batch x seq_len)).")
    lr: float = Field(2e-5, gt=0.0, le=1.0, description="Peak learning rate (linear warm-up, then linear decay).")
    datasets: tuple[WeightedSource, ...] = Field(
        (WeightedSource(source="builtin:wiki-vital-en"),),
        min_length=1,
        description="Training text sources and their mixing weights (each window is drawn from one source).",
    )

    def mixture(self) -> dict[str, float]:
        """Source -> share of the training windows (weights of a repeated source add up)."""
        total = sum(d.weight for d in self.datasets)
        shares: dict[str, float] = {}
        for d in self.datasets:
            shares[d.source] = shares.get(d.source, 0.0) + d.weight / total
        return shares


RecoverSpec = Annotated[
    Union[NoRecovery, BiasRecovery, LowRankRecovery, LoraRecovery, ContinuedPretrainingRecovery],
    Field(discriminator="method"),
]


class EvaluateSpec(BaseModel):
    model_config = _STRICT

    datasets: tuple[str, ...] = Field(
        ("builtin:wiki-vital-en",),
        description="Perplexity datasets; builtin:wiki-vital-en uses its evaluation split.",
    )
    seq_len: int = Field(512, ge=8, le=131_072, description="Tokens per evaluation window.")
    max_tokens: int = Field(16_384, ge=8, description="Evaluate on at most this many leading tokens per dataset.")
    tasks: tuple[str, ...] = Field(
        (),
        description="Zero-shot lm-evaluation-harness tasks (e.g. piqa, arc_easy); needs the eval extra.",
    )
    task_paths: tuple[str, ...] = Field((), description="Folders of extra lm-eval task YAMLs (local task files).")
    task_limit: int | None = Field(
        None, ge=1, description="Evaluate at most this many examples per task (none: every example)."
    )

    @field_validator("datasets")
    @classmethod
    def _some_datasets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not item.strip() for item in value):
            raise ValueError("evaluate.datasets entries must be non-empty strings")
        return value


class ExecutionSpec(BaseModel):
    """Where a search step's scoring runs. Never part of a run's identity or cache keys: every runner
    computes the same numbers (see tasks/distributed)."""

    model_config = _STRICT

    runner: Literal["local", "dask"] = Field(
        "local", description="local: in the flow process; dask: calibration windows sharded over Dask workers."
    )
    address: str | None = Field(
        None, min_length=1, description="dask: address of a running scheduler, e.g. tcp://10.0.0.5:8786."
    )
    workers: int | None = Field(
        None, ge=1, le=1024, description="dask: start a local cluster of this many worker processes for the run."
    )
    threads: int = Field(1, ge=1, le=1024, description="dask: torch threads in each worker process.")
    device: Device | None = Field(None, description="dask: device on each worker; default model.device.")
    parallel_candidates: int | Literal["auto"] = Field(
        "auto",
        description=(
            "local: search candidates evaluated side by side, each on one torch thread (same scores); "
            "auto: one per usable CPU core up to 4, one on a GPU."
        ),
    )

    @field_validator("parallel_candidates")
    @classmethod
    def _some_candidates(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError("execution.parallel_candidates must be 'auto' or an integer from 1 to 256")
        return value

    @model_validator(mode="after")
    def _settings_fit_runner(self) -> "ExecutionSpec":
        given = sorted(self.model_fields_set & {"address", "workers", "threads", "device"})
        if self.runner == "dask" and "parallel_candidates" in self.model_fields_set:
            raise ValueError(
                "execution.parallel_candidates applies only with execution.runner: local "
                "(Dask workers take execution.threads)"
            )
        if self.runner == "local":
            if given:
                raise ValueError(
                    f"execution.{', execution.'.join(given)} apply only with execution.runner: dask"
                )
            return self
        if (self.address is None) == (self.workers is None):
            raise ValueError(
                "execution.runner: dask needs exactly one of execution.address (a running scheduler) "
                "or execution.workers (a local cluster started for the run)"
            )
        import importlib.util

        if importlib.util.find_spec("prefect_dask") is None:
            raise ValueError("execution.runner: dask needs the dask extra: pip install 'pruneflow[dask]'")
        return self


class PipelineSpec(BaseModel):
    """A whole pruning pipeline, as written in YAML."""

    model_config = _STRICT

    name: str = Field(
        description="Pipeline name (letters, digits, dashes, underscores, dots).",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$",
    )
    model: ModelSpec
    calibration: CalibrationSpec = CalibrationSpec()
    score: ScoreSpec = ScoreSpec()
    search: SearchSpec
    prune: PruneSpec = PruneSpec()
    recover: RecoverSpec = NoRecovery()
    evaluate: EvaluateSpec = EvaluateSpec()
    output_dir: str = Field(description="Folder for checkpoints, reports and cached stage results.")
    catalog: str = Field("", description="DuckDB catalog file; default catalog.duckdb inside output_dir's parent.")
    execution: ExecutionSpec = Field(ExecutionSpec(), description="Where search steps are scored (local or Dask).")

    @field_validator("execution")
    @classmethod
    def _execution_fits_score(cls, execution: ExecutionSpec, info: ValidationInfo) -> ExecutionSpec:
        from tasks.distributed.shards import DISTRIBUTED_METRICS

        score = info.data.get("score")
        if execution.runner == "dask" and score is not None and score.metric not in DISTRIBUTED_METRICS:
            raise ValueError(
                f"execution.runner: dask shards the metrics {', '.join(DISTRIBUTED_METRICS)} only, "
                f"not '{score.metric}'; use execution.runner: local"
            )
        return execution

    @model_serializer(mode="wrap")
    def _without_default_execution(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The default execution is left out, so specs that never name it serialize as before
        # (deployment parameters, runs.spec_json).
        data = handler(self)
        if self.execution == ExecutionSpec():
            data.pop("execution", None)
        return data

    @field_validator("search")
    @classmethod
    def _search_fits_score(cls, search: SearchSpec, info: ValidationInfo) -> SearchSpec:
        score = info.data.get("score")
        if score is not None:  # a bad score section has its own errors already
            check_combination(score, search)
        return search

    def catalog_path(self) -> Path:
        if self.catalog:
            return Path(self.catalog)
        return Path(self.output_dir).parent / "catalog.duckdb"

    def section_json(self, *sections: str) -> str:
        """Canonical JSON of some top-level sections: the unit of cache keys and run identity.

        Values equal to their defaults are left out, so adding a new setting with a default does not
        change the identity of existing runs (a change of meaning bumps flows.keys.CODE_VERSION)."""
        dumped = self.model_dump(mode="json", exclude_defaults=True)
        return json.dumps({s: dumped.get(s) for s in sections}, sort_keys=True, separators=(",", ":"))

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def spec_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


# Sections that decide which blocks the search removes: a change here is a different run.
IDENTITY_SECTIONS = ("name", "model", "calibration", "score", "search")
