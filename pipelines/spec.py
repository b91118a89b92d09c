"""The pipeline spec: pydantic models that every YAML pipeline is validated against.

Field names here are contract (see the README): rename only with a migration note.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import (Field, SerializerFunctionWrapHandler, ValidationInfo, field_validator, model_serializer,
                      model_validator)

# Each stage owns its section's settings; the spec only composes them (and re-exports them by name).
from tasks.calibrate import CalibrationSpec
from tasks.evaluation import EvaluateSpec
from tasks.execution import ExecutionSpec
from tasks.load import Device, DType, ModelSpec
from tasks.prune import prune_section
from tasks.recover.bias import BiasRecovery
from tasks.recover.continued_pretraining import ContinuedPretrainingRecovery
from tasks.sources.mixture import WeightedSource
from tasks.recover.lora import LoraRecovery
from tasks.recover.low_rank import LowRankRecovery
from tasks.recover.settings import NoRecovery, recover_section
from tasks.score.angular_distance import AngularDistanceSettings
from tasks.score.shapley import ShapleySettings
from tasks.search.beam import BeamSettings
from tasks.search.settings import (BlocksTarget, Granularity, ParamsRatioTarget, Target, check_combination,
                                   score_section, search_section)
from tasks.plugins import load_plugins
from tasks.width_stage import width_section
from tasks.settings import Settings

# Plugins register their methods before the sections made from the registries are composed: each
# registered method's settings class becomes its section (`score.<metric>`, `search.<strategy>`, `recover`).
load_plugins()
ScoreSpec = score_section(__name__)
SearchSpec = search_section(__name__)
RecoverSpec = recover_section()
PruneSpec = prune_section(__name__)
WidthSpec = width_section(__name__)


class PipelineSpec(Settings):
    """A whole pruning pipeline, as written in YAML."""

    name: str = Field(
        description="Pipeline name (letters, digits, dashes, underscores, dots).",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$",
    )
    model: ModelSpec = Field(description="The model to prune: where it comes from, dtype and device.")
    calibration: CalibrationSpec = Field(CalibrationSpec(), description="The text the search scores blocks on.")
    score: ScoreSpec = Field(ScoreSpec(), description="Which blocks are candidates and the metric that ranks them.")
    search: SearchSpec = Field(description="How blocks are chosen and when the search stops.")
    prune: PruneSpec = Field(PruneSpec(), description="How the pruned checkpoint is written.")
    recover: RecoverSpec = Field(NoRecovery(), description="Healing after pruning: none, or a recovery method.")
    width: WidthSpec | None = Field(
        None, description="Width pruning after the depth search: the heads and MLP channels every layer keeps "
                          "(none: depth only).")
    evaluate: EvaluateSpec = Field(EvaluateSpec(), description="How dense, pruned and recovered models are measured.")
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
    def _without_unset_sections(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The default execution is left out, so specs that never name it serialize as before
        # (deployment parameters, runs.spec_json).
        data = handler(self)
        if self.execution == ExecutionSpec():
            data.pop("execution", None)
        if self.width is None:  # likewise for depth-only pipelines, which name no width section
            data.pop("width", None)
        return data

    @field_validator("search")
    @classmethod
    def _search_fits_score(cls, search: SearchSpec, info: ValidationInfo) -> SearchSpec:
        score = info.data.get("score")
        if score is not None:  # a bad score section has its own errors already
            check_combination(score, search)
        return search

    @model_validator(mode="after")
    def _nothing_removed_needs_width(self) -> "PipelineSpec":
        if getattr(self.search.target, "blocks", None) == 0 and self.width is None:
            raise ValueError("search.target.blocks: 0 removes no blocks, which is only a pipeline with a width "
                             "section (width pruning alone); give blocks >= 1 or add width")
        return self

    def identity_sections(self) -> tuple[str, ...]:
        """Sections that decide what the run removes; `width` only when set, so depth-only runs keep their ids."""
        return IDENTITY_SECTIONS + (("width",) if self.width is not None else ())

    def catalog_path(self) -> Path:
        if self.catalog:
            return Path(self.catalog)
        return Path(self.output_dir).parent / "catalog.duckdb"

    def section_json(self, *sections: str) -> str:
        """Canonical JSON of some top-level sections: the unit of cache keys and run identity.

        Values equal to their defaults are left out, so adding a new setting with a default does not
        change the identity of existing runs (a change of meaning bumps flows.keys.CODE_VERSION)."""
        dumped = self.model_dump(mode="json", exclude_defaults=True, exclude={"model": set(ModelSpec.NOT_IDENTITY)})
        return json.dumps({s: dumped.get(s) for s in sections}, sort_keys=True, separators=(",", ":"))

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def spec_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


# Sections that decide which blocks the search removes: a change here is a different run.
IDENTITY_SECTIONS = ("name", "model", "calibration", "score", "search")


__all__ = [
    "AngularDistanceSettings", "BeamSettings", "BiasRecovery", "BlocksTarget", "CalibrationSpec",
    "ContinuedPretrainingRecovery", "DType", "Device", "EvaluateSpec", "ExecutionSpec", "Granularity",
    "IDENTITY_SECTIONS", "LoraRecovery", "LowRankRecovery", "ModelSpec", "NoRecovery", "ParamsRatioTarget",
    "PipelineSpec", "PruneSpec", "RecoverSpec", "ScoreSpec", "SearchSpec", "ShapleySettings",
    "Target", "WeightedSource", "WidthSpec", "check_combination",
]
