"""Prefect task wrappers: each stage a cached task keyed by flows.keys, results kept in the output folder.

Every task takes the spec sections its stage reads, as typed parameters (never the whole spec): its
cache key is built from exactly those, so a setting a stage reads cannot be left out of its key.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from flows.keys import cache_key_fn, stage_key
from flows.progress import CountProgress, Parts
from flows.ui import artifact_key
from tasks.calibrate import CalibrationSpec, EvalData, calibrate_stage, eval_data_stage
from tasks.evaluate import calibration_trajectory, evaluate_stage
from tasks.evaluation import EvaluateSpec, Evaluation
from tasks.execution import ExecutionSpec
from tasks.load import ModelRef, ModelSpec, load_stage, resolve_device, resolve_dtype
from tasks.prune import PruneSpec, prune_stage
from tasks.recover_stage import Recovered, recover_stage
from tasks.refs import ArtifactRef
from tasks.search.settings import ScoreSection, SearchSection
from tasks.search_stage import SearchResult, SearchSections, search_stage
from tasks.speed_stage import speed_stage, streamed_stages
from tasks.settings import Settings
from tasks.width_stage import WidthResult, WidthSpec, width_stage

_COMMON = dict(persist_result=True, retries=0)
# Task bodies run only when their result is not cached: counting them tells the flow whether an
# invocation did any work (a cached re-run of a completed run adds nothing to its wall time).
_executions = [0]


def _executed() -> None:
    _executions[0] += 1


def stage_executions() -> int:
    """How many stage bodies this process has run so far."""
    return _executions[0]


@task(name="load", cache_key_fn=cache_key_fn("load"), **_COMMON)
def load_task(model_spec: ModelSpec, score: ScoreSection, search: SearchSection, source_stamp: str,
              pipeline: str) -> ModelRef:
    _executed()
    return load_stage(model_spec, score, search, Parts("load", artifact_key(pipeline, "load-progress")).update)


@task(name="calibrate", cache_key_fn=cache_key_fn("calibrate"), **_COMMON)
def calibrate_task(calibration: CalibrationSpec, model: ModelRef, out_dir: Path, pipeline: str) -> ArtifactRef:
    _executed()
    key = stage_key("calibrate", dict(locals()))  # the task's own cache key: exactly its parameters
    parts = Parts("calibrate", artifact_key(pipeline, "calibrate-progress"))
    def on_documents(source: str, done: int, total: int) -> None:
        parts.update(f"tokenizing {Path(source).name}", done, total, "documents")

    return calibrate_stage(model.path, calibration, out_dir, key, model.trust_remote_code, on_documents)


@task(name="eval-data", cache_key_fn=cache_key_fn("eval-data"), **_COMMON)
def eval_data_task(datasets: tuple[str, ...], seq_len: int, max_tokens: int, model: ModelRef,
                   out_dir: Path) -> list[EvalData]:
    _executed()
    key = stage_key("eval-data", dict(locals()))
    return eval_data_stage(model.path, datasets, seq_len, max_tokens, out_dir, key, model.trust_remote_code)


@task(name="search", cache_key_fn=cache_key_fn("search"), **_COMMON)
def search_task(sections: SearchSections, model: ModelRef, calibration: ArtifactRef, run_id: str,
                catalog_path: str, recorder, progress, execution: ExecutionSpec) -> SearchResult:
    _executed()
    from prefect import get_run_logger

    return search_stage(model.path, calibration, sections, recorder, execution,
                        on_step=progress.on_step, on_score=progress.on_score, log=get_run_logger().info)


@task(name="width", cache_key_fn=cache_key_fn("width"), **_COMMON)
def width_task(width: WidthSpec, model_spec: ModelSpec, batch_windows: int, model: ModelRef,
               calibration: ArtifactRef, blocks: tuple[str, ...], out_dir: Path, pipeline: str) -> WidthResult:
    _executed()
    progress = CountProgress(f"width ({width.strategy})", "units" if width.scores_units else "steps",
                             artifact_key(pipeline, "width-progress"))
    parts = Parts("width", artifact_key(pipeline, "width-progress"))
    return width_stage(model.path, calibration, blocks, model_spec, width, batch_windows, out_dir,
                       on_unit=lambda done, total, detail="": progress.update(done, total, detail),
                       on_windows=lambda what, done, total: parts.update(what, done, total, "windows"))


@task(name="prune", cache_key_fn=cache_key_fn("prune"), **_COMMON)
def prune_task(model_spec: ModelSpec, prune: PruneSpec, model: ModelRef, blocks: tuple[str, ...],
               out_dir: Path, pipeline: str, plan_json: str | None = None,
               width_weights: ArtifactRef | None = None) -> ArtifactRef:
    _executed()
    return prune_stage(model.path, blocks, model_spec, prune, out_dir, plan_json, width_weights,
                       Parts("prune", artifact_key(pipeline, "prune-progress")).update)


@task(name="recover", cache_key_fn=cache_key_fn("recover"), **_COMMON)
def recover_task(recover: Settings, model_spec: ModelSpec, batch_windows: int, prune_format: str, model: ModelRef,
                 checkpoint: ArtifactRef, calibration: ArtifactRef, out_dir: Path, pipeline: str) -> Recovered:
    _executed()
    key = stage_key("recover", dict(locals()))  # before anything else is bound in this scope
    from prefect import get_run_logger

    progress = CountProgress(f"recover ({recover.method})", "steps", artifact_key(pipeline, "recover-progress"))
    return recover_stage(checkpoint.path, model.path, calibration, recover, model_spec, batch_windows, prune_format,
                         out_dir, key, log=get_run_logger().info,
                         on_step=lambda done, total, loss: progress.update(done, total, f"loss {loss:.4f}"),
                         progress=Parts("recover", artifact_key(pipeline, "recover-progress")).update)


@task(name="evaluate", cache_key_fn=cache_key_fn("evaluate"), **_COMMON)
def evaluate_task(model_spec: ModelSpec, batch_windows: int, evaluate: EvaluateSpec, checkpoint_sha: str,
                  checkpoint_path: str, stage: str, data: list[EvalData], pipeline: str) -> list[Evaluation]:
    _executed()
    bars = {item.dataset: CountProgress(f"evaluate {stage}: {Path(item.dataset).name}", "windows",
                                        artifact_key(pipeline, "evaluate-progress")) for item in data}
    tasks = Parts(f"evaluate {stage}", artifact_key(pipeline, "evaluate-progress"))
    return evaluate_stage(checkpoint_path, stage, data, model_spec, batch_windows, evaluate,
                          on_window=lambda dataset, done, total: bars[dataset].update(done, total),
                          on_requests=lambda task, done, total: tasks.update(f"task {task}", done, total, "requests"))


@task(name="speed", cache_key_fn=cache_key_fn("speed"), **_COMMON)
def speed_task(model_spec: ModelSpec, checkpoints: dict[str, str], checkpoint_paths: dict[str, str],
               pipeline: str) -> list[Evaluation]:
    """`checkpoints`: stage -> sha256 (the key), `checkpoint_paths`: stage -> folder; timed side by side."""
    _executed()
    device = resolve_device(model_spec.device)
    progress = CountProgress(f"speed ({', '.join(checkpoint_paths)})", "timed runs",
                             artifact_key(pipeline, "speed-progress"))
    from prefect import get_run_logger

    dtype = resolve_dtype(model_spec.dtype, device)
    for stage, why in streamed_stages(checkpoint_paths, dtype, device, model_spec.memory_budget_gb).items():
        get_run_logger().warning(f"speed of the {stage} model: {why}")
    return speed_stage(checkpoint_paths, dtype, device, model_spec.trust_remote_code,
                       on_run=progress.update, memory_budget=model_spec.memory_budget_gb)


@task(name="calibration-trajectory", cache_key_fn=cache_key_fn("calibration-trajectory"), **_COMMON)
def trajectory_task(model_spec: ModelSpec, batch_windows: int, model: ModelRef, calibration: ArtifactRef,
                    blocks: tuple[str, ...], pipeline: str) -> tuple[float, ...]:
    _executed()
    progress = CountProgress(f"calibration perplexity, dense and after each of {len(blocks)} removals", "windows",
                             artifact_key(pipeline, "trajectory-progress"))
    return calibration_trajectory(model.path, model_spec, calibration, blocks, batch_windows,
                                  on_windows=progress.update)
