"""What a run shows in the Prefect UI: a progress artifact, a table per search step, a final summary."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from tasks.score import CandidateScore
from tasks.search import StepRecord


def artifact_key(*parts: str) -> str:
    """Prefect's rule: lowercase letters, digits and dashes."""
    key = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    return key[:100] or "pruneflow"


class TrainingProgress:
    """Recovery training as a Prefect progress artifact (updated about every 1% of the steps)."""

    def __init__(self, pipeline: str, method: str):
        self.progress_id = create_progress_artifact(
            0.0, key=artifact_key(pipeline, "recover-progress"), description=f"recovery training ({method})"
        )
        self.shown = 0.0

    def on_step(self, done: int, total: int, loss: float) -> None:
        percent = 100.0 * done / total
        if percent - self.shown >= 1.0 or done == total:
            update_progress_artifact(self.progress_id, percent, description=f"step {done}/{total}, loss {loss:.4f}")
            self.shown = percent


class SearchArtifacts:
    """Progress as candidates are scored, and each step's candidate table once it is chosen."""

    def __init__(self, pipeline: str, run_id: str, total: int | None):
        self.pipeline = pipeline
        self.run_id = run_id
        self.total = total
        self.done = 0
        self.progress_id = create_progress_artifact(
            0.0, key=artifact_key(pipeline, "search-progress"), description=f"search progress of run {run_id}"
        )
        self.steps: list[dict[str, CandidateScore]] = []

    def on_score(self, step: int, score: CandidateScore) -> None:
        self.done += 1
        if self.total:
            update_progress_artifact(self.progress_id, min(100.0, 100.0 * self.done / self.total))

    def on_step(self, step: int, scores: dict[str, CandidateScore], record: StepRecord) -> None:
        self.steps.append(dict(scores))
        rows = [
            {"block": s.block, "score": round(s.value, 5), "bound": "exact" if s.exact else "lower bound",
             "tokens": s.n_tokens, "seconds": round(s.seconds, 3), "removed": s.block == record.block}
            for s in sorted(scores.values(), key=lambda s: s.value)
        ]
        create_table_artifact(
            rows, key=artifact_key(self.pipeline, "step", str(step)),
            description=f"step {step}: removed {record.block} ({record.params_remaining:,} params remain)",
        )

    def finish(self) -> None:
        update_progress_artifact(self.progress_id, 100.0)


def _inline_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def summary_markdown(summary: dict, pictures: dict[str, Path], model_source: str, target: str) -> str:
    lines = [
        f"# pruneflow: {summary['pipeline']}",
        "",
        "| | |",
        "| --- | --- |",
        f"| run | `{summary['run_id']}` |",
        f"| model | `{model_source}` |",
        f"| target | {target} |",
        f"| blocks removed (in order) | {', '.join(f'`{b}`' for b in summary['blocks'])} |",
        f"| parameters | {summary['params_dense']:,} → {summary['params_pruned']:,} "
        f"({100 * summary['params_removed_ratio']:.2f}% removed) |",
    ]
    for dataset, values in summary["perplexity"].items():
        row = " / ".join(f"{stage} {value:.3f}" for stage, value in values.items())
        lines.append(f"| perplexity ({Path(dataset).name}) | {row} |")
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
