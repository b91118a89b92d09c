"""The pruning flow: load -> calibrate -> score/search -> prune -> recover -> evaluate.

Only this process writes the catalog. Every stage is a cached task (see flows.keys); the search
resumes from the catalog, which is the source of truth for what an interrupted run already did.
"""


import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, tags
from prefect.exceptions import TerminationSignal
from prefect.runtime import deployment, flow_run

from catalog import Catalog
from catalog.speed import speed_summary
from flows.keys import derive_run_id, identity_hash
from flows.locks import exclusive, folder_lock, run_lock
from flows.outputs import check_owner, claim, run_dir, sweep_temporaries, write_json
from flows.preflight import preflight
from flows.plots import (domain_weights, mask_training, perplexity_curve, reconstruction_errors, score_heatmap,
                         scores_by_step, width_importance)
from flows.progress import Fanout, SearchProgress
from flows.ui import StepTables, artifact_key, publish_summary
from flows.recorder import CatalogRecorder, WallClock
from flows.report import format_outcome, markdown_report
from flows.stages import (
    calibrate_task,
    eval_data_task,
    evaluate_task,
    load_task,
    prune_task,
    recover_task,
    search_task,
    speed_task,
    stage_executions,
    trajectory_task,
    width_task,
)
from flows.temporary_server import prefect_api
from pipelines import PipelineSpec, load_spec
from tasks.errors import DiskFull, is_disk_full
from tasks.evaluation import Evaluation
from tasks.recover_stage import Recovered
from tasks.refs import ArtifactRef
from tasks.score import METRICS
from tasks.search.registry import expected_candidates
from tasks.search_stage import SearchResult, SearchSections
from tasks.width_stage import WidthResult
from tasks.surgery.width import WidthPlan


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
    model: str = ""
    recovery: dict | None = None
    invocation_seconds: float = 0.0
    search: dict[str, int | str] = field(default_factory=dict)
    pictures: dict[str, str] = field(default_factory=dict)
    # Width pruning: the metric, the target shape and, per present layer, its widths and parameters.
    width: dict | None = None
    # Per `<workload> <metric>`, each compared stage's speed against dense (catalog.speed.speed_summary).
    speed: dict[str, dict[str, dict]] = field(default_factory=dict)


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
            run_id, e.stage, e.kind, e.dataset, e.metric, e.value, n_tokens=e.n_tokens, seq_len=e.seq_len, stride=e.stride,
            n_samples=e.n_samples,
        )


def _record_artifact(catalog: Catalog, run_id: str, stage: str, ref: ArtifactRef) -> None:
    catalog.add_artifact(run_id, stage, ref.kind, str(Path(ref.path).resolve()), ref.sha256, ref.bytes)


def target_text(spec: PipelineSpec) -> str:
    target = spec.search.target
    text = f"{target.blocks} blocks" if hasattr(target, "blocks") else f"{100 * target.params_ratio:g}% params"
    if spec.width is not None and spec.width.shape is not None:
        text += " + width " + "/".join(f"{v}" for v in spec.width.shape.model_dump(exclude_none=True).values())
    elif spec.width is not None:
        text += f" + width to {100 * spec.width.params_ratio:g}% params"
    return text


DEPLOYMENT_TAGS = ("pruneflow",)
# Tags computed from a run's parameters: a deployment must not carry them, or a run whose parameters were
# changed in the UI would show the deployment's values.
_PARAMETER_TAGS = ("pipeline:", "model:", "target:", "granularity:", "strategy:", "metric:")


def run_tags(spec: PipelineSpec) -> list[str]:
    return [*DEPLOYMENT_TAGS, f"pipeline:{spec.name}", f"model:{spec.model.source}",
            f"target:{target_text(spec).replace(' ', '-')}", f"granularity:{spec.score.granularity}",
            f"strategy:{spec.search.strategy}", f"metric:{spec.score.metric}"]


def _tag_flow_run(spec: PipelineSpec) -> None:
    """Give the running flow run the tags of the spec it was given (deployment runs are created with the
    deployment's tags, which know nothing of parameters changed in the UI)."""
    from prefect.client.orchestration import get_client

    run_id = flow_run.get_id()
    if run_id is None:
        return
    kept = [t for t in flow_run.get_tags() if not t.startswith(_PARAMETER_TAGS)]
    wanted = list(dict.fromkeys([*kept, *run_tags(spec)]))
    with get_client(sync_client=True) as client:
        client.update_flow_run(run_id, tags=wanted)


def _run_name() -> str:
    spec = flow_run.parameters.get("spec")
    if isinstance(spec, dict):
        spec = PipelineSpec.model_validate(spec)
    if not isinstance(spec, PipelineSpec):
        return "prune-pipeline"
    model = spec.model.source.removeprefix("builtin:").rstrip("/").split("/")[-1]
    return f"{spec.name} | {model} | -{target_text(spec)}"


@flow(name="prune-pipeline", persist_result=False, log_prints=True, flow_run_name=_run_name)
def prune_pipeline_flow(spec: PipelineSpec, fresh: bool = False) -> dict:
    """Run (or resume) one pruning pipeline and return its summary.

    Args:
        spec: The pipeline, as its YAML file says; every field is validated before the run starts.
        fresh: Discard this run's catalog rows and cached stage results, and start over.
    """
    started = time.perf_counter()
    logger = get_run_logger()
    _tag_flow_run(spec)
    out_dir = Path(spec.output_dir)
    identity = identity_hash(spec)
    catalog = Catalog(spec.catalog_path())
    check_owner(out_dir, spec.name, identity, _status_in(catalog, fresh))
    with exclusive(folder_lock(out_dir), f"output_dir {out_dir}"):
        swept = sweep_temporaries(out_dir)
        if swept:
            logger.info(f"removed {len(swept)} temporary file(s) an interrupted run left: {', '.join(p.name for p in swept)}")
        executions = stage_executions()
        model = _with(load_task, out_dir, fresh)(spec.model, spec.score, spec.search, source_stamp(spec.model.source),
                                                 spec.name)
        calibration = _with(calibrate_task, out_dir, fresh)(spec.calibration, model, out_dir, spec.name)
        eval_data = _with(eval_data_task, out_dir, fresh)(spec.evaluate.datasets, spec.evaluate.seq_len,
                                                         spec.evaluate.max_tokens, model, out_dir)
        run_id = derive_run_id(spec, model.fingerprint, calibration.sha256)
        with exclusive(run_lock(spec.catalog_path(), run_id), f"run {run_id}"):
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
            try:
                return _record_run(spec, model, calibration, eval_data, run_id, catalog, fresh, logger, started,
                                   lambda: _wall(previous, started, stage_executions() > executions))
            except BaseException as exc:
                catalog.finish_run(run_id, "failed", wall_seconds=_wall(previous, started, True),
                                   summary={"failure": _failure_reason(exc)})
                if isinstance(exc, TerminationSignal):  # Prefect then ends the process by the same signal
                    logger.warning(f"run {run_id} {_failure_reason(exc)}: marked failed; start it again to resume")
                if is_disk_full(exc) and not isinstance(exc, DiskFull):
                    raise DiskFull(f"no space left on the device while writing run {run_id} (output_dir "
                                   f"{out_dir}, catalog {spec.catalog_path()}); free some space and run again: "
                                   "the run resumes") from exc
                raise


def _failure_reason(exc: BaseException) -> str:
    """What `runs` and `show` can say about a failed run: the signal that stopped it, or the error's type
    and first line."""
    if isinstance(exc, TerminationSignal):
        return f"stopped by {signal.Signals(exc.signal).name}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:500] if text else 'interrupted'}"


def _record_run(spec, model, calibration, eval_data, run_id, catalog, fresh, logger, started: float, wall) -> dict:
    """Everything after the run is started: search, prune, recover, evaluate, reports; completes the run."""
    out_dir = Path(spec.output_dir)
    _record_artifact(catalog, run_id, "calibrate", calibration)
    outcome = _search_and_after(spec, model, calibration, eval_data, run_id, catalog, fresh, logger,
                                WallClock(catalog, run_id, wall))
    outcome.wall_seconds = wall()
    outcome.invocation_seconds = time.perf_counter() - started
    summary = asdict(outcome)
    folder = run_dir(out_dir, run_id)
    report = write_json(folder / "report.json", summary)
    report_md = folder / "report.md"
    report_md.write_text(markdown_report(summary, catalog.steps(run_id), catalog.evaluations(run_id), folder))
    titles = {"plot-scores": "Score per block over search steps",
              "plot-perplexity": "Perplexity against parameters removed",
              "plot-width": "Channel importance per layer and the width kept",
              "plot-reconstruction": "Reconstruction error per unit after each stage of the width strategy",
              "plot-domains": "Dynamic batch loading: domain weights and losses over training",
              "plot-masks": "Learned masks: loss and expected sizes per step"}
    publish_summary(summary, {titles[kind]: Path(path) for kind, path in outcome.pictures.items()},
                    spec.model.source, target_text(spec))
    _record_artifact(catalog, run_id, "pruned", ArtifactRef.of(report, "report"))
    _record_artifact(catalog, run_id, "pruned", ArtifactRef.of(report_md, "report-md"))
    catalog.finish_run(run_id, "completed", wall_seconds=outcome.wall_seconds, summary=summary)
    if deployment.get_id():  # a worker's log; `pruneflow run` prints it on stdout instead
        logger.info("summary of the run\n" + format_outcome(summary))
    return summary


def _status_in(catalog: Catalog, fresh: bool):
    """Status of a run as the ownership check sees it (--fresh may abandon an unfinished run)."""

    def status(run_id: str) -> str | None:
        if fresh:
            return None
        row = catalog.get_run(run_id)
        return row.status if row else None

    return status


def _wall(previous, started: float, worked: bool) -> float:
    """Active time spent on this run over all its invocations: a resumed run adds to what it had; an
    invocation of a completed run that found every stage cached did no work on it and adds nothing."""
    earlier = (previous.wall_seconds or 0.0) if previous is not None else 0.0
    if previous is not None and previous.status == "completed" and not worked:
        return earlier
    return earlier + time.perf_counter() - started


def _search_and_after(spec, model, calibration, eval_data, run_id, catalog, fresh, logger,
                      clock: WallClock) -> RunOutcome:
    out_dir = Path(spec.output_dir)
    recorder = CatalogRecorder(catalog, run_id, spec.score.metric)
    progress = Fanout(_search_progress(spec, model.num_layers, catalog, run_id, logger), StepTables(spec.name), clock)
    sections = SearchSections(model=spec.model, score=spec.score, search=spec.search)
    if getattr(spec.search.target, "blocks", None) == 0:  # width pruning alone: no depth search to run
        result = SearchResult.nothing_removed(model.params)
    else:
        result = _with(search_task, out_dir, fresh)(
            sections, model, calibration, run_id, str(spec.catalog_path().resolve()), recorder, progress,
            spec.execution
        )
    folder = run_dir(out_dir, run_id)
    width = None if spec.width is None else _width(spec, model, calibration, result.blocks, run_id, catalog, fresh,
                                                   clock, folder)
    blocks = tuple(result.blocks) + (() if width is None else width.blocks)
    checkpoint = _with(prune_task, out_dir, fresh)(spec.model, spec.prune, model, blocks, folder, spec.name,
                                                   None if width is None else width.plan_json,
                                                   None if width is None else width.weights)
    _record_artifact(catalog, run_id, "pruned", checkpoint)
    clock.tick()
    recovered = None
    if spec.recover.method != "none":
        recovered = _with(recover_task, out_dir, fresh)(spec.recover, spec.model, spec.score.batch_windows,
                                                        spec.prune.format, model, checkpoint, calibration, folder,
                                                        spec.name)
        _record_artifact(catalog, run_id, "recovered", recovered.checkpoint)
        clock.tick()

    def evaluate(sha: str, path: str, stage: str) -> list[Evaluation]:
        rows = _with(evaluate_task, out_dir, fresh)(spec.model, spec.score.batch_windows, spec.evaluate, sha, path,
                                                    stage, eval_data, spec.name)
        clock.tick()
        return rows

    compared = {"dense": (model.fingerprint, model.path), "pruned": (checkpoint.sha256, checkpoint.path)}
    if recovered is not None:
        compared["recovered"] = (recovered.checkpoint.sha256, recovered.checkpoint.path)
    evaluations = [row for stage, (sha, path) in compared.items() for row in evaluate(sha, path, stage)]
    # After the evaluate rows: a stage result cached by an earlier release holds speed rows of its own, which
    # these (same names) replace in the catalog.
    speed = _with(speed_task, out_dir, fresh)(spec.model, {s: sha for s, (sha, _) in compared.items()},
                                              {s: path for s, (_, path) in compared.items()}, spec.name)
    clock.tick()
    _record_evaluations(catalog, run_id, evaluations + speed)
    outcome = _outcome(spec, run_id, result, width, checkpoint, recovered, evaluations)
    outcome.speed = speed_summary(speed)
    ppl = outcome.perplexity
    trajectory = _with(trajectory_task, out_dir, fresh)(spec.model, spec.score.batch_windows, model, calibration,
                                                        tuple(result.blocks), spec.name)
    final = outcome.params_removed_ratio if width is not None else None
    outcome.pictures = {k: str(v) for k, v in _pictures(spec, catalog, run_id, result, ppl, trajectory, final,
                                                                          width, recovered).items()}
    for kind, path in outcome.pictures.items():
        _record_artifact(catalog, run_id, "evaluate", ArtifactRef.of(Path(path), kind))
    return outcome


def _outcome(spec: PipelineSpec, run_id: str, result: SearchResult, width: WidthResult | None,
             checkpoint: ArtifactRef, recovered: Recovered | None, evaluations: list[Evaluation]) -> RunOutcome:
    ppl: dict[str, dict[str, float]] = {}
    for e in evaluations:
        if e.kind == "perplexity":
            ppl.setdefault(e.dataset, {})[e.stage] = e.value
    params = {e.stage: int(e.value) for e in evaluations if e.metric == "params"}
    return RunOutcome(
        run_id=run_id, pipeline=spec.name, output_dir=str(Path(spec.output_dir).resolve()),
        catalog=str(spec.catalog_path().resolve()), blocks=list(result.blocks),
        params_dense=params["dense"], params_pruned=params["pruned"],
        params_removed_ratio=1 - params["pruned"] / params["dense"],
        perplexity=ppl, checkpoint=str(Path(checkpoint.path).resolve()), recover=_recover_note(recovered),
        wall_seconds=0.0, model=spec.model.source, recovery=_recovery_summary(recovered),
        search={"evaluated": result.evaluated, "reused": result.reused, "unit_windows": result.unit_windows,
                "head_windows": result.head_windows, "stored_bytes": result.stored_bytes, "mode": result.mode,
                "mode_reason": result.mode_reason},
        width=None if width is None else width.summary(spec.width),
    )


def _width(spec: PipelineSpec, model, calibration, blocks, run_id: str, catalog: Catalog, fresh: bool,
           clock: WallClock, folder: Path) -> WidthResult:
    """The width stage on what the search left; its unit scores (and tried shapes), reconstruction errors,
    weights and plan to the catalog."""
    width = _with(width_task, Path(spec.output_dir), fresh)(spec.width, spec.model, spec.score.batch_windows, model,
                                                            calibration, blocks, folder, spec.name)
    catalog.add_unit_scores(run_id, spec.width.scored_by, width.units)
    catalog.add_unit_scores(run_id, "calibration_perplexity", width.tried)
    for metric, rows in width.error_rows().items():
        catalog.add_unit_scores(run_id, metric, rows)
    if width.weights is not None:
        _record_artifact(catalog, run_id, "width", width.weights)
    catalog.set_plan(run_id, width.plan_json)
    clock.tick()
    return width


def _search_progress(spec: PipelineSpec, num_layers: int, catalog: Catalog, run_id: str, logger) -> SearchProgress:
    """Totals from the strategy's registered count (`expected=`) over the search's own candidate rules."""
    search = spec.search
    first = len(search.rules(range(num_layers), spec.score.granularity).candidates([]))
    steps = getattr(search.target, "blocks", None)
    settings = search.strategy_section()

    def per_step(step: int) -> int:
        before = expected_candidates(search.strategy, first, step, settings) if step else 0
        return expected_candidates(search.strategy, first, step + 1, settings) - before

    known: dict[int, int] = {}
    for row in catalog.scores(run_id):
        known[row.step] = known.get(row.step, 0) + 1
    return SearchProgress(per_step, expected_candidates(search.strategy, first, steps, settings), steps,
                          METRICS.lookup(spec.score.metric).remove == "lowest",
                          key=artifact_key(spec.name, "search-progress"), known=known, logger=logger)


def _recover_note(recovered: Recovered | None) -> str:
    if recovered is None:
        return "none (recover.method: none; the pruned checkpoint is final)"
    return f"{recovered.method} -> {Path(recovered.checkpoint.path).resolve()} ({recovered.seconds:.1f} s)"


def _recovery_summary(recovered: Recovered | None) -> dict | None:
    if recovered is None:
        return None
    return {
        "method": recovered.method, "checkpoint": str(Path(recovered.checkpoint.path).resolve()),
        "format": recovered.format, "seconds": recovered.seconds, "losses": list(recovered.losses),
        "fit": dict(recovered.fit), "trainable_params": recovered.trainable_params,
        "resumed_from_step": recovered.resumed_from_step, "domains": list(recovered.domains),
    }


def _pictures(spec, catalog: Catalog, run_id: str, result, ppl: dict, trajectory: tuple[float, ...],
              final_removed: float | None, width: WidthResult | None = None,
              recovered: Recovered | None = None) -> dict[str, Path]:
    folder = run_dir(Path(spec.output_dir), run_id)
    steps, removed = scores_by_step(catalog, run_id)
    removed_ratio = [0.0, *(1 - p / result.dense_params for p in result.params_remaining)]
    evals = {d: v for d, v in ppl.items() if "dense" in v and "pruned" in v}
    lowest_first = METRICS.lookup(spec.score.metric).remove == "lowest"
    pictures = {"plot-perplexity": perplexity_curve(removed_ratio, list(trajectory), evals,
                                                    folder / "perplexity_vs_params.png", final_removed)}
    if steps:  # width pruning alone has no search steps
        # A race with the ppl objective stores each leaver's gap in log-perplexity per token (per parameter
        # with ppl_per_param, which the picture's scale cannot show).
        paired = spec.search.objective in (None, "ppl")
        pictures["plot-scores"] = score_heatmap(steps, removed, folder / "scores_per_block.png", spec.score.metric,
                                                lowest_first, paired)
    plan = catalog.plan(run_id)
    if plan is not None:
        pictures["plot-width"] = width_importance(*_channel_scores(catalog, run_id, WidthPlan.from_json(plan)),
                                                  folder / "width_importance.png")
    if recovered is not None and recovered.domains:
        pictures["plot-domains"] = domain_weights(list(recovered.domains), folder / "domain_weights.png")
    if width is not None and width.trace:
        pictures["plot-masks"] = mask_training(list(width.trace), folder / "mask_training.png")
    if width is not None and width.errors:
        pictures["plot-reconstruction"] = reconstruction_errors(width.reconstruction(),
                                                                folder / "reconstruction_errors.png")
    return pictures


def _channel_scores(catalog: Catalog, run_id: str, plan: WidthPlan) -> tuple[dict[int, list[float]], dict[int, int]]:
    channels: dict[int, list[float]] = {}
    for unit, _metric, value in catalog.unit_scores(run_id):
        parts = unit.split(".")
        if parts[2:4] == ["mlp", "channel"]:
            channels.setdefault(int(parts[1]), []).append(value)
    kept = {lid: len(layer.channels) for lid, layer in plan.layers.items() if layer.channels}
    return channels, kept


def prune_pipeline(spec_or_path: PipelineSpec | str | os.PathLike, overrides: list[str] | None = None,
                   fresh: bool = False) -> dict:
    """Python entry point: a validated spec or a YAML path (with optional dotted overrides)."""
    spec = spec_or_path if isinstance(spec_or_path, PipelineSpec) else load_spec(spec_or_path, overrides)
    preflight(spec, fresh)
    with prefect_api(), tags(*run_tags(spec)):
        return prune_pipeline_flow(spec, fresh=fresh)
