"""The Dask side: a cluster for the run (local, or an existing scheduler) and one Prefect task per shard.

Shards go out through prefect-dask's client, so each is a Prefect task run (`score-shard`, named by
step and shard) nested under the flow's `search` task in the UI. The flow process only combines and
records: workers read the model and the calibration windows from the paths the flow gives them.

Faults: each shard has a home worker, so its entry states are reused from step to step. A worker
that dies mid-task (crash, OOM kill, lost node) is noticed by the Dask scheduler, which runs the task
again on another worker (`allow_other_workers`; Dask gives up after `distributed.scheduler.
allowed-failures` deaths of the same task, 3 by default); the flow waits for every shard before it
reports anything, so a step's result is the same and the catalog never holds part of a step.
"""

from __future__ import annotations

import math
import pickle
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.distributed.scorer import DistributedScorer
from tasks.distributed.shards import Shard, ShardResult, shard_layout
from tasks.distributed.worker import ShardJob, score_shard
from tasks.execution import ExecutionSpec
from tasks.load import ModelSpec
from tasks.refs import ArtifactRef
from tasks.score.racing import RacingOptions, Racer
from tasks.search.settings import ScoreSection

# How long to wait for an existing scheduler to have at least one worker.
WORKER_WAIT_SECONDS = 120


@task(name="score-shard", task_run_name="{label}", cache_policy=NO_CACHE, persist_result=False, retries=0)
def score_shard_task(job: ShardJob, label: str) -> ShardResult:
    return score_shard(job)


@dataclass
class RoundStats:
    """One backend call: what went over the wire as our payload (pickled jobs out, results back)."""

    candidates: int
    bound: float
    seconds: float
    bytes_sent: int
    bytes_received: int
    workers: list[str]
    shard_seconds: list[float]  # each shard's job on its worker


@dataclass
class DaskShardBackend:
    """Sends a step's candidates to every shard and waits for all of them."""

    client: object  # prefect_dask.client.PrefectDaskClient
    template: ShardJob  # the run's settings; shard, candidates and bound are filled per call
    shards: list[Shard]
    home: dict[int, str] = field(default_factory=dict)
    rounds: list[RoundStats] = field(default_factory=list)

    def _homes(self) -> dict[int, str]:
        alive = sorted(self.client.scheduler_info()["workers"])
        if not alive:
            raise RuntimeError("the Dask cluster has no workers left; start some and run again (the run resumes)")
        for shard in self.shards:
            if self.home.get(shard.index) not in alive:
                load = {w: sum(1 for h in self.home.values() if h == w) for w in alive}
                self.home[shard.index] = min(alive, key=lambda w: (load[w], alive.index(w)))
        return self.home

    def run(self, removed: tuple[str, ...], candidates: tuple[str, ...], bound: float,
            batches: tuple[int, ...] = ()) -> list[ShardResult]:
        start = time.perf_counter()
        homes = self._homes()
        with _portable_task_context():
            futures, sent = self._submit(homes, removed, candidates, bound, batches)
        results = [f.result() for f in futures]
        self.rounds.append(RoundStats(
            candidates=len(candidates), bound=bound, seconds=time.perf_counter() - start, bytes_sent=sent,
            bytes_received=sum(len(pickle.dumps(r)) for r in results), workers=[r.worker for r in results],
            shard_seconds=[r.seconds for r in results],
        ))
        return results

    def _submit(self, homes: dict[int, str], removed: tuple[str, ...], candidates: tuple[str, ...], bound: float,
                batches: tuple[int, ...]):
        from dataclasses import replace

        from prefect_dask.task_runners import PrefectDaskFuture

        futures, sent = [], 0
        for shard in self.shards:
            own = tuple(b for b in batches if shard.first_batch <= b < shard.stop_batch)
            if batches and not own:
                continue  # a race's round holds none of this shard's windows
            job = replace(self.template, shard=shard.index, first_batch=shard.first_batch,
                          stop_batch=shard.stop_batch, removed=removed, candidates=candidates, bound=bound,
                          batches=own)
            sent += len(pickle.dumps(job))
            label = (f"score-shard {shard.index + 1}/{len(self.shards)} | {len(removed)} removed | "
                     f"{len(candidates)} candidates" + ("" if bound == math.inf else " | bounded")
                     + (f" | race round of {len(own)} batches" if own else ""))
            future = self.client.submit(
                score_shard_task, parameters={"job": job, "label": label}, return_type="state",
                workers=[homes[shard.index]], allow_other_workers=True, pure=False,
            )
            futures.append(PrefectDaskFuture(wrapped_future=future, task_run_id=future.task_run_id))
        return futures, sent


@contextmanager
def _portable_task_context() -> Iterator[None]:
    """The enclosing task's run context without its parameters, and the flow's API, while shards are submitted.

    prefect-dask ships the current task run context to the worker (so a shard nests under `search`
    in the UI), parameters included; the search task's parameters hold live objects (the catalog
    recorder, progress listeners) that cannot be pickled and that a shard never needs."""
    from prefect.context import TaskRunContext
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with ExitStack() as stack:
        current = TaskRunContext.get()
        if current is not None:
            stack.enter_context(current.model_copy(update={"parameters": {}}))
        url = _ephemeral_api_url()
        if url is not None:
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: url}))
        yield


def _ephemeral_api_url() -> str | None:
    """The URL of the temporary Prefect server this process runs when no PREFECT_API_URL is set.

    The settings shipped with each shard carry no API URL then, and every worker would start a
    temporary server of its own (seconds per worker, and a process left behind when the worker is
    killed). Pointing them at the flow's server records every shard in the same place. It listens on
    127.0.0.1, so workers on other machines need a real server: set PREFECT_API_URL for the flow."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance get_client() started (one per process)
    return server.api_url if server.running else None


@contextmanager
def dask_client(execution: ExecutionSpec) -> Iterator[object]:
    """A Prefect Dask client on a local cluster started for the run, or on an existing scheduler."""
    from prefect_dask import DaskTaskRunner

    if execution.workers is not None:
        # One Dask thread per worker: a worker runs one shard at a time, on `threads` torch threads.
        runner = DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
            "n_workers": execution.workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
        })
    else:
        runner = DaskTaskRunner(address=execution.address)
    with runner:
        client = runner.client
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_SECONDS)
        except TimeoutError as exc:
            raise RuntimeError(
                f"no Dask worker joined the scheduler at {execution.address} within {WORKER_WAIT_SECONDS} s; "
                "start workers with: dask worker " + str(execution.address)
            ) from exc
        yield client


@contextmanager
def distributed_scorer(
    model_path: str, calibration: ArtifactRef, model: ModelSpec, score: ScoreSection, exact: bool,
    execution: ExecutionSpec, n_windows: int, n_predictions: int, racing: RacingOptions | None = None,
) -> Iterator[DistributedScorer]:
    """A DistributedScorer for one search: the cluster lives as long as the `with` block."""
    with dask_client(execution) as client:
        batches = math.ceil(n_windows / score.batch_windows)
        shards = shard_layout(batches, len(client.scheduler_info()["workers"]))
        template = ShardJob(
            # Absolute: workers need not share the flow's working directory, only its filesystem.
            model_path=str(Path(model_path).resolve()), calibration_path=str(Path(calibration.path).resolve()),
            calibration_sha256=calibration.sha256, dtype=model.dtype,
            device=execution.device or model.device, threads=execution.threads,
            batch_windows=score.batch_windows, memory_budget_bytes=score.memory_budget_gb * 2**30,
            shard=0, first_batch=0, stop_batch=0, removed=(), candidates=(),
        )
        backend = DaskShardBackend(client, template, shards)
        yield DistributedScorer(backend, n_predictions, exact, racer_for(racing, n_windows, n_predictions, score))


def racer_for(racing: RacingOptions | None, n_windows: int, n_predictions: int, score: ScoreSection) -> Racer | None:
    """The flow's race over the run's micro-batches (as the local scorer cuts them), or None without racing."""
    if racing is None:
        return None
    per_window = n_predictions // n_windows
    sizes = [min(score.batch_windows, n_windows - start) for start in range(0, n_windows, score.batch_windows)]
    return Racer(racing, sizes, [size * per_window for size in sizes])
