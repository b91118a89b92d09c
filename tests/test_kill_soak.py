"""Kill-and-resume soak: a small pipeline with recovery and evaluation is SIGKILLed at chosen points (while
a checkpoint is being written, during evaluation, mid-search) and started again until it completes; the
result, the catalog rows and the files must equal an uninterrupted run's, and no temporary folder survives.

The default suite kills once, inside the pruned checkpoint's write; `-m integration` kills at every point
in turn, in one run.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

from tests.flowkit import run_in_session, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]

# Runs the pipeline in a fresh process that SIGKILLs itself at the N-th call of one function:
# `checkpoint` (a checkpoint folder is written, not yet renamed), `evaluate` (a perplexity in an
# evaluation stage), `score` (a candidate score has just been committed).
_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import flows.recorder, tasks.evaluate, tasks.prune
    from flows import prune_pipeline

    point, limit = sys.argv[2].split(":") if ":" in sys.argv[2] else ("", "0")
    owner, name = {"checkpoint": (tasks.prune, "_copy_generation_config"),
                   "evaluate": (tasks.evaluate, "perplexity"),
                   "score": (flows.recorder.CatalogRecorder, "record_score")}.get(point, (None, None))
    if owner is not None:
        original, calls = getattr(owner, name), [0]

        def then_die(*args, **kwargs):
            result = original(*args, **kwargs)
            calls[0] += 1
            if calls[0] == int(limit):
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(owner, name, then_die)
    prune_pipeline(sys.argv[1])
    """
)

SECTIONS = dict(search={"target": {"blocks": 2}}, recover={"method": "bias"})


def _run(pipeline: Path, point: str) -> int:
    """One invocation in its own session; the whole group is killed after, so Prefect's server child goes too."""
    log = pipeline.parent / f"run-{len(list(pipeline.parent.glob('run-*.log')))}-{point.replace(':', '-')}.log"
    code = run_in_session([sys.executable, "-c", _KILLER, str(pipeline), point], log).returncode
    assert code in (0, -signal.SIGKILL), log.read_text()[-3000:]
    return code


def _rows(catalog: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(catalog), read_only=True) as conn:
        return conn.execute(sql).fetchall()


def _masked(text: str, root: Path) -> str:
    """Paths and the digests made from them (run ids, cache keys) differ between the two folders."""
    return re.sub(r"[0-9a-f]{12,}", "#", text.replace(str(root), "<root>"))


def _record(root: Path) -> dict:
    """What must not depend on interruptions: results, catalog rows (values, no duplicates), files."""
    catalog = root / "out" / "catalog.duckdb"
    (report,) = (root / "out" / "tiny").glob("run-*/report.json")
    summary = json.loads(report.read_text())
    scores = _rows(catalog, "select step, block, value from scores order by step, block")
    evaluations = [(stage, kind, _masked(dataset, root), metric, value) for stage, kind, dataset, metric, value in
                   _rows(catalog, "select stage, kind, dataset, metric, value from evaluations where kind <> 'speed' "
                                  "order by stage, kind, dataset, metric")]
    checkpoints = _rows(catalog, "select stage, sha256 from artifacts where kind = 'checkpoint' order by stage")
    files = sorted(_masked(str(p.relative_to(root / "out")), root) for p in (root / "out").rglob("*")
                   if ".prefect-results" not in p.parts and p.suffix != ".lock" and "lock" not in p.name)
    return {
        "status": _rows(catalog, "select status from runs"),
        "blocks": summary["blocks"], "perplexity": _masked(json.dumps(summary["perplexity"], sort_keys=True), root),
        "steps": _rows(catalog, "select step, block, value from steps order by step"),
        "scores": scores, "distinct_scores": len({(s, b) for s, b, _ in scores}),
        "evaluations": evaluations, "checkpoints": checkpoints, "files": files,
    }


def _soak(tmp_path: Path, kill_points: list[str]) -> None:
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    killed_root.mkdir()
    clean_root.mkdir()
    killed = tiny_pipeline(killed_root, **SECTIONS)
    clean = tiny_pipeline(clean_root, **SECTIONS)
    for point in kill_points:
        assert _run(killed, point) == -signal.SIGKILL, f"the run ended before kill point {point}"
        assert _rows(killed_root / "out" / "catalog.duckdb", "select status from runs") == [("running",)]
        left = list((killed_root / "out").rglob(".checkpoint-*.tmp*"))
        # A kill inside a checkpoint write leaves exactly its temporary folder; the next start sweeps it.
        assert len(left) == (1 if point.startswith("checkpoint") else 0), left
    (killed_wall,) = _rows(killed_root / "out" / "catalog.duckdb", "select wall_seconds from runs")[0]
    assert killed_wall > 0  # the killed invocations wrote their time as they went
    assert _run(killed, "none") == 0
    assert _run(clean, "none") == 0
    (resumed_wall,) = _rows(killed_root / "out" / "catalog.duckdb", "select wall_seconds from runs")[0]
    (report,) = (killed_root / "out" / "tiny").glob("run-*/report.json")
    last = json.loads(report.read_text())["invocation_seconds"]
    assert resumed_wall == pytest.approx(killed_wall + last, abs=1.0)  # every invocation's share adds up
    assert not list((killed_root / "out").rglob("*.tmp*")), "a temporary survived the successful rerun"
    resumed, reference = _record(killed_root), _record(clean_root)
    assert resumed["status"] == [("completed",)]
    assert resumed["distinct_scores"] == len(resumed["scores"])
    assert resumed == reference


def test_kill_inside_a_checkpoint_write_resumes_to_the_same_result(tmp_path):
    _soak(tmp_path, ["checkpoint:1"])


@pytest.mark.integration
def test_kills_at_every_point_resume_to_the_same_result(tmp_path):
    # Mid-search, in the pruned and then the recovered checkpoint's write, then during the last evaluation.
    _soak(tmp_path, ["score:4", "checkpoint:1", "checkpoint:2", "evaluate:2"])
