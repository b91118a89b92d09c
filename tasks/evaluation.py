"""What a pipeline evaluates (`evaluate`), the evaluators by name, and the row every evaluator returns and
the catalog stores. A leaf module: evaluators register here from their own modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from pydantic import Field, field_validator
from torch import nn

from tasks.errors import UserError
from tasks.registry import Plugin, Registry
from tasks.settings import Settings
from tasks.stream.residency import streamed


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


@dataclass(frozen=True)
class EvaluationInput:
    """What every evaluator of one checkpoint at one stage may read."""

    stage: str  # dense | pruned | recovered
    model: nn.Module  # pruneflow's in-memory model of the checkpoint
    model_path: str
    data: tuple[Any, ...]  # tasks.calibrate.EvalData: tokenized evaluation windows per dataset
    dtype: str
    device: str
    batch_windows: int
    evaluate: EvaluateSpec
    trust_remote_code: bool = False  # the spec's model.trust_remote_code: whether the folder's own code may run
    # on_window(dataset, done, total) follows every micro-batch of evaluation windows (progress bars).
    on_window: Callable[[str, int, int], None] | None = None
    # on_requests(task, done, total) follows a downstream task's requests to the model (progress bars).
    on_requests: Callable[[str, int, int], None] | None = None

    def window_counter(self, dataset: str) -> Callable[[int, int], None] | None:
        if self.on_window is None:
            return None
        report = self.on_window
        return lambda done, total: report(dataset, done, total)


class Evaluator(Plugin):
    """One kind of evaluation row (`kind` in the catalog) of one checkpoint: perplexity, size, task (speed, which
    compares checkpoints side by side, is the `speed` stage's)."""

    name: ClassVar[str]
    order: ClassVar[int] = 100  # rows are written in this order, lowest first
    # True when it reads the model only through the residual runner (tasks.residual), so a model larger than
    # its memory budget, streamed layer by layer (tasks.stream), serves it as well as a resident one.
    streams: ClassVar[bool] = False

    def wanted(self, evaluate: EvaluateSpec) -> bool:
        """Whether the `evaluate` section asks for this evaluator (preflight checks the extras of these)."""
        return True

    def applies(self, given: EvaluationInput) -> bool:
        """Whether it evaluates this checkpoint (default: whenever the `evaluate` section asks for it)."""
        return self.wanted(given.evaluate)

    def evaluate(self, given: EvaluationInput) -> list[Evaluation]:
        raise NotImplementedError


EVALUATORS: Registry[Evaluator] = Registry("evaluator")


def register_evaluator(cls: type[Evaluator]) -> type[Evaluator]:
    EVALUATORS.add(cls.name, cls())
    return cls


class EvaluatorNeedsWholeModel(UserError):
    pass


def evaluate_all(given: EvaluationInput) -> list[Evaluation]:
    """The rows of every registered evaluator that applies, in their order."""
    chosen = sorted((e for e in EVALUATORS.values() if e.applies(given)), key=lambda e: (e.order, e.name))
    whole = [e.name for e in chosen if not e.streams]
    if whole and streamed(given.model) is not None:
        raise EvaluatorNeedsWholeModel(
            f"evaluate: the {given.stage} model is larger than model.memory_budget_gb and streams, but evaluator(s) "
            f"{', '.join(whole)} need it whole; those that stream: "
            f"{', '.join(e.name for e in EVALUATORS.values() if e.streams)}")
    return [row for evaluator in chosen for row in evaluator.evaluate(given)]
