"""What a run shows in the Prefect UI: a progress artifact, a table per search step, a final summary."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from prefect.runtime import flow_run

from catalog.rows import left_race
from catalog.speed import ratio_text
from tasks.score import CandidateScore
from tasks.search import StepRecord


def artifact_key(*parts: str) -> str:
    """Prefect's rule: lowercase letters, digits and dashes."""
    key = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    return key[:100] or "pruneflow"


class ProgressArtifact:
    """A Prefect progress artifact whose description says where the stage is. Updates are sent at most once
    a second (each is a call to the API), except forced ones (a step or stage that ends)."""

    def __init__(self, key: str, description: str):
        self.id = create_progress_artifact(0.0, key=artifact_key(key), description=description)
        self.sent = 0.0

    def update(self, percent: float, description: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.sent >= 1.0:
            update_progress_artifact(self.id, min(100.0, percent), description=description)
            self.sent = now


def pipeline_key(*parts: str) -> str:
    """An artifact key under the running flow's pipeline name (tasks are not given it)."""
    spec = flow_run.parameters.get("spec")
    name = spec.get("name") if isinstance(spec, dict) else getattr(spec, "name", None)
    return artifact_key(name or "pruneflow", *parts)


class StepTables:
    """Each search step's candidate table, once it is chosen. Strategies that score once and remove several
    blocks from that ranking (one_shot, consecutive) get one table, updated as blocks are removed."""

    def __init__(self, pipeline: str):
        self.pipeline = pipeline
        self.last: dict[str, CandidateScore] | None = None
        self.first_step = 0
        self.removed: list[str] = []

    def on_score(self, step: int, score: CandidateScore) -> None:
        pass

    def on_step(self, step: int, scores: dict[str, CandidateScore], record: StepRecord) -> None:
        if scores != self.last:
            self.last, self.first_step, self.removed = dict(scores), step, []
        self.removed.append(record.block)
        steps = f"step {step}" if step == self.first_step else f"steps {self.first_step}-{step}"
        rows = step_rows(scores, self.removed, self.first_step)
        create_table_artifact(
            rows, key=artifact_key(self.pipeline, "step", str(self.first_step)),
            description=f"{steps}: removed {', '.join(self.removed)} ({record.params_remaining:,} params remain)",
        )


def step_rows(scores: dict[str, CandidateScore], removed: list[str], first_step: int) -> list[dict]:
    """A step table's rows, best first: each candidate's score, what kind of score it is, the interval of
    a raced leaver's gap to the reference, and the step that removed it (blocks `removed` from `first_step`)."""
    return [
        {"block": s.block, "score": round(s.value, 5), "kind": _kind(s), "tokens": s.n_tokens,
         "gap low": None if s.gap_low is None else round(s.gap_low, 5),
         "gap high": None if s.gap_high is None else round(s.gap_high, 5), "seconds": round(s.seconds, 3),
         "removed": f"step {first_step + removed.index(s.block)}" if s.block in removed else ""}
        for s in sorted(scores.values(), key=lambda s: s.value)
    ]


def _kind(score: CandidateScore) -> str:
    """exact; a lower bound (bounded mode); or the perplexity of the windows seen by a candidate that left
    a race, whose gap to the reference (log-perplexity per token) has the interval in `gap low`/`gap high`."""
    if score.exact:
        return "exact"
    return "left the race (windows seen)" if left_race(score) else "lower bound"


def _inline_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def summary_markdown(summary: dict, pictures: dict[str, Path], model_source: str, target: str) -> str:
    lines = [
        f"# pruneflow: {summary['pipeline']}",
        "",
        f"| run | `{summary['run_id']}` |",
        "| --- | --- |",
        f"| model | `{model_source}` |",
        f"| target | {target} |",
        f"| blocks removed (in order) | {', '.join(f'`{b}`' for b in summary['blocks'])} |",
        f"| parameters | {summary['params_dense']:,} → {summary['params_pruned']:,} "
        f"({100 * summary['params_removed_ratio']:.2f}% removed) |",
    ]
    for dataset, values in summary["perplexity"].items():
        row = " / ".join(f"{stage} {value:.3f}" for stage, value in values.items())
        lines.append(f"| perplexity ({Path(dataset).name}) | {row} |")
    for workload, by_stage in (summary.get("speed") or {}).items():
        row = " / ".join(f"{stage} {ratio_text(entry)}" for stage, entry in by_stage.items())
        lines.append(f"| speed against dense ({workload}) | {row} |")
    lines += [
        f"| recover | {summary['recover']} |",
        f"| wall time | {summary['wall_seconds']:.1f} s |",
        f"| output | `{summary['output_dir']}` |",
        "",
    ]
    for title, path in pictures.items():
        lines += [f"## {title}", "", f"![{title}]({_inline_png(path)})", ""]
    return "\n".join(lines)


def publish_summary(summary: dict, pictures: dict[str, Path], model_source: str, target: str) -> None:
    create_markdown_artifact(
        summary_markdown(summary, pictures, model_source, target),
        key=artifact_key(summary["pipeline"], "summary"),
        description=f"summary of run {summary['run_id']}",
    )
