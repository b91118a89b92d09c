"""The pruning flow: load -> calibrate -> score/search -> prune -> recover -> evaluate.

Only this process writes the catalog. Every stage is a cached task (see flows.keys); the search
resumes from the catalog, which is the source of truth for what an interrupted run already did.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger

from catalog import Catalog
from flows.keys import derive_run_id, identity_hash
from flows.outputs import check_owner, claim, run_dir, write_json
from flows.preflight import preflight
from flows.progress import SearchProgress
from flows.recorder import CatalogRecorder
from flows.stages import (
    calibrate_task,
    eval_data_task,
    evaluate_task,
    load_task,
    prune_task,
    recover_task,
    search_task,
)
from pipelines import PipelineSpec, load_spec
from tasks.evaluate import Evaluation
from tasks.refs import ArtifactRef


@dataclass
class RunOutcome:
    run_id: str
    pipeline: str
    output_dir: str
    catalog: str
    blocks: list[str]
    params_dense: int
    params_pruned: int
    params_removed_ratio: float
    perplexity: dict[str, dict[str, float]]
    checkpoint: str
    recover: str
    wall_seconds: float
    invocation_seconds: float = 0.0
    search: dict[str, int] = field(default_factory=dict)


def source_stamp(source: str) -> str:
    """Cheap change detector for local model sources (names, sizes, mtimes); the source string otherwise."""
    path = Path(source)
    if not path.exists():
        return source
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return source + "|" + ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _storage(out_dir: Path) -> Path:
    # Prefect takes a plain path as local result storage; results then live beside the run's outputs.
    return (out_dir / ".prefect-results").resolve()


def _with(task_fn, out_dir: Path, fresh: bool):
    return task_fn.with_options(result_storage=_storage(out_dir), refresh_cache=fresh or None)


def _record_evaluations(catalog: Catalog, run_id: str, evaluations: list[Evaluation]) -> None:
    for e in evaluations:
        catalog.add_evaluation(
            run_id, e.stage, e.kind, e.dataset, e.metric, e.value, n_tokens=e.n_tokens, seq_len=e.seq_len, stride=e.stride
        )


def _record_artifact(catalog: Catalog, run_id: str, stage: str, ref: ArtifactRef) -> None:
    catalog.add_artifact(run_id, stage, ref.kind, str(Path(ref.path).resolve()), ref.sha256, ref.bytes)


@flow(name="prune-pipeline", persist_result=False, log_prints=True)
def prune_pipeline_flow(spec: PipelineSpec, fresh: bool = False) -> dict:
    """Run (or resume) one pruning pipeline and return its summary."""
    started = time.perf_counter()
    logger = get_run_logger()
    out_dir = Path(spec.output_dir)
    identity = identity_hash(spec)
    catalog = Catalog(spec.catalog_path())
    check_owner(out_dir, spec.name, identity, _status_in(catalog, fresh))

    model = _with(load_task, out_dir, fresh)(spec, source_stamp(spec.model.source))
    calibration = _with(calibrate_task, out_dir, fresh)(spec, model, out_dir)
    eval_data = _with(eval_data_task, out_dir, fresh)(spec, model, out_dir)
    run_id = derive_run_id(spec, model.fingerprint, calibration.sha256)
    claim(out_dir, spec.name, identity, run_id)
    if fresh:
        catalog.delete_run(run_id)
    previous = catalog.get_run(run_id)
    catalog.start_run(
        run_id=run_id, pipeline=spec.name, spec_hash=identity, spec_json=spec.model_dump_json(),
        model_fingerprint=model.fingerprint, data_fingerprint=calibration.sha256,
        model_source=spec.model.source, output_dir=str(out_dir.resolve()),
    )
    logger.info(f"run {run_id} ({'resumed' if previous else 'new'}) of pipeline {spec.name}")
    _record_artifact(catalog, run_id, "calibrate", calibration)
    try:
        outcome = _search_and_after(spec, model, calibration, eval_data, run_id, catalog, fresh, logger)
    except BaseException:
        catalog.finish_run(run_id, "failed", wall_seconds=_wall(previous, started))
        raise
    outcome.wall_seconds = _wall(previous, started)
    outcome.invocation_seconds = time.perf_counter() - started
    summary = asdict(outcome)
    report = write_json(run_dir(out_dir, run_id) / "report.json", summary)
    _record_artifact(catalog, run_id, "pruned", ArtifactRef.of(report, "report"))
    catalog.finish_run(run_id, "completed", wall_seconds=outcome.wall_seconds, summary=summary)
    return summary


def _status_in(catalog: Catalog, fresh: bool):
    """Status of a run as the ownership check sees it (--fresh may abandon an unfinished run)."""

    def status(run_id: str) -> str | None:
        if fresh:
            return None
        row = catalog.get_run(run_id)
        return row.status if row else None

    return status


def _wall(previous, started: float) -> float:
    """Active time spent on this run over all its invocations (a resumed run adds to what it had)."""
    earlier = (previous.wall_seconds or 0.0) if previous is not None else 0.0
    return earlier + time.perf_counter() - started


def _search_and_after(spec, model, calibration, eval_data, run_id, catalog, fresh, logger) -> RunOutcome:
    out_dir = Path(spec.output_dir)
    recorder = CatalogRecorder(catalog, run_id, spec.score.metric)
    total_steps = getattr(spec.search.target, "blocks", None)
    progress = SearchProgress(total_steps, logger)
    result = _with(search_task, out_dir, fresh)(
        spec, model, calibration, run_id, str(spec.catalog_path().resolve()), recorder, progress
    )
    checkpoint = _with(prune_task, out_dir, fresh)(spec, model, result.blocks, run_dir(out_dir, run_id))
    _record_artifact(catalog, run_id, "pruned", checkpoint)
    recovered = recover_task(spec, checkpoint)
    recover_note = "none (recover.method: none; the pruned checkpoint is final)"
    evaluate = _with(evaluate_task, out_dir, fresh)
    dense = evaluate(spec, model.fingerprint, model.path, "dense", eval_data)
    pruned = evaluate(spec, checkpoint.sha256, checkpoint.path, "pruned", eval_data)
    _record_evaluations(catalog, run_id, [*dense, *pruned])
    ppl: dict[str, dict[str, float]] = {}
    for e in [*dense, *pruned]:
        if e.kind == "perplexity":
            ppl.setdefault(e.dataset, {})[e.stage] = e.value
    params = {e.stage: int(e.value) for e in [*dense, *pruned] if e.metric == "params"}
    return RunOutcome(
        run_id=run_id, pipeline=spec.name, output_dir=str(out_dir.resolve()),
        catalog=str(spec.catalog_path().resolve()), blocks=list(result.blocks),
        params_dense=params["dense"], params_pruned=params["pruned"],
        params_removed_ratio=1 - params["pruned"] / params["dense"],
        perplexity=ppl, checkpoint=str(Path(checkpoint.path).resolve()), recover=recover_note, wall_seconds=0.0,
        search={"evaluated": result.evaluated, "reused": result.reused, "unit_windows": result.unit_windows,
                "head_windows": result.head_windows, "stored_bytes": result.stored_bytes},
    )


def prune_pipeline(spec_or_path: PipelineSpec | str | os.PathLike, overrides: list[str] | None = None,
                   fresh: bool = False) -> dict:
    """Python entry point: a validated spec or a YAML path (with optional dotted overrides)."""
    spec = spec_or_path if isinstance(spec_or_path, PipelineSpec) else load_spec(spec_or_path, overrides)
    preflight(spec, fresh)
    return prune_pipeline_flow(spec, fresh=fresh)
