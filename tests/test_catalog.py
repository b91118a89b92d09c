"""Catalog tests on real DuckDB files: upserts, deletion, summaries, views, schema versions,
damaged files and cross-process locking."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pytest

from catalog import (
    SCHEMA_VERSION,
    Catalog,
    CatalogError,
    CatalogLocked,
    RunSummary,
    schema,
)
from catalog.report import format_duration, format_runs, format_show
from catalog.views import EXAMPLE_QUERIES

# ---- helpers -------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _start(catalog: Catalog, run_id: str, *, pipeline: str = "greedy", model: str = "hf:org/tiny",
           spec_hash: str = "spec-1") -> None:
    catalog.start_run(
        run_id=run_id,
        pipeline=pipeline,
        spec_hash=spec_hash,
        spec_json=json.dumps({"pipeline": pipeline, "search": {"max_blocks": 3}}),
        model_fingerprint=f"fp-{model}",
        data_fingerprint="data-1",
        model_source=model,
        output_dir=f"outputs/{run_id}",
    )


def _fill(catalog: Catalog, run_id: str) -> None:
    """A two-step search, evaluations at every stage and one artifact."""
    _start(catalog, run_id)
    catalog.add_score(run_id, 0, "layers.3", "perplexity", 12.0, 2048, 0.4)
    catalog.add_score(run_id, 0, "layers.5", "perplexity", 11.0, 2048, 0.4)
    catalog.add_score(run_id, 0, "layers.7.mlp", "perplexity", 30.0, 512, 0.1, exact=False)
    catalog.add_step(run_id, 0, "layers.5", 11.0, 900)
    catalog.add_score(run_id, 1, "layers.3", "perplexity", 14.0, 2048, 0.4)
    catalog.add_score(run_id, 1, "layers.7.mlp", "perplexity", 13.0, 512, 0.1, exact=False)
    catalog.add_step(run_id, 1, "layers.7.mlp", 13.0, 850)
    catalog.add_evaluation(run_id, "dense", "perplexity", "wikitext", "perplexity", 10.0,
                           n_tokens=4096, seq_len=512, stride=256)
    catalog.add_evaluation(run_id, "pruned", "perplexity", "wikitext", "perplexity", 13.0)
    catalog.add_evaluation(run_id, "recovered", "perplexity", "wikitext", "perplexity", 11.5)
    catalog.add_artifact(run_id, "pruned", "model", f"outputs/{run_id}/pruned", "ab" * 32, 1234)
    catalog.add_unit_scores(run_id, "activation", [("layers.2.mlp.channel.0", 0.5), ("layers.2.attn.head.1", 2.0)])
    catalog.set_plan(run_id, '{"layers": {"2": {"channels": [1, 2]}}}')
    catalog.finish_run(run_id, "completed", wall_seconds=723.0,
                       summary={"params_removed_ratio": 0.15})


def _table_counts(catalog: Catalog, run_id: str) -> dict[str, int]:
    return {
        table: catalog.query(f"SELECT count(*) FROM {table} WHERE run_id = ?", [run_id])[0][0]
        for table in schema.RUN_TABLES
    }


_HOLDER = """
import sys, time, duckdb
path, hold_s = sys.argv[1], float(sys.argv[2])
conn = duckdb.connect(path)
print("locked", flush=True)
time.sleep(hold_s)
conn.close()
print("released", flush=True)
time.sleep(30)
"""


def _hold_lock(path: Path, hold_s: float) -> subprocess.Popen[str]:
    """Another PROCESS that opens the file read-write (taking DuckDB's lock) for `hold_s`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), str(hold_s)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "locked":
        proc.kill()
        pytest.fail(f"lock-holding subprocess did not start, said {line!r}")
    return proc


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "catalog.duckdb")


# ---- creation and migrations ------------------------------------------------------------------------


def test_creates_parent_directories_file_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "catalog.duckdb"
    cat = Catalog(path)
    assert path.is_file()
    assert cat.path == path
    tables = {name for (name,) in cat.query(
        "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'")}
    assert {"runs", "scores", "steps", "evaluations", "artifacts", "schema_version"} <= tables
    view_names = {name for (name,) in cat.query("SELECT view_name FROM duckdb_views() WHERE NOT internal")}
    assert {"run_overview", "step_scores"} <= view_names


def test_migrations_run_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    first = Catalog(path).query("SELECT version, applied_at FROM schema_version ORDER BY version")
    for _ in range(3):
        again = Catalog(path).query("SELECT version, applied_at FROM schema_version ORDER BY version")
        assert again == first
    assert [v for v, _ in first] == list(range(1, SCHEMA_VERSION + 1))


def test_a_new_migration_is_applied_once_to_an_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "catalog.duckdb"
    cat = Catalog(path)
    _start(cat, "r1")
    calls: list[int] = []

    def add_note_column(conn: duckdb.DuckDBPyConnection) -> None:
        calls.append(1)
        conn.execute("ALTER TABLE runs ADD COLUMN note VARCHAR")

    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, add_note_column])
    upgraded = Catalog(path)
    Catalog(path)
    assert calls == [1]
    versions = [v for (v,) in upgraded.query("SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, SCHEMA_VERSION + 2))
    assert upgraded.query("SELECT run_id, note FROM runs") == [("r1", None)]
    # Views are rebuilt after migrating and still work.
    assert [s.run_id for s in upgraded.run_summaries()] == ["r1"]


def test_a_failing_migration_leaves_the_file_at_its_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "catalog.duckdb"
    Catalog(path)

    def half_done(conn: duckdb.DuckDBPyConnection) -> None:
        conn.execute("CREATE TABLE half (x INTEGER)")
        raise duckdb.InvalidInputException("simulated failure in migration 2")

    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, half_done])
    with pytest.raises(CatalogError, match="simulated failure"):
        Catalog(path)
    monkeypatch.undo()
    cat = Catalog(path)
    assert cat.query("SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)]
    assert cat.query("SELECT count(*) FROM information_schema.tables WHERE table_name = 'half'") == [(0,)]


def test_newer_schema_version_is_refused_and_file_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    Catalog(path)
    newer = SCHEMA_VERSION + 7
    conn = duckdb.connect(str(path))
    conn.execute("INSERT INTO schema_version VALUES (?, now()::TIMESTAMP)", [newer])
    conn.close()
    before = _sha256(path)
    with pytest.raises(CatalogError) as err:
        Catalog(path)
    assert str(err.value) == (
        f"catalog {path} has schema version {newer}; this pruneflow understands up to "
        f"{SCHEMA_VERSION}: upgrade pruneflow or use another catalog file"
    )
    assert _sha256(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.duckdb"]


@pytest.mark.parametrize("content", ["random", "empty", "truncated", "sqlite"])
def test_unreadable_file_is_refused_and_left_untouched(tmp_path: Path, content: str) -> None:
    path = tmp_path / "catalog.duckdb"
    if content == "random":
        path.write_bytes(os.urandom(64 * 1024))
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "sqlite":
        path.write_bytes(b"SQLite format 3\x00" + bytes(4096))
    else:
        good = tmp_path / "good.duckdb"
        _start(Catalog(good), "r1")
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        good.unlink()
    before = _sha256(path)
    with pytest.raises(CatalogError) as err:
        Catalog(path, wait_s=1)
    message = str(err.value)
    assert str(path) in message
    assert "not a readable DuckDB catalog" in message
    assert "move it aside" in message
    assert _sha256(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.duckdb"]


def test_a_damaged_block_is_reported_as_unreadable_not_as_a_query_error(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    cat = Catalog(path)
    _fill(cat, "r1")
    data = bytearray(path.read_bytes())
    (block_size,) = cat.query("SELECT block_size FROM pragma_database_size() "
                              "WHERE database_name = current_database()")[0]
    header = len(data) % block_size  # the file is header + whole blocks
    # Damage every block, so whichever one DuckDB reads first fails its checksum.
    for offset in range(header, len(data), block_size):
        data[offset + 64: offset + 96] = bytes(range(32))
    path.write_bytes(bytes(data))
    before = _sha256(path)
    with pytest.raises(CatalogError, match="not a readable DuckDB catalog.*checksum"):
        Catalog(path, wait_s=1).scores("r1")
    assert _sha256(path) == before


def test_a_foreign_duckdb_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.duckdb"
    conn = duckdb.connect(str(path))
    conn.execute("CREATE TABLE unrelated (x INTEGER)")
    conn.close()
    before = _sha256(path)
    with pytest.raises(CatalogError, match="not a pruneflow catalog"):
        Catalog(path)
    assert _sha256(path) == before


# ---- runs and upserts -------------------------------------------------------------------------------


def test_start_run_inserts_then_resumes_keeping_created_at(catalog: Catalog) -> None:
    before = datetime.now(timezone.utc) - timedelta(seconds=5)
    _start(catalog, "r1")
    first = catalog.get_run("r1")
    assert first is not None and first.status == "running"
    assert before <= first.created_at <= datetime.now(timezone.utc) + timedelta(seconds=5)
    assert first.created_at.tzinfo is timezone.utc
    catalog.finish_run("r1", "failed", wall_seconds=12.5)
    failed = catalog.get_run("r1")
    assert failed is not None and failed.status == "failed" and failed.finished_at is not None
    _start(catalog, "r1")
    resumed = catalog.get_run("r1")
    assert resumed is not None
    assert resumed.status == "running"
    assert resumed.created_at == first.created_at
    assert resumed.finished_at is None
    assert resumed.wall_seconds == 12.5  # accumulated time survives a resume
    assert catalog.query("SELECT count(*) FROM runs") == [(1,)]
    assert catalog.get_run("missing") is None


def test_resuming_with_other_inputs_is_refused(catalog: Catalog) -> None:
    _start(catalog, "r1", spec_hash="spec-1")
    with pytest.raises(CatalogError, match="spec_hash 'spec-1', not 'spec-2'"):
        _start(catalog, "r1", spec_hash="spec-2")


def test_finish_run_keeps_wall_seconds_and_summary_unless_given(catalog: Catalog) -> None:
    _start(catalog, "r1")
    catalog.finish_run("r1", "completed", wall_seconds=100.0, summary={"params_removed_ratio": 0.25})
    catalog.finish_run("r1", "completed")
    run = catalog.get_run("r1")
    assert run is not None
    assert run.wall_seconds == 100.0
    assert run.summary == {"params_removed_ratio": 0.25}
    assert run.spec == {"pipeline": "greedy", "search": {"max_blocks": 3}}


def test_same_score_twice_is_one_row_with_the_new_value(catalog: Catalog) -> None:
    _start(catalog, "r1")
    catalog.add_score("r1", 0, "layers.3", "perplexity", 20.0, 256, 0.1, exact=False)
    catalog.add_score("r1", 0, "layers.3", "perplexity", 12.5, 2048, 0.9)
    rows = catalog.scores("r1")
    assert len(rows) == 1
    assert (rows[0].value, rows[0].n_tokens, rows[0].seconds, rows[0].exact) == (12.5, 2048, 0.9, True)


def test_other_tables_upsert_too(catalog: Catalog) -> None:
    _start(catalog, "r1")
    catalog.add_step("r1", 0, "layers.3", 12.0, 1000)
    catalog.add_step("r1", 0, "layers.4", 11.0, 990)
    catalog.add_evaluation("r1", "dense", "perplexity", "wiki", "perplexity", 10.0)
    catalog.add_evaluation("r1", "dense", "perplexity", "wiki", "perplexity", 9.5, n_tokens=100)
    catalog.add_artifact("r1", "pruned", "model", "a/b", "00" * 32, 10)
    catalog.add_artifact("r1", "pruned", "model", "a/c", "11" * 32, 20)
    assert [(s.block, s.value, s.params_remaining) for s in catalog.steps("r1")] == [("layers.4", 11.0, 990)]
    assert [(e.value, e.n_tokens) for e in catalog.evaluations("r1")] == [(9.5, 100)]
    assert [(a.path, a.bytes) for a in catalog.artifacts("r1")] == [("a/c", 20)]


def test_scores_are_ordered_by_step_then_value_and_filterable(catalog: Catalog) -> None:
    _fill(catalog, "r1")
    assert [(s.step, s.block) for s in catalog.scores("r1")] == [
        (0, "layers.5"), (0, "layers.3"), (0, "layers.7.mlp"), (1, "layers.7.mlp"), (1, "layers.3"),
    ]
    assert [s.block for s in catalog.scores("r1", step=1)] == ["layers.7.mlp", "layers.3"]
    assert [s.exact for s in catalog.scores("r1", step=0)] == [True, True, False]


def test_delete_run_removes_every_row_of_that_run_only(catalog: Catalog) -> None:
    _fill(catalog, "keep")
    _fill(catalog, "drop")
    kept_before = _table_counts(catalog, "keep")
    assert all(n > 0 for n in kept_before.values())
    catalog.delete_run("drop")
    assert _table_counts(catalog, "drop") == {table: 0 for table in schema.RUN_TABLES}
    assert _table_counts(catalog, "keep") == kept_before
    catalog.delete_run("never-existed")  # --fresh on a new run id is fine
    _start(catalog, "drop")  # and the id can be reused from scratch
    assert catalog.scores("drop") == []


def test_two_pipelines_share_one_catalog(tmp_path: Path) -> None:
    path = tmp_path / "shared.duckdb"
    _fill(Catalog(path), "a")
    second = Catalog(path)
    _start(second, "b", pipeline="other")
    assert sorted(s.pipeline for s in second.run_summaries()) == ["greedy", "other"]


# ---- validation -------------------------------------------------------------------------------------


def test_bad_values_are_refused_naming_accepted_values(catalog: Catalog) -> None:
    _start(catalog, "r1")
    with pytest.raises(CatalogError, match="stage must be one of dense, pruned, recovered; got 'final'"):
        catalog.add_evaluation("r1", "final", "perplexity", "wiki", "perplexity", 1.0)
    with pytest.raises(CatalogError, match="kind must be one of perplexity, task, speed, size"):
        catalog.add_evaluation("r1", "dense", "ppl", "wiki", "perplexity", 1.0)
    with pytest.raises(CatalogError, match="status must be one of completed, failed; got 'done'"):
        catalog.finish_run("r1", "done")  # type: ignore[arg-type]
    with pytest.raises(CatalogError, match="step must be >= 0"):
        catalog.add_score("r1", -1, "layers.1", "perplexity", 1.0, 10, 0.1)
    with pytest.raises(CatalogError, match="exact must be True or False"):
        catalog.add_score("r1", 0, "layers.1", "perplexity", 1.0, 10, 0.1, exact=1)  # type: ignore[arg-type]
    with pytest.raises(CatalogError, match="spec_json must be a JSON document"):
        catalog.start_run(run_id="r2", pipeline="p", spec_hash="h", spec_json="{not json",
                          model_fingerprint="m", data_fingerprint="d", model_source="s", output_dir="o")
    with pytest.raises(CatalogError, match="no run 'ghost' in catalog"):
        catalog.add_score("ghost", 0, "layers.1", "perplexity", 1.0, 10, 0.1)
    with pytest.raises(CatalogError, match="wait_s must be"):
        Catalog(catalog.path, wait_s=-1)
    assert catalog.scores("r1") == []


def test_non_finite_scores_are_kept(catalog: Catalog) -> None:
    _start(catalog, "r1")
    catalog.add_score("r1", 0, "layers.0", "perplexity", float("inf"), 10, 0.1)
    assert catalog.scores("r1")[0].value == float("inf")


def test_query_is_read_only(catalog: Catalog) -> None:
    _start(catalog, "r1")
    with pytest.raises(CatalogError, match="read-only"):
        catalog.query("DELETE FROM runs")
    assert catalog.query("SELECT run_id FROM runs WHERE pipeline = ?", ["greedy"]) == [("r1",)]


# ---- summaries and views ------------------------------------------------------------------------------


def test_run_summaries_numbers(catalog: Catalog) -> None:
    _fill(catalog, "full")
    _start(catalog, "bare", pipeline="other", model="local:/models/x")
    # Only pruned perplexities, on two datasets: 'c4' sorts before 'wiki'.
    _start(catalog, "pruned-only")
    catalog.add_evaluation("pruned-only", "pruned", "perplexity", "wiki", "perplexity", 20.0)
    catalog.add_evaluation("pruned-only", "pruned", "perplexity", "c4", "perplexity", 25.0)
    catalog.add_evaluation("pruned-only", "pruned", "speed", "a", "perplexity", 1.0)  # other kind
    catalog.add_evaluation("pruned-only", "dense", "perplexity", "c4", "bits_per_byte", 0.9)  # other metric
    summaries = catalog.run_summaries()
    assert [s.run_id for s in summaries] == ["pruned-only", "bare", "full"]  # newest first
    by_id = {s.run_id: s for s in summaries}

    full = by_id["full"]
    assert (full.pipeline, full.status, full.model_source) == ("greedy", "completed", "hf:org/tiny")
    assert full.blocks_removed == 2
    assert full.params_removed == pytest.approx(0.15)
    assert full.params_remaining == 850
    assert full.dense_ppl == 10.0
    assert (full.final_ppl, full.final_stage) == (11.5, "recovered")
    assert full.wall_seconds == 723.0

    bare = by_id["bare"]
    assert (bare.blocks_removed, bare.params_removed, bare.dense_ppl, bare.final_ppl) == (0, None, None, None)
    assert bare.status == "running" and bare.wall_seconds is None

    pruned_only = by_id["pruned-only"]
    assert (pruned_only.dense_ppl, pruned_only.final_ppl, pruned_only.final_stage) == (None, 25.0, "pruned")


def test_run_overview_view_matches_run_summaries(catalog: Catalog) -> None:
    _fill(catalog, "r1")
    _start(catalog, "r2")
    columns = ", ".join(f for f in RunSummary.__dataclass_fields__)
    rows = catalog.query(f"SELECT {columns} FROM run_overview ORDER BY created_at DESC")
    assert [RunSummary.from_db(row) for row in rows] == catalog.run_summaries()


def test_step_scores_view(catalog: Catalog) -> None:
    _fill(catalog, "r1")
    catalog.add_score("r1", 2, "layers.3", "perplexity", 15.0, 2048, 0.4)  # step not finished
    rows = catalog.query(
        "SELECT step, block, value, params_remaining, score_metric, score, score_exact, "
        "candidates, lower_bounds FROM step_scores WHERE run_id = 'r1' ORDER BY step"
    )
    assert rows == [
        (0, "layers.5", 11.0, 900, "perplexity", 11.0, True, 3, 1),
        (1, "layers.7.mlp", 13.0, 850, "perplexity", 13.0, False, 2, 1),
    ]


def test_readme_example_queries(catalog: Catalog) -> None:
    _fill(catalog, "a")
    _fill(catalog, "b")
    catalog.add_evaluation("b", "recovered", "perplexity", "wikitext", "perplexity", 10.5)
    _start(catalog, "c", model="hf:org/other")
    best = catalog.query(EXAMPLE_QUERIES["best final perplexity per model across pipelines"])
    assert best == [("hf:org/tiny", 10.5, "greedy", "b", 10.0)]
    first = catalog.query(EXAMPLE_QUERIES["which block was removed first in every run"])
    assert [(row[0], row[3], row[5], row[6]) for row in first] == [("a", "layers.5", 3, 1), ("b", "layers.5", 3, 1)]


# ---- locking across processes and threads -------------------------------------------------------------


def test_a_process_holding_the_file_makes_catalog_raise_locked(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    Catalog(path)
    holder = _hold_lock(path, hold_s=30)
    try:
        started = time.monotonic()
        with pytest.raises(CatalogLocked) as err:
            Catalog(path, wait_s=1)
        elapsed = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert 0.9 <= elapsed <= 3.0
    message = str(err.value)
    assert str(path) in message
    assert f"process {holder.pid}" in message
    assert "still locked after waiting 1 s" in message
    assert "Traceback" not in message


def test_a_reader_waits_for_a_brief_writer(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    _fill(Catalog(path), "r1")
    holder = _hold_lock(path, hold_s=0.7)
    try:
        started = time.monotonic()
        summaries = Catalog(path, wait_s=10).run_summaries()
        elapsed = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert [s.run_id for s in summaries] == ["r1"]
    assert 0.3 <= elapsed < 5.0


_WRITER = """
import sys
from catalog import Catalog
cat = Catalog(sys.argv[1], wait_s=20)
for i in range(int(sys.argv[2])):
    cat.add_score("r1", 5, f"layers.{i}", "perplexity", float(i), 10, 0.1)
print("done", flush=True)
"""


def test_a_writing_process_and_a_reading_process_interleave(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    cat = Catalog(path, wait_s=20)
    _start(cat, "r1")
    writes = 20
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(writes)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[int] = []
    try:
        while writer.poll() is None:
            seen.append(len(cat.scores("r1", step=5)))
        out, err = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, err
    assert out.strip() == "done"
    assert seen == sorted(seen) and seen  # the reader got in between and saw progress
    assert len(cat.scores("r1", step=5)) == writes


def test_the_lock_is_released_between_calls(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    cat = Catalog(path)
    _fill(cat, "r1")
    # Another process can take the file right after the calls returned, while `cat` is alive.
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys, duckdb; c = duckdb.connect(sys.argv[1]); "
         "print(c.execute('SELECT count(*) FROM scores').fetchone()[0])", str(path)],
        capture_output=True, text=True, timeout=30,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "5"


def test_threads_of_one_process_can_write_concurrently(catalog: Catalog) -> None:
    _start(catalog, "r1")
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for i in range(4):
                catalog.add_score("r1", worker, f"layers.{i}", "perplexity", float(i), 10, 0.1)
                catalog.scores("r1", step=worker)
        except BaseException as exc:  # collected and re-raised by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(catalog.scores("r1")) == 12


# ---- report -------------------------------------------------------------------------------------------


def test_format_duration() -> None:
    assert format_duration(None) == "-"
    assert format_duration(4.4) == "4s"
    assert format_duration(723) == "12m03s"
    assert format_duration(7509) == "2h05m09s"


def test_format_runs(catalog: Catalog) -> None:
    _fill(catalog, "0123456789abcdefXYZ")
    text = format_runs(catalog.run_summaries())
    header, rule, row = text.splitlines()
    for column in ("run", "pipeline", "status", "model", "blocks removed", "params removed",
                   "dense ppl", "final ppl", "wall time"):
        assert column in header
    assert set(rule) <= {"-", " "}
    assert row.split() == ["0123456789ab", "greedy", "completed", "hf:org/tiny", "2", "15.0%",
                           "10.00", "11.50", "12m03s"]
    assert "no runs" in format_runs([])


def test_format_show(catalog: Catalog) -> None:
    _fill(catalog, "r1")
    catalog.add_score("r1", 2, "layers.3", "perplexity", 15.0, 2048, 0.4)
    run = catalog.get_run("r1")
    assert run is not None
    rows = (run, catalog.steps("r1"), catalog.scores("r1"), catalog.evaluations("r1"), catalog.artifacts("r1"))
    brief = format_show(*rows)
    lines = brief.splitlines()
    assert lines[0].split() == ["run", "r1", "(completed)"]
    assert "removed     2 blocks: layers.5, layers.7.mlp" in brief
    assert "perplexity  wikitext: dense 10.00  pruned 13.00  recovered 11.50" in brief
    assert '"max_blocks"' not in brief and "fp-hf:org/tiny" not in brief  # the spec and identities: --verbose
    text = format_show(*rows, verbose=True)
    assert '"max_blocks": 3' in text  # the spec, pretty-printed
    lines = text.splitlines()
    step0 = next(line for line in lines if line.split()[:2] == ["0", "layers.5"])
    step1 = next(line for line in lines if line.split()[:2] == ["1", "layers.7.mlp"])
    assert step0.split() == ["0", "layers.5", "11.00", "3", "1", "900"]
    assert step1.split() == ["1", "layers.7.mlp", ">=13.00", "2", "1", "850"]
    assert "step 2 unfinished: 1 candidate scored" in text
    assert any(line.split()[:5] == ["recovered", "perplexity", "wikitext", "perplexity", "11.50"]
               for line in lines)
    assert any(line.split()[:3] == ["pruned", "model", "1.2"] and "abababababab" in line for line in lines)
    assert "left race" not in text  # a run that did not race keeps its columns


def test_format_show_tells_candidates_that_left_a_race(catalog: Catalog, tmp_path: Path) -> None:
    """A raced step: its leavers' values are partial perplexities, not bounds, shown with their gap."""
    _fill(catalog, "r1")
    catalog.add_score("r1", 1, "layers.2", "perplexity", 19.5, 1024, 0.2, exact=False, std_error=0.002,
                      gap=(0.004, 0.012))
    catalog.add_score("r1", 1, "layers.4", "perplexity", 40.0, 512, 0.1, exact=False, std_error=0.05,
                      gap=(0.2, 0.6))
    rows = (catalog.get_run("r1"), catalog.steps("r1"), catalog.scores("r1"), catalog.evaluations("r1"),
            catalog.artifacts("r1"))
    lines = format_show(*rows).splitlines()
    header = next(line for line in lines if line.split()[:2] == ["step", "removed"])
    assert "left race" in header
    assert next(line for line in lines if line.split()[:2] == ["1", "layers.7.mlp"]).split() == [
        "1", "layers.7.mlp", ">=13.00", "4", "1", "2", "850"]  # layers.7.mlp's own bound is still a bound
    brief = [line.split() for line in lines if line.split()[:2] in (["1", "layers.2"], ["1", "layers.4"])]
    assert brief == [["1", "layers.2", "19.50", "1,024", "+0.0080", "[+0.0040,", "+0.0120]"]]  # the closest one
    verbose = [line.split()[:2] for line in format_show(*rows, verbose=True).splitlines()]
    assert ["1", "layers.2"] in verbose and ["1", "layers.4"] in verbose
    shown = subprocess.run([sys.executable, "-m", "flows.cli", "show", "r1", "--catalog",
                            str(tmp_path / "catalog.duckdb")],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert shown.returncode == 0 and "left race" in shown.stdout and "[+0.0040, +0.0120]" in shown.stdout


def test_width_rows_are_kept_per_run_and_rewritten_in_place(catalog: Catalog) -> None:
    _fill(catalog, "r1")
    catalog.add_unit_scores("r1", "activation", [("layers.2.mlp.channel.0", 0.75)])
    assert catalog.unit_scores("r1") == [("layers.2.attn.head.1", "activation", 2.0),
                                         ("layers.2.mlp.channel.0", "activation", 0.75)]
    catalog.set_plan("r1", '{"layers": {}}')
    assert catalog.plan("r1") == '{"layers": {}}' and catalog.plan("nope") is None
    with pytest.raises(CatalogError, match="plan_json must be a JSON document"):
        catalog.set_plan("r1", "{oops")
    with pytest.raises(CatalogError, match="no run 'other'"):
        catalog.add_unit_scores("other", "activation", [("layers.0.mlp.channel.0", 1.0)])
