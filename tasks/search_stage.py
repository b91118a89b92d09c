"""Stage `search`: run the configured strategy on the calibration windows, recording as it goes."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from tasks.windows import load_windows
from tasks.execution import ExecutionSpec
from tasks.load import ModelSpec, open_model, resolve_device
from tasks.refs import ArtifactRef
from tasks.residual import predictions
from tasks.score import METRICS, CandidateScore, StepScorer
from tasks.search import Recorder, SearchContext, SearchLog, StepRecord, run_search
from tasks.search.auto_mode import choose_mode
from tasks.search.settings import ScoreSection, SearchSection
from tasks.stream.residency import streamed


@dataclass(frozen=True)
class SearchResult:
    blocks: tuple[str, ...]
    values: tuple[float, ...]
    params_remaining: tuple[int, ...]
    dense_params: int
    unit_windows: int
    head_windows: int
    stored_bytes: int
    evaluated: int
    reused: int
    mode: str = ""  # how the steps scored: exact, bounded or racing ("" when nothing was searched)
    mode_reason: str = ""  # why: the spec's word, or search.mode auto's choice for the run's windows

    @classmethod
    def nothing_removed(cls, dense_params: int) -> "SearchResult":
        """What a pipeline that removes no blocks (width pruning alone) has instead of a search."""
        return cls((), (), (), dense_params, 0, 0, 0, 0, 0)

    @property
    def params_removed_ratio(self) -> float:
        if not self.params_remaining:
            return 0.0
        return 1.0 - self.params_remaining[-1] / self.dense_params


@dataclass(frozen=True)
class SearchSections:
    """The spec sections that decide which blocks the search removes (with the calibration windows)."""

    model: ModelSpec
    score: ScoreSection
    search: SearchSection


def search_stage(
    model_path: str,
    calibration: ArtifactRef,
    sections: SearchSections,
    recorder: Recorder,
    execution: ExecutionSpec = ExecutionSpec(),
    on_step: Callable[[int, dict[str, CandidateScore], StepRecord], None] | None = None,
    on_score: Callable[[int, CandidateScore], None] | None = None,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """`execution` says where scoring runs; every runner computes the same numbers. `log` hears which mode
    the search scores in and why."""
    with _scorer(model_path, calibration, sections, execution) as (windows, scorer):
        why_not = why_not_streamed(sections, execution)
        model = open_model(model_path, sections.model, f"search ({why_not})" if why_not else "search",
                           streams=why_not is None)
        # Streamed, candidates take turns: each holds its layer only while it runs, so one at a time keeps
        # the resident weights within the budget.
        parallel = 1 if streamed(model) else parallel_candidates(execution.parallel_candidates,
                                                                 resolve_device(sections.model.device))
        return _search(model, windows, sections, parallel, recorder, on_step, on_score, scorer, log)


def why_not_streamed(sections: SearchSections, execution: ExecutionSpec) -> str | None:
    """Why this search cannot run on streamed weights (yet), or None when it can (preflight asks too)."""
    if METRICS.get(sections.score.metric).needs_grad:
        streaming = ", ".join(name for name, metric in METRICS.items() if not metric.needs_grad)
        return f"metric '{sections.score.metric}' needs gradients; metrics that stream: {streaming}"
    if sections.search.scoring_mode() in ("bounded", "auto"):
        chooses = " may choose bounded mode, which" if sections.search.scoring_mode() == "auto" else ""
        return (f"search.mode '{sections.search.scoring_mode()}'{chooses} reads the whole output head for its "
                "bounds; name exact or racing, which stream")
    if execution.runner != "local":
        return f"execution.runner '{execution.runner}' loads the model in each worker"
    return None


@contextmanager
def _scorer(model_path: str, calibration: ArtifactRef, sections: SearchSections,
            execution: ExecutionSpec) -> Iterator[tuple[torch.Tensor, StepScorer | None]]:
    """The calibration windows and, under `execution.runner: dask`, the scorer that shards each step
    (None: the metric's own, in this process). A Dask cluster started for the run lives this long."""
    windows = load_windows(calibration)
    if execution.runner == "local":
        yield windows, None
        return
    from tasks.distributed.runner import distributed_scorer

    mode = choose_mode(sections.score, sections.search, windows.shape[0])
    with distributed_scorer(model_path, calibration, sections.model, sections.score, mode.exact,
                            execution, windows.shape[0], predictions(windows), mode.racing) as scorer:
        yield windows, scorer


def parallel_candidates(setting: int | str, device: str) -> int:
    """`execution.parallel_candidates`: auto runs one candidate per usable CPU core, at most 4, and one at
    a time on a GPU, which one stream of work keeps busy. Measured on 2 cores: benchmarks/search_speed.py.
    More threads contend for the GIL between ops, hence the cap."""
    if setting != "auto":
        return int(setting)
    if device != "cpu":
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _search(model, windows, sections: SearchSections, parallel: int, recorder: Recorder, on_step, on_score,
            scorer: StepScorer | None, log: Callable[[str], None]) -> SearchResult:
    score, search = sections.score, sections.search
    ctx = SearchContext.of(model, windows, score, search, log=SearchLog(recorder, on_step, on_score), parallel=parallel,
                           scorer=scorer)
    log(f"search scores in {ctx.scoring.mode} mode ({ctx.scoring.mode_reason})")
    records = run_search(ctx, search.strategy)
    work = ctx.scorer.work
    return SearchResult(
        blocks=tuple(r.block for r in records),
        values=tuple(r.value for r in records),
        params_remaining=tuple(r.params_remaining for r in records),
        dense_params=ctx.dense_params,
        unit_windows=work.unit_windows,
        head_windows=work.head_windows,
        stored_bytes=work.stored_bytes,
        evaluated=ctx.evaluated,
        reused=ctx.reused,
        mode=ctx.scoring.mode,
        mode_reason=ctx.scoring.mode_reason,
    )
