"""What a pipeline evaluates (`evaluate`), and the row every evaluator returns and the catalog stores."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field, field_validator

from tasks.settings import Settings


@dataclass(frozen=True)
class Evaluation:
    stage: str
    kind: str
    dataset: str
    metric: str
    value: float
    n_tokens: int | None = None
    seq_len: int | None = None
    stride: int | None = None
    n_samples: int | None = None  # downstream tasks: examples evaluated


class EvaluateSpec(Settings):
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
