"""A real run process killed with SIGKILL mid-search resumes without redoing or duplicating work."""

import json
import signal
import subprocess
import sys
import textwrap

import duckdb
import pytest

from tests.flowkit import run_in_session, tiny_pipeline

# Runs the pipeline in a fresh process that SIGKILLs itself right after its N-th committed score.
_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import flows.recorder as recorder
    from flows import prune_pipeline

    limit = int(sys.argv[2])
    original = recorder.CatalogRecorder.record_score
    count = 0

    def record_then_maybe_die(self, step, score):
        global count
        original(self, step, score)
        count += 1
        if count == limit:
            os.kill(os.getpid(), signal.SIGKILL)

    if limit:
        recorder.CatalogRecorder.record_score = record_then_maybe_die
    prune_pipeline(sys.argv[1])
    """
)


def _run(path, kill_after: int) -> subprocess.CompletedProcess:
    log = path.parent / f"run-{kill_after}-{len(list(path.parent.glob('run-*.log')))}.log"
    return run_in_session([sys.executable, "-c", _KILLER, str(path), str(kill_after)], log)


def _rows(catalog, sql):
    with duckdb.connect(str(catalog), read_only=True) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.parametrize("kill_after", [11])
def test_sigkill_mid_search_then_resume_equals_uninterrupted(tmp_path, kill_after):
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    killed_root.mkdir()
    clean_root.mkdir()
    search = {"target": {"blocks": 3}}
    killed = tiny_pipeline(killed_root, search=search)
    clean = tiny_pipeline(clean_root, search=search)

    first = _run(killed, kill_after)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    catalog = killed_root / "out" / "catalog.duckdb"
    assert _rows(catalog, "select status from runs") == [("running",)]
    before = _rows(catalog, "select step, block, value from scores order by step, block")
    assert len(before) == kill_after  # 8 candidates of step 0, 3 of step 1
    assert _rows(catalog, "select count(*) from steps") == [(1,)]

    resumed = _run(killed, 0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = _run(clean, 0)
    assert reference.returncode == 0, reference.stderr[-3000:]

    summaries = {}
    for name, root in (("resumed", killed_root), ("clean", clean_root)):
        (report,) = (root / "out" / "tiny").glob("run-*/report.json")
        summaries[name] = json.loads(report.read_text())
    # Nothing evaluated twice: the resumed process scored exactly the candidates without a row.
    total = 8 + 7 + 6
    # Step 0 was committed whole (skipped); step 1 had 3 recorded scores, reused as they are.
    assert summaries["resumed"]["search"]["reused"] == kill_after - 8
    assert summaries["resumed"]["search"]["evaluated"] == total - kill_after
    # No duplicate rows, and rows written before the kill are untouched.
    after = _rows(catalog, "select step, block, value from scores order by step, block")
    assert len(after) == total == len({(s, b) for s, b, _ in after})
    assert set(before) <= set(after)
    assert _rows(catalog, "select status from runs") == [("completed",)]
    # Same outcome as a run that was never interrupted.
    assert summaries["resumed"]["blocks"] == summaries["clean"]["blocks"]
    assert list(summaries["resumed"]["perplexity"].values()) == list(summaries["clean"]["perplexity"].values())
    clean_steps = _rows(clean_root / "out" / "catalog.duckdb", "select step, block, value from steps order by step")
    assert _rows(catalog, "select step, block, value from steps order by step") == clean_steps


def test_fresh_starts_over(tmp_path):
    path = tiny_pipeline(tmp_path)
    assert _run(path, 5).returncode == -signal.SIGKILL
    done = run_in_session([sys.executable, "-m", "flows.cli", "run", str(path), "--fresh"], tmp_path / "fresh.log")
    assert done.returncode == 0, done.stderr[-3000:]
    (report,) = (tmp_path / "out" / "tiny").glob("run-*/report.json")
    assert json.loads(report.read_text())["search"] == {**json.loads(report.read_text())["search"],
                                                       "reused": 0, "evaluated": 21}
