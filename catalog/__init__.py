"""DuckDB catalog of runs: every candidate score, removed block, evaluation and artifact."""

from catalog.rows import (
    EVAL_KINDS,
    EVAL_STAGES,
    RUN_STATUSES,
    ArtifactRow,
    EvaluationRow,
    RunRow,
    RunSummary,
    ScoreRow,
    StepRow,
)
from catalog.schema import SCHEMA_VERSION
from catalog.store import Catalog, CatalogError, CatalogLocked

__all__ = [
    "ArtifactRow",
    "Catalog",
    "CatalogError",
    "CatalogLocked",
    "EVAL_KINDS",
    "EVAL_STAGES",
    "EvaluationRow",
    "RUN_STATUSES",
    "RunRow",
    "RunSummary",
    "SCHEMA_VERSION",
    "ScoreRow",
    "StepRow",
]
