"""A metric, a strategy and a recovery method added from a test module, used through the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from tests.flowkit import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
TOY = {
    "score": {"metric": "toy_squared_update", "granularity": "sublayer"},
    "search": {"strategy": "toy_most_important_first", "target": {"blocks": 2}},
    "recover": {"method": "toy_scale_head", "scale": 2.0},
}


def _cli(*args: str, plugins: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PRUNEFLOW_PLUGINS"}
    if plugins:
        env["PRUNEFLOW_PLUGINS"] = "tests.plugins.toy"
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, stdin=subprocess.DEVNULL, timeout=600)


@pytest.fixture()
def toy_pipeline(tmp_path) -> Path:
    return tiny_pipeline(tmp_path, **TOY)


def test_validate_knows_the_plugin_methods_only_when_they_are_loaded(toy_pipeline):
    done = _cli("validate", str(toy_pipeline))
    assert done.returncode == 0, done.stderr
    without = _cli("validate", str(toy_pipeline), plugins=False)
    assert without.returncode == 2 and "Traceback" not in without.stderr
    for message in ("unknown metric 'toy_squared_update'", "unknown strategy 'toy_most_important_first'",
                    "recover"):
        assert message in without.stderr, message
    bad_setting = _cli("validate", str(toy_pipeline), "--set", "recover.scale=0")
    assert bad_setting.returncode == 2 and "recover.toy_scale_head.scale" in bad_setting.stderr


def test_missing_plugin_module_is_a_clear_error(toy_pipeline):
    env_cli = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(toy_pipeline)], capture_output=True,
                             text=True, cwd=ROOT, env={**os.environ, "PRUNEFLOW_PLUGINS": "tests.plugins.nowhere"},
                             stdin=subprocess.DEVNULL, timeout=300)
    assert env_cli.returncode == 2 and "Traceback" not in env_cli.stderr
    assert "plugin module 'tests.plugins.nowhere'" in env_cli.stderr


def test_run_uses_the_plugin_methods_end_to_end(toy_pipeline, tmp_path):
    done = _cli("run", str(toy_pipeline))
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = done.stdout.split()[1]
    db = duckdb.connect(str(tmp_path / "out" / "catalog.duckdb"), read_only=True)
    scores = dict(db.execute("select block, value from scores where run_id = ? and step = 0", [run_id]).fetchall())
    removed = [b for (b,) in db.execute("select block from steps where run_id = ? order by step", [run_id]).fetchall()]
    metrics = {m for (m,) in db.execute("select distinct metric from scores where run_id = ?", [run_id]).fetchall()}
    assert metrics == {"toy_squared_update"} and len(scores) == 8  # every sub-block of 4 layers, scored once
    # The toy strategy removes the blocks the metric ranks most important: the two largest updates.
    assert sorted(removed) == sorted(sorted(scores, key=scores.get)[-2:])
    stages = {s for (s,) in db.execute("select distinct stage from evaluations where run_id = ?", [run_id]).fetchall()}
    assert {"dense", "pruned", "recovered"} <= stages
    kept = dict(db.execute("select stage, value from evaluations where run_id = ? and metric = 'toy_layers_kept'",
                           [run_id]).fetchall())
    emptied = {b.rsplit(".", 1)[0] for b in removed if b.replace(".attn", ".mlp") in removed and b.endswith(".attn")}
    assert kept == {"dense": 4.0, "pruned": 4.0 - len(emptied), "recovered": 4.0 - len(emptied)}
    recovered = db.execute("select path from artifacts where run_id = ? and stage = 'recovered' and kind = 'checkpoint'",
                           [run_id]).fetchone()
    assert recovered is not None and (Path(recovered[0]) / "config.json").is_file()


def test_plugin_check_refuses_before_anything_is_written(toy_pipeline, tmp_path):
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    done = _cli("run", str(toy_pipeline), "--set", "recover.min_positions=100000")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "recover.min_positions 100000: the model has 256" in done.stderr
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == before


def test_an_export_format_from_a_plugin_is_accepted_and_written(toy_pipeline, tmp_path):
    as_toy = ("--set", "prune.format=toy_hf_note", "--set", "score.granularity=layer")
    without = _cli("validate", str(toy_pipeline), *as_toy, plugins=False)
    assert without.returncode == 2 and "prune.format" in without.stderr and "'remote_code'" in without.stderr
    done = _cli("run", str(toy_pipeline), *as_toy)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = done.stdout.split()[1]
    db = duckdb.connect(str(tmp_path / "out" / "catalog.duckdb"), read_only=True)
    removed = [b for (b,) in db.execute("select block from steps where run_id = ? order by step", [run_id]).fetchall()]
    (pruned,) = db.execute("select path from artifacts where run_id = ? and stage = 'pruned' and kind = 'checkpoint'",
                           [run_id]).fetchone()
    note = (Path(pruned) / "TOY_NOTE.txt").read_text()
    assert len(removed) == 2 and all(b in note for b in removed)


def test_a_missing_optional_extra_is_refused_before_anything_is_written(toy_pipeline, tmp_path):
    before = sorted(p for p in tmp_path.rglob("*"))
    done = _cli("run", str(toy_pipeline), "--set", "score.metric=toy_needs_an_extra")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "score.metric 'toy_needs_an_extra' needs pruneflow_toy_absent_module" in done.stderr
    assert "pip install 'pruneflow-toy[absent]'" in done.stderr
    assert sorted(p for p in tmp_path.rglob("*")) == before
