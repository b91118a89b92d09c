"""A stopped run takes its temporary Prefect server with it.

`pruneflow run` as a user's first run has it (no PREFECT_API_URL: the run starts a temporary server) is
stopped in its search stage by SIGKILL (the OOM killer: no handler runs) or SIGTERM (`timeout`, Slurm,
Kubernetes, systemd); no process the run started may be left. After SIGTERM the run is marked failed with
the signal, and starting it again resumes it, reusing the scores committed before the stop. `pruneflow
serve` stopped by SIGTERM leaves no server either.

The default suite stops a run by SIGKILL (one first run, its server started); `-m integration` the rest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import duckdb
import psutil
import pytest

from tests.flowkit import tiny_pipeline
from tests.holdpoint import HOLD_AFTER

ROOT = Path(__file__).resolve().parents[1]
# Generous: on two shared cores a first run spends tens of seconds importing and starting its server.
READY_WITHIN_S = 300
GONE_WITHIN_S = 10


def _first_run_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # Prefect's first-run path
    return {**env, "PYTHONPATH": str(ROOT), "PRUNEFLOW_PLUGINS": "tests.holdpoint", **extra}


def _alive(process: psutil.Process) -> bool:
    # Whoever adopts an orphan may never reap it (a container's PID 1): a zombie runs nothing and holds nothing.
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _left_after(processes: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in processes if _alive(p)]


def _is_prefect_server(process: psutil.Process) -> bool:
    command = " ".join(process.cmdline())
    return "prefect.server" in command or "guarded_server" in command


def _stop_when(args: list[str], env: dict[str, str], log: Path, ready: Callable[[], bool],
               how: signal.Signals) -> subprocess.Popen:
    """Start `pruneflow ARGS`; once `ready()`, send it `how` and check that every process it had started
    (its Prefect server among them) is gone within GONE_WITHIN_S. Returns the ended process."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=ROOT, start_new_session=True)
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + READY_WITHIN_S
        while not ready():
            assert proc.poll() is None, f"ended ({proc.returncode}) before it was ready:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready after {READY_WITHIN_S} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert [p for p in started if _is_prefect_server(p)], [p.cmdline() for p in started]
        os.kill(proc.pid, how)
        proc.wait(timeout=60)
        left = _left_after(started, GONE_WITHIN_S)
        assert not left, f"still running {GONE_WITHIN_S} s after {how.name}: {[p.cmdline() for p in left]}"
    finally:  # only what this test started: the process, and the processes it had started
        if proc.poll() is None:
            started = started or psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
        proc.wait(timeout=60)
        for process in started:
            if _alive(process):
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
    return proc


def _stop_run(tmp_path: Path, how: signal.Signals) -> tuple[subprocess.Popen, Path, Path]:
    """The tiny pipeline run, stopped by `how` at its hold (its search has committed HOLD_AFTER scores)."""
    pipeline = tiny_pipeline(tmp_path)
    hold, log = tmp_path / "hold", tmp_path / f"run-{how.name}.log"
    hold.touch()
    run = _stop_when(["run", str(pipeline)], _first_run_env(PRUNEFLOW_TEST_HOLD=str(hold)), log,
                     hold.with_suffix(".reached").exists, how)
    return run, pipeline, log


def test_sigkill_leaves_no_prefect_server(tmp_path):
    run, _pipeline, _log = _stop_run(tmp_path, signal.SIGKILL)
    assert run.returncode == -signal.SIGKILL


@pytest.mark.integration  # two first runs, two servers started
def test_sigterm_leaves_no_prefect_server_marks_the_run_failed_and_it_resumes(tmp_path):
    run, pipeline, log = _stop_run(tmp_path, signal.SIGTERM)
    assert run.returncode == -signal.SIGTERM  # Prefect ends the run by the signal it got, as a shell expects
    text = log.read_text()
    assert "stopped by SIGTERM: marked failed; start it again to resume" in text, text[-3000:]
    catalog = tmp_path / "out" / "catalog.duckdb"
    with duckdb.connect(str(catalog), read_only=True) as conn:
        (run_id, status, summary), = conn.execute("select run_id, status, summary_json from runs").fetchall()
        (scores,), = conn.execute("select count(*) from scores").fetchall()
    assert (status, json.loads(summary)) == ("failed", {"failure": "stopped by SIGTERM"})
    assert scores == HOLD_AFTER

    (tmp_path / "hold").unlink()  # the rerun does not hold
    rerun = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(pipeline)], capture_output=True,
                           text=True, cwd=ROOT, stdin=subprocess.DEVNULL, timeout=600, env=_first_run_env())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    with duckdb.connect(str(catalog), read_only=True) as conn:
        assert conn.execute("select run_id, status from runs").fetchall() == [(run_id, "completed")]
    (report,) = (tmp_path / "out" / "tiny").glob("run-*/report.json")
    summary = json.loads(report.read_text())
    assert summary["search"]["reused"] == HOLD_AFTER  # the scores committed before the stop
    assert summary["wall_seconds"] > summary["invocation_seconds"]  # the stopped invocation's time counts


@pytest.mark.integration  # a first `serve`, its server started
def test_sigterm_to_serve_leaves_no_prefect_server(tmp_path):
    log = tmp_path / "serve.log"
    _stop_when(["serve", str(tiny_pipeline(tmp_path))], _first_run_env(), log,
               lambda: "is being served" in log.read_text(), signal.SIGTERM)
