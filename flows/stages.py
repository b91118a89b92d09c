"""Prefect task wrappers: each stage a cached task keyed by flows.keys, results kept in the output folder."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from flows.keys import cache_key_fn
from pipelines.spec import PipelineSpec
from tasks.calibrate import EvalData, calibrate_stage, eval_data_stage
from tasks.evaluate import evaluate_stage
from tasks.evaluation import Evaluation
from tasks.load import ModelRef, load_stage
from tasks.prune import prune_stage
from tasks.recover.stage import Recovered, recover_stage
from tasks.refs import ArtifactRef
from tasks.search.stage import SearchResult, search_stage

_COMMON = dict(persist_result=True, retries=0)


@task(name="load", cache_key_fn=cache_key_fn("load"), **_COMMON)
def load_task(spec: PipelineSpec, source_stamp: str) -> ModelRef:
    return load_stage(spec)


@task(name="calibrate", cache_key_fn=cache_key_fn("calibrate"), **_COMMON)
def calibrate_task(spec: PipelineSpec, model: ModelRef, out_dir: Path) -> ArtifactRef:
    from flows.keys import stage_key

    key = stage_key("calibrate", spec, {"model": model})
    return calibrate_stage(model.path, spec.calibration, out_dir, key)


@task(name="eval-data", cache_key_fn=cache_key_fn("eval-data"), **_COMMON)
def eval_data_task(spec: PipelineSpec, model: ModelRef, out_dir: Path) -> list[EvalData]:
    from flows.keys import stage_key

    key = stage_key("eval-data", spec, {"model": model})
    return eval_data_stage(model.path, spec.evaluate, out_dir, key)


@task(name="search", cache_key_fn=cache_key_fn("search"), **_COMMON)
def search_task(
    spec: PipelineSpec, model: ModelRef, calibration: ArtifactRef, run_id: str, catalog_path: str, recorder, progress
) -> SearchResult:
    return search_stage(
        model.path, calibration, spec, recorder, on_step=progress.on_step, on_score=progress.on_score
    )


@task(name="prune", cache_key_fn=cache_key_fn("prune"), **_COMMON)
def prune_task(spec: PipelineSpec, model: ModelRef, blocks: tuple[str, ...], out_dir: Path) -> ArtifactRef:
    return prune_stage(model.path, blocks, spec, out_dir)


@task(name="recover", cache_key_fn=cache_key_fn("recover"), **_COMMON)
def recover_task(spec: PipelineSpec, model: ModelRef, checkpoint: ArtifactRef, calibration: ArtifactRef,
                 out_dir: Path) -> Recovered:
    from flows.keys import stage_key
    from prefect import get_run_logger

    from flows.ui import TrainingProgress

    key = stage_key("recover", spec, {"model": model, "checkpoint": checkpoint, "calibration": calibration})
    progress = TrainingProgress(spec.name, spec.recover.method)
    return recover_stage(checkpoint.path, model.path, calibration, spec, out_dir, key, log=get_run_logger().info,
                         on_step=progress.on_step)


@task(name="evaluate", cache_key_fn=cache_key_fn("evaluate"), **_COMMON)
def evaluate_task(spec: PipelineSpec, checkpoint_sha: str, checkpoint_path: str, stage: str,
                  data: list[EvalData]) -> list[Evaluation]:
    return evaluate_stage(checkpoint_path, stage, data, spec)
