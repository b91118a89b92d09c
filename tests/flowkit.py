"""Helpers for flow tests: a tiny pipeline folder and counters of which stages really ran."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import yaml

from tests.tiny import tiny_checkpoint, tiny_corpus

STAGE_FUNCTIONS = ("load_stage", "calibrate_stage", "eval_data_stage", "search_stage", "prune_stage", "evaluate_stage",
                   "speed_stage")


def tiny_pipeline(root: Path, **changes) -> Path:
    """A pipeline YAML over a tiny checkpoint and corpus inside root; `changes` are top-level sections."""
    if not (root / "model").exists():
        tiny_checkpoint(root / "model")
        tiny_corpus(root / "corpus.txt")
    spec = {
        "name": "tiny",
        "model": {"source": str(root / "model")},
        "calibration": {"dataset": str(root / "corpus.txt"), "samples": 4, "seq_len": 32, "seed": 0},
        "score": {"granularity": "sublayer", "batch_windows": 1},
        "search": {"target": {"blocks": 3}},
        "evaluate": {"datasets": [str(root / "corpus.txt")], "seq_len": 32, "max_tokens": 256},
        "output_dir": str(root / "out" / "tiny"),
        "catalog": str(root / "out" / "catalog.duckdb"),
    }
    for key, value in changes.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class StageCalls:
    """Wraps the stage functions the Prefect tasks call, counting real executions and forwards."""

    def __init__(self, monkeypatch):
        import flows.stages as stages
        from tasks.residual import ResidualRunner

        self.calls: list[str] = []
        self.forwards = 0
        for name in STAGE_FUNCTIONS:
            original = getattr(stages, name)
            monkeypatch.setattr(stages, name, self._counting(name, original))
        original_nll = ResidualRunner.window_nll

        def counting_nll(runner, hidden, input_ids, mass=None):
            self.forwards += 1
            return original_nll(runner, hidden, input_ids, mass)

        monkeypatch.setattr(ResidualRunner, "window_nll", counting_nll)

    def _counting(self, name, fn):
        def wrapper(*args, **kwargs):
            self.calls.append(name.removesuffix("_stage"))
            return fn(*args, **kwargs)

        return wrapper

    def take(self) -> tuple[list[str], int]:
        calls, forwards = self.calls, self.forwards
        self.calls, self.forwards = [], 0
        return calls, forwards


ROOT = Path(__file__).resolve().parents[1]


def run_in_session(args, log_path: Path) -> subprocess.CompletedProcess:
    """Run in a new session; then kill the whole group, so Prefect's server child of a killed run goes too."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(args, code, "", log_path.read_text())
