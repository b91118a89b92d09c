"""What runs on a Dask worker: score one shard of a search step.

A worker process keeps the model (read once from the run's checkpoint path) and one prefix-reuse
scorer per shard it has served, so its entry states carry over from step to step exactly as in a
local search. Shards of another model or calibration set evict what was kept: one run at a time.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tasks.distributed.shards import CandidateSums, ShardResult
from tasks.residual import predictions


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs, by value or by path: no model and no tensors travel."""

    model_path: str
    calibration_path: str
    calibration_sha256: str
    dtype: str
    device: str
    threads: int
    batch_windows: int
    memory_budget_bytes: float
    shard: int
    first_batch: int
    stop_batch: int
    removed: tuple[str, ...]
    candidates: tuple[str, ...]  # evaluated in this order
    bound: float = math.inf  # a candidate stops once its shard sum exceeds this (the global best total)
    # A race's round: the global micro-batches of this shard to evaluate, per window (empty: all, summed).
    batches: tuple[int, ...] = ()


class _WorkerState:
    """Per worker process: the model and the shard scorers of the run it serves."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # Dask may run tasks on several threads of one worker
        self.run_key: tuple | None = None
        self.model: nn.Module | None = None
        self.windows: torch.Tensor | None = None
        self.scorers: dict[tuple[int, int], object] = {}

    def scorer(self, job: ShardJob):
        from tasks.windows import load_windows
        from tasks.export import load_checkpoint
        from tasks.load import resolve_device, resolve_dtype
        from tasks.refs import sha256_file
        from tasks.score.prefix_reuse import PrefixReuseScorer

        run_key = (job.model_path, job.dtype, job.device, job.calibration_path, job.calibration_sha256,
                   job.batch_windows, job.memory_budget_bytes)
        if run_key != self.run_key:
            self.scorers.clear()
            self.model = self.windows = None
            device = resolve_device(job.device)
            self.model = load_checkpoint(job.model_path, dtype=resolve_dtype(job.dtype, device), device=device)
            digest = sha256_file(Path(job.calibration_path))
            if digest != job.calibration_sha256:
                # A worker must read the very file the flow wrote (a shared filesystem), not a stale copy.
                raise RuntimeError(
                    f"calibration file {job.calibration_path} on worker {socket.gethostname()} has sha256 "
                    f"{digest[:12]}..., the flow's has {job.calibration_sha256[:12]}...; workers need the run's "
                    "output_dir on a filesystem shared with the flow"
                )
            self.windows = load_windows(job.calibration_path)
            self.run_key = run_key
        key = (job.first_batch, job.stop_batch)
        if key not in self.scorers:
            assert self.windows is not None
            rows = self.windows[job.first_batch * job.batch_windows: job.stop_batch * job.batch_windows]
            # exact=True: the bound comes with each job; the scorer's own early abort is not used.
            self.scorers[key] = PrefixReuseScorer(self.model, rows, job.batch_windows, True, job.memory_budget_bytes)
        return self.scorers[key]


_STATE = _WorkerState()


def score_shard(job: ShardJob) -> ShardResult:
    """Every candidate of the job on this worker's shard of the calibration windows."""
    start = time.perf_counter()
    torch.set_num_threads(job.threads)
    with _STATE.lock:
        scorer = _STATE.scorer(job)
        before = (scorer.work.unit_windows, scorer.work.head_windows)
        if job.batches:
            candidates = _race_round(scorer, job)
        else:
            sums = scorer.batch_sums(set(job.removed), list(job.candidates), job.bound)
            candidates = {block: CandidateSums(tuple(parts), done, complete, seconds)
                          for block, (parts, done, complete, seconds) in sums.items()}
        return ShardResult(
            shard=job.shard,
            candidates=candidates,
            unit_windows=scorer.work.unit_windows - before[0],
            head_windows=scorer.work.head_windows - before[1],
            stored_bytes=scorer.work.stored_bytes,
            worker=f"{socket.gethostname()}:{os.getpid()}",
            seconds=time.perf_counter() - start,
        )


def _race_round(scorer, job: ShardJob) -> dict[str, CandidateSums]:
    """A race's round on this shard: every candidate's per-window NLL on the round's micro-batches."""
    local = [b - job.first_batch for b in job.batches]
    values = scorer.window_nlls(set(job.removed), list(job.candidates), local)
    out = {}
    for name, (per_batch, seconds) in values.items():
        nll = [per_batch[i] for i in local]
        out[name] = CandidateSums(
            sums=tuple(float(t.sum()) for t in nll), tokens=sum(predictions(scorer.batches[i]) for i in local),
            complete=True, seconds=seconds, batches=job.batches, windows=tuple(tuple(t.tolist()) for t in nll),
        )
    return out
