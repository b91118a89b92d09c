"""The Prefect flow on a tiny model: catalog rows, stage-by-stage caching, bad input."""

import json
import re
import subprocess
import sys

import duckdb
import pytest

from catalog import Catalog
from flows import prune_pipeline
from flows.cli import main as cli
from flows.outputs import run_dir
from pipelines import load_spec
from tests.flowkit import StageCalls, tiny_pipeline


def test_pipeline_records_everything_and_caches_stage_by_stage(tmp_path, monkeypatch):
    stages = StageCalls(monkeypatch)
    path = tiny_pipeline(tmp_path)
    first = prune_pipeline(path)
    calls, forwards = stages.take()
    assert calls == ["load", "calibrate", "eval_data", "search", "prune", "evaluate", "evaluate", "speed"]
    assert forwards > 0

    catalog = Catalog(tmp_path / "out" / "catalog.duckdb")
    run_id = first["run_id"]
    assert catalog.get_run(run_id).status == "completed"
    assert [s.block for s in catalog.steps(run_id)] == first["blocks"]
    assert len(catalog.scores(run_id)) == 8 + 7 + 6
    assert {(e.stage, e.kind) for e in catalog.evaluations(run_id)} >= {("dense", "perplexity"), ("pruned", "perplexity"),
                                                                       ("dense", "size"), ("pruned", "size")}
    artifacts = {(a.stage, a.kind): a for a in catalog.artifacts(run_id)}
    assert set(artifacts) == {("calibrate", "calibration"), ("pruned", "checkpoint"), ("pruned", "report"), ("pruned", "report-md"),
                              ("evaluate", "plot-scores"), ("evaluate", "plot-perplexity")}
    for kind in ("plot-scores", "plot-perplexity"):
        with open(artifacts[("evaluate", kind)].path, "rb") as png:
            assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    assert first["params_pruned"] == catalog.steps(run_id)[-1].params_remaining
    speed = {(e.stage, e.metric) for e in catalog.evaluations(run_id) if e.kind == "speed"}
    for stage in ("dense", "pruned"):
        assert {(stage, m) for m in ("prefill_tokens_per_s", "decode_tokens_per_s", "kv_bytes_per_token",
                                     "prefill_tokens_per_s_spread", "decode_tokens_per_s_spread")} <= speed
    ratios = {f"{m}_ratio_{part}" for m in ("prefill_tokens_per_s", "decode_tokens_per_s")
              for part in ("median", "low", "high")}
    assert {("pruned", m) for m in ratios | {"side_by_side"}} <= speed and not {("dense", m) for m in ratios} & speed
    assert {e.n_samples for e in catalog.evaluations(run_id) if e.metric.endswith("tokens_per_s")} == {5}
    folder = run_dir(tmp_path / "out" / "tiny", run_id)
    report = (folder / "report.md").read_text()
    speed_rows = [line for line in report.splitlines() if "tokens_per_s" in line]
    assert len(speed_rows) == 2 and all(line.count("±") == 2 and line.rstrip(" |").endswith("x") for line in speed_rows)
    ratio_cells = [line.split(" | ")[3] for line in speed_rows]  # metric | dense | pruned | pruned / dense | ideal
    assert all(re.fullmatch(r"(within noise \()?\d+\.\d\dx \[\d+\.\d\d-\d+\.\d\d\]\)?", c) for c in ratio_cells)
    assert folder.is_dir() and not (folder / "recover-state").exists()

    # The same pipeline again: every stage from cache, not one model forward.
    again = prune_pipeline(path)
    assert stages.take() == ([], 0)
    assert again["blocks"] == first["blocks"] and again["perplexity"] == first["perplexity"]
    # ... and it did no work on the run, so the run's wall time stays what the first invocation measured.
    assert again["wall_seconds"] == first["wall_seconds"] == catalog.get_run(run_id).wall_seconds

    # Only evaluation settings changed: only evaluation data and evaluation run (speed reads none of them); same run.
    changed_eval = prune_pipeline(path, ["evaluate.max_tokens=128"])
    calls, _ = stages.take()
    assert calls == ["eval_data", "evaluate", "evaluate"]
    assert changed_eval["run_id"] == run_id

    # Calibration changed: calibrate and everything downstream of it; load and the dense model's
    # evaluation (which do not read calibration) stay cached. A new run, in its own subfolder.
    changed_cal = prune_pipeline(path, ["evaluate.max_tokens=128", "calibration.seed=1"])
    calls, _ = stages.take()
    assert calls[:2] == ["calibrate", "search"] and "load" not in calls and "eval_data" not in calls
    assert calls.count("evaluate") == (1 if "prune" in calls else 0)
    assert changed_cal["run_id"] != run_id
    assert len(catalog.run_summaries()) == 2


def test_cli_runs_and_show(tmp_path, capsys):
    path = tiny_pipeline(tmp_path)
    assert cli(["run", str(path)]) == 0
    out, err = capsys.readouterr()
    run_id = out.split()[1]
    # The speed stage shows its progress, with a total and the time left, like the other long stages.
    assert re.search(r"speed \(dense, pruned\): 24/24 timed runs, decode 1x32 round 5/5 \((dense|pruned)\), "
                     r"[\d.]+ s each, left 00:00", err), err[-3000:]
    # ... and so does every other stage that can run long, each bar with its total.
    for bar in ("calibrate: tokenizing corpus.txt: 60/60 documents",
                r"search step 2 \(3 of 3\): 6/6 candidates", "prune: checkpoint: 3/3 steps",
                "evaluate pruned: corpus.txt: 8/8 windows",
                "calibration perplexity, dense and after each of 3 removals: 16/16 windows"):
        assert re.search(bar, err), bar
    speed_lines = [line for line in out.splitlines() if line.startswith("speed ")]
    assert [line.split(":")[0] for line in speed_lines] == ["speed      batch1x128 prefill_tokens_per_s",
                                                            "speed      batch1x32 decode_tokens_per_s"]
    assert all("pruned/dense " in line and re.search(r"x \[[\d.]+-[\d.]+\]", line) for line in speed_lines)
    catalog = str(tmp_path / "out" / "catalog.duckdb")
    assert cli(["runs", "--catalog", catalog]) == 0
    listing = capsys.readouterr().out
    assert run_id[:12] in listing and "completed" in listing
    assert cli(["show", run_id[:8], "--catalog", catalog]) == 0
    shown = capsys.readouterr().out
    # What matters first: removed blocks, perplexities and the checkpoint, before any table; no raw spec.
    head = [line.split()[0] for line in shown.split("\n\n")[0].splitlines()]
    assert head[:4] == ["run", "pipeline", "model", "removed"]
    assert {"checkpoint", "perplexity", "speed"} <= set(head)
    assert '"calibration"' not in shown and "model fingerprint" not in shown
    assert cli(["show", run_id[:8], "--catalog", catalog, "--verbose"]) == 0
    assert '"calibration"' in capsys.readouterr().out

    shown = subprocess.run([sys.executable, "-m", "flows.cli", "show", run_id[:8], "--catalog", catalog, "--json"],
                           capture_output=True, text=True, check=True).stdout
    document = json.loads(shown)
    assert document["run"]["run_id"] == run_id and document["spec"]["name"] == "tiny"
    assert [s["block"] for s in document["steps"]] == out.split("blocks: ")[1].split("\n")[0].split(", ")
    assert len(document["scores"]) == 8 + 7 + 6


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("override,message", [
    ("model.source=/nonexistent/model", "no such file or directory"),
    ("search.target.blocks=99", "cannot be met"),
    ("calibration.dataset=/nonexistent.txt", "nonexistent.txt"),
    ("calibration.samples=5000", "need at least 160000"),
    ("evaluate.datasets=[/nonexistent-eval.txt]", "nonexistent-eval.txt"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, override, message):
    path = tiny_pipeline(tmp_path)
    before = _files(tmp_path)
    assert cli(["run", str(path), "--set", override]) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err and "Traceback" not in err
    after = [f for f in _files(tmp_path) if "calibration/" not in f and ".prefect-results" not in f]
    assert after == before
    catalog = tmp_path / "out" / "catalog.duckdb"
    if catalog.exists():
        assert duckdb.connect(str(catalog), read_only=True).execute("select count(*) from runs").fetchone() == (0,)


def test_validate_reports_every_error_with_its_path(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nmodel: {source: m, dtype: float64}\nscore: {metric: perplexty, granularity: block}\n"
        "search: {target: {blocks: -1}, strategy: greedy}\noutput_dir: o\nextra_key: 1\n"
    )
    assert cli(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    for expected in ("model.dtype", "score.metric", "did you mean 'perplexity'", "score.granularity",
                     "search.target.blocks", "search.strategy", "extra_key: unknown key"):
        assert expected in err, expected


def test_other_pipeline_in_same_folder_is_refused(tmp_path, capsys):
    path = tiny_pipeline(tmp_path)
    assert cli(["run", str(path)]) == 0
    assert cli(["run", str(path), "--set", "name=other"]) == 2
    assert "belongs to pipeline 'tiny'" in capsys.readouterr().err


def test_spec_file_overrides_and_extends(tmp_path):
    base = tiny_pipeline(tmp_path)
    child = tmp_path / "child.yaml"
    child.write_text("extends: pipeline.yaml\nname: child\nsearch: {target: {params_ratio: 0.3}}\n")
    spec = load_spec(child, ["calibration.samples=2"])
    assert spec.name == "child" and spec.search.target.params_ratio == 0.3
    assert spec.calibration.samples == 2 and spec.model.source == load_spec(base).model.source
    assert json.loads(spec.section_json("search"))["search"]["target"] == {"params_ratio": 0.3}
