"""The `Catalog`: every score, step, evaluation and artifact of every run, in one DuckDB file.

DuckDB lets one process hold a file read-write, and while it does no other process can open
it at all. So every public method opens a connection, runs ONE transaction, commits and
closes: writers hold the file for milliseconds and a reader in another process (`pruneflow
runs`) gets in between. A conflicting lock is retried with backoff for up to `wait_s`.
Writes are upserts keyed by the tables' primary keys, so replaying a stage after an
interruption never counts anything twice.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import duckdb

from catalog import schema
from catalog.rows import (
    EVAL_KINDS,
    EVAL_STAGES,
    FINAL_STATUSES,
    ArtifactRow,
    EvaluationRow,
    RunRow,
    RunSummary,
    ScoreRow,
    StepRow,
)
from tasks.errors import UserError


class CatalogError(UserError, RuntimeError):
    """The catalog cannot be used as asked; the message says why and what to do."""


class CatalogLocked(CatalogError):
    """Another process kept the catalog file locked for longer than `wait_s`."""


# Extensions are never fetched: a catalog must work offline, and a foreign file (e.g. SQLite)
# must be refused rather than trigger a download attempt.
_DUCKDB_CONFIG: dict[str, Any] = {
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
}

_LOCK_MESSAGE = "Could not set lock on file"
_PID_RE = re.compile(r"held in (?P<program>.*?) ?\(PID (?P<pid>\d+)\)")
_FIRST_BACKOFF_S = 0.01
_MAX_BACKOFF_S = 0.05  # short: a writer between two writes frees the file only briefly

# DuckDB shares one database instance between connections of a process and refuses a
# read-only connection while a read-write one is open; serialising this process's own
# connections per file makes that impossible and keeps threads from racing.
_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_lock(path: Path) -> threading.Lock:
    key = str(path.resolve())
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(key, threading.Lock())


class Catalog:
    def __init__(self, path: str | Path, wait_s: float = 30.0) -> None:
        if isinstance(wait_s, bool) or not isinstance(wait_s, numbers.Real) or not (
            0 <= float(wait_s) < math.inf
        ):
            raise CatalogError(f"wait_s must be a finite number of seconds >= 0, got {wait_s!r}")
        # Absolute, so a later chdir cannot point the same Catalog at another file.
        self.path: Path = Path(path).expanduser().absolute()
        self.wait_s: float = float(wait_s)
        self._lock = _process_lock(self.path)
        self._open_or_create()

    def __repr__(self) -> str:
        return f"Catalog({str(self.path)!r})"

    # ---- runs -------------------------------------------------------------------------

    def get_run(self, run_id: str) -> RunRow | None:
        _text("run_id", run_id)
        with self._transaction("reading run", read_only=True) as conn:
            return self._get_run(conn, run_id)

    def start_run(
        self,
        *,
        run_id: str,
        pipeline: str,
        spec_hash: str,
        spec_json: str,
        model_fingerprint: str,
        data_fingerprint: str,
        model_source: str,
        output_dir: str,
    ) -> RunRow:
        """Record a new run, or mark an existing one 'running' again to resume it."""
        for name, value in (
            ("run_id", run_id),
            ("pipeline", pipeline),
            ("spec_hash", spec_hash),
            ("model_fingerprint", model_fingerprint),
            ("data_fingerprint", data_fingerprint),
            ("model_source", model_source),
            ("output_dir", output_dir),
        ):
            _text(name, value)
        _json_text("spec_json", spec_json)
        with self._transaction("starting run", read_only=False) as conn:
            existing = self._get_run(conn, run_id)
            if existing is None:
                conn.execute(
                    "INSERT INTO runs (run_id, pipeline, spec_hash, spec_json, model_fingerprint, "
                    "data_fingerprint, model_source, output_dir, status) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running')",
                    [run_id, pipeline, spec_hash, spec_json, model_fingerprint,
                     data_fingerprint, model_source, output_dir],
                )
            else:
                # Scores already recorded are only valid for the same spec, model and data;
                # resuming with other inputs would silently mix two different searches.
                self._check_resumable(existing, spec_hash, model_fingerprint, data_fingerprint)
                conn.execute(
                    "UPDATE runs SET status = 'running', finished_at = NULL, pipeline = ?, "
                    "spec_json = ?, model_source = ?, output_dir = ? WHERE run_id = ?",
                    [pipeline, spec_json, model_source, output_dir, run_id],
                )
            row = self._get_run(conn, run_id)
        assert row is not None  # written in the same transaction
        return row

    def finish_run(
        self,
        run_id: str,
        status: Literal["completed", "failed"],
        *,
        wall_seconds: float | None = None,
        summary: dict[str, Any] | None = None,
    ) -> None:
        """Close a run. `wall_seconds` and `summary` replace the stored values when given."""
        _text("run_id", run_id)
        _choice("status", status, FINAL_STATUSES)
        if wall_seconds is not None:
            wall_seconds = _real("wall_seconds", wall_seconds, minimum=0.0)
        summary_json: str | None = None
        if summary is not None:
            if not isinstance(summary, dict):
                raise CatalogError(f"summary must be a dict or None, got {type(summary).__name__}")
            try:
                summary_json = json.dumps(summary, sort_keys=True, allow_nan=True)
            except (TypeError, ValueError) as exc:
                raise CatalogError(f"summary of run {run_id!r} is not JSON-serialisable: {exc}") from exc
        with self._transaction("finishing run", read_only=False) as conn:
            self._require_run(conn, run_id)
            conn.execute(
                "UPDATE runs SET status = ?, finished_at = (now() AT TIME ZONE 'UTC'), "
                "wall_seconds = coalesce(?, wall_seconds), "
                "summary_json = coalesce(?, summary_json) WHERE run_id = ?",
                [status, wall_seconds, summary_json, run_id],
            )

    def record_wall(self, run_id: str, wall_seconds: float) -> None:
        """Store a running run's time so far, so an invocation that is killed still leaves its share."""
        _text("run_id", run_id)
        wall_seconds = _real("wall_seconds", wall_seconds, minimum=0.0)
        with self._transaction("recording wall time", read_only=False) as conn:
            self._require_run(conn, run_id)
            conn.execute("UPDATE runs SET wall_seconds = ? WHERE run_id = ?", [wall_seconds, run_id])

    def delete_run(self, run_id: str) -> None:
        """Remove every row of one run from every table (nothing if the run is unknown)."""
        _text("run_id", run_id)
        with self._transaction("deleting run", read_only=False) as conn:
            for table in schema.RUN_TABLES:
                conn.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])

    # ---- search -------------------------------------------------------------------------

    def add_score(
        self,
        run_id: str,
        step: int,
        block: str,
        metric: str,
        value: float,
        n_tokens: int,
        seconds: float,
        exact: bool = True,
        std_error: float | None = None,
        gap: tuple[float, float] | None = None,
    ) -> None:
        _text("run_id", run_id)
        step = _integer("step", step, minimum=0)
        _text("block", block)
        _text("metric", metric)
        # inf/nan are legitimate scores (a candidate can break the model), so no finiteness check.
        value = _real("value", value)
        n_tokens = _integer("n_tokens", n_tokens, minimum=0)
        seconds = _real("seconds", seconds, minimum=0.0)
        if not isinstance(exact, bool):
            raise CatalogError(f"exact must be True or False, got {exact!r}")
        if std_error is not None:
            std_error = _real("std_error", std_error, minimum=0.0)
        low, high = (None, None) if gap is None else (_real("gap_low", gap[0]), _real("gap_high", gap[1]))
        with self._transaction("recording score", read_only=False) as conn:
            self._require_run(conn, run_id)
            conn.execute(
                "INSERT INTO scores (run_id, step, block, metric, value, n_tokens, seconds, exact, std_error, "
                "gap_low, gap_high) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, step, block, metric) DO UPDATE SET "
                "value = excluded.value, n_tokens = excluded.n_tokens, "
                "seconds = excluded.seconds, exact = excluded.exact, std_error = excluded.std_error, "
                "gap_low = excluded.gap_low, gap_high = excluded.gap_high",
                [run_id, step, block, metric, value, n_tokens, seconds, exact, std_error, low, high],
            )

    def scores(self, run_id: str, step: int | None = None) -> list[ScoreRow]:
        """Scores of a run (or of one step), by step, then ascending value."""
        _text("run_id", run_id)
        sql = f"SELECT {ScoreRow.columns()} FROM scores WHERE run_id = ?"
        params: list[Any] = [run_id]
        if step is not None:
            sql += " AND step = ?"
            params.append(_integer("step", step, minimum=0))
        sql += " ORDER BY step, value, block, metric"
        with self._transaction("reading scores", read_only=True) as conn:
            return [ScoreRow.from_db(row) for row in conn.execute(sql, params).fetchall()]

    def add_step(
        self, run_id: str, step: int, block: str, value: float, params_remaining: int
    ) -> None:
        _text("run_id", run_id)
        step = _integer("step", step, minimum=0)
        _text("block", block)
        value = _real("value", value)
        params_remaining = _integer("params_remaining", params_remaining, minimum=0)
        with self._transaction("recording step", read_only=False) as conn:
            self._require_run(conn, run_id)
            conn.execute(
                "INSERT INTO steps (run_id, step, block, value, params_remaining) "
                "VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, step) DO UPDATE SET block = excluded.block, "
                "value = excluded.value, params_remaining = excluded.params_remaining",
                [run_id, step, block, value, params_remaining],
            )

    def steps(self, run_id: str) -> list[StepRow]:
        _text("run_id", run_id)
        with self._transaction("reading steps", read_only=True) as conn:
            rows = conn.execute(
                f"SELECT {StepRow.columns()} FROM steps WHERE run_id = ? ORDER BY step", [run_id]
            ).fetchall()
        return [StepRow.from_db(row) for row in rows]

    # ---- width ---------------------------------------------------------------------------

    def add_unit_scores(self, run_id: str, metric: str, rows: Sequence[tuple[str, float]]) -> None:
        """Every unit's importance under one width metric, written in one transaction."""
        _text("run_id", run_id)
        _text("metric", metric)
        checked = [(run_id, _text("unit", unit), metric, _real("value", value)) for unit, value in rows]
        if not checked:
            return
        with self._transaction("recording unit scores", read_only=False) as conn:
            self._require_run(conn, run_id)
            conn.executemany(
                "INSERT INTO unit_scores (run_id, unit, metric, value) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (run_id, unit, metric) DO UPDATE SET value = excluded.value",
                checked,
            )

    def unit_scores(self, run_id: str) -> list[tuple[str, str, float]]:
        """(unit, metric, value) of a run, by unit id."""
        _text("run_id", run_id)
        with self._transaction("reading unit scores", read_only=True) as conn:
            return conn.execute("SELECT unit, metric, value FROM unit_scores WHERE run_id = ? ORDER BY unit",
                                [run_id]).fetchall()

    def set_plan(self, run_id: str, plan_json: str) -> None:
        _text("run_id", run_id)
        plan_json = _json_text("plan_json", plan_json)
        with self._transaction("recording plan", read_only=False) as conn:
            self._require_run(conn, run_id)
            conn.execute("INSERT INTO plans (run_id, plan_json) VALUES (?, ?) "
                         "ON CONFLICT (run_id) DO UPDATE SET plan_json = excluded.plan_json", [run_id, plan_json])

    def plan(self, run_id: str) -> str | None:
        """The run's width plan as JSON, or None for a depth-only run."""
        _text("run_id", run_id)
        with self._transaction("reading plan", read_only=True) as conn:
            row = conn.execute("SELECT plan_json FROM plans WHERE run_id = ?", [run_id]).fetchone()
        return row[0] if row else None

    # ---- evaluations and artifacts --------------------------------------------------------

    def add_evaluation(
        self,
        run_id: str,
        stage: str,
        kind: str,
        dataset: str,
        metric: str,
        value: float,
        *,
        n_tokens: int | None = None,
        seq_len: int | None = None,
        stride: int | None = None,
        n_samples: int | None = None,
    ) -> None:
        _text("run_id", run_id)
        _choice("stage", stage, EVAL_STAGES)
        _choice("kind", kind, EVAL_KINDS)
        _text("dataset", dataset)
        _text("metric", metric)
        value = _real("value", value)
        n_tokens = None if n_tokens is None else _integer("n_tokens", n_tokens, minimum=0)
        seq_len = None if seq_len is None else _integer("seq_len", seq_len, minimum=1)
        stride = None if stride is None else _integer("stride", stride, minimum=1)
        n_samples = None if n_samples is None else _integer("n_samples", n_samples, minimum=0)
        with self._transaction("recording evaluation", read_only=False) as conn:
            self._require_run(conn, run_id)
            conn.execute(
                "INSERT INTO evaluations (run_id, stage, kind, dataset, metric, value, "
                "n_tokens, seq_len, stride, n_samples) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, stage, kind, dataset, metric) DO UPDATE SET "
                "value = excluded.value, n_tokens = excluded.n_tokens, "
                "seq_len = excluded.seq_len, stride = excluded.stride, n_samples = excluded.n_samples",
                [run_id, stage, kind, dataset, metric, value, n_tokens, seq_len, stride, n_samples],
            )

    def evaluations(self, run_id: str) -> list[EvaluationRow]:
        """Evaluations in pipeline order: dense, pruned, recovered; then kind, dataset, metric."""
        _text("run_id", run_id)
        with self._transaction("reading evaluations", read_only=True) as conn:
            rows = conn.execute(
                f"SELECT {EvaluationRow.columns()} FROM evaluations WHERE run_id = ? "
                f"ORDER BY {_stage_order('stage')}, kind, dataset, metric",
                [run_id],
            ).fetchall()
        return [EvaluationRow.from_db(row) for row in rows]

    def add_artifact(
        self, run_id: str, stage: str, kind: str, path: str, sha256: str, bytes: int
    ) -> None:
        _text("run_id", run_id)
        _text("stage", stage)
        _text("kind", kind)
        _text("path", str(path) if isinstance(path, Path) else path)
        _text("sha256", sha256)
        size = _integer("bytes", bytes, minimum=0)
        with self._transaction("recording artifact", read_only=False) as conn:
            self._require_run(conn, run_id)
            conn.execute(
                "INSERT INTO artifacts (run_id, stage, kind, path, sha256, bytes) "
                "VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, stage, kind) DO UPDATE SET path = excluded.path, "
                "sha256 = excluded.sha256, bytes = excluded.bytes",
                [run_id, stage, kind, str(path), sha256, size],
            )

    def artifacts(self, run_id: str) -> list[ArtifactRow]:
        _text("run_id", run_id)
        with self._transaction("reading artifacts", read_only=True) as conn:
            rows = conn.execute(
                f"SELECT {ArtifactRow.columns()} FROM artifacts WHERE run_id = ? "
                f"ORDER BY {_stage_order('stage')}, stage, kind",
                [run_id],
            ).fetchall()
        return [ArtifactRow.from_db(row) for row in rows]

    # ---- overview -------------------------------------------------------------------------

    def run_summaries(self) -> list[RunSummary]:
        """One summary per run, newest first; read from the `run_overview` view."""
        with self._transaction("reading run overview", read_only=True) as conn:
            rows = conn.execute(
                f"SELECT {RunSummary.columns()} FROM run_overview "
                "ORDER BY created_at DESC, run_id"
            ).fetchall()
        return [RunSummary.from_db(row) for row in rows]

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one read-only SQL statement (the connection is read-only, so writes fail)."""
        _text("sql", sql)
        with self._transaction("query", read_only=True) as conn:
            return conn.execute(sql, list(params)).fetchall()

    # ---- connections ----------------------------------------------------------------------

    def _open_or_create(self) -> None:
        if self.path.is_dir():
            raise CatalogError(f"catalog {self.path} is a directory, not a DuckDB catalog file")
        if self.path.exists():
            # Read-only first: checking a file must never modify it, even a foreign or newer one.
            with self._transaction("reading schema version", read_only=True) as conn:
                try:
                    found = schema.read_version(conn)
                    if found is not None:
                        _read_every_table(conn)
                except duckdb.Error as exc:
                    raise self._unreadable(exc) from exc
                version = self._checked_version(found)
            if version == schema.latest_version():
                return
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CatalogError(f"cannot create the directory of catalog {self.path}: {exc}") from exc
        with self._transaction("migrating schema", read_only=False) as conn:
            # Read again under the write lock: another process may have migrated meanwhile.
            schema.apply_pending(conn, self._checked_version(schema.read_version(conn)))

    def _checked_version(self, version: int | None) -> int:
        if version is None:
            raise CatalogError(
                f"{self.path} is a DuckDB database but not a pruneflow catalog (it has tables but "
                "no schema_version table); pass another catalog path"
            )
        latest = schema.latest_version()
        if version > latest:
            raise CatalogError(
                f"catalog {self.path} has schema version {version}; this pruneflow understands "
                f"up to {latest}: upgrade pruneflow or use another catalog file"
            )
        return version

    @contextmanager
    def _transaction(self, action: str, *, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        """One connection, one transaction: committed on success, rolled back on any error."""
        deadline = time.monotonic() + self.wait_s
        if not self._lock.acquire(timeout=self.wait_s):
            raise CatalogLocked(
                f"catalog {self.path} stayed busy in another thread of this process for "
                f"{self.wait_s:g} s ({action})"
            )
        try:
            conn = self._connect(read_only, deadline)
            # No explicit ROLLBACK on error: closing a connection discards its open
            # transaction, and a failing ROLLBACK must not mask the original error.
            try:
                conn.execute("BEGIN TRANSACTION")
                yield conn
                conn.execute("COMMIT")
            except duckdb.Error as exc:
                if _is_damage(exc):
                    raise self._unreadable(exc) from exc
                raise CatalogError(f"catalog {self.path}: {action} failed: {exc}") from exc
            finally:
                conn.close()
        finally:
            self._lock.release()

    def _connect(self, read_only: bool, deadline: float) -> duckdb.DuckDBPyConnection:
        existed = self.path.exists()
        delay = _FIRST_BACKOFF_S
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only, config=_DUCKDB_CONFIG)
            except duckdb.Error as exc:
                message = str(exc)
                if _LOCK_MESSAGE not in message:
                    raise self._open_error(exc, existed) from exc
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CatalogLocked(self._locked_message(message)) from exc
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, _MAX_BACKOFF_S)

    def _locked_message(self, duckdb_message: str) -> str:
        match = _PID_RE.search(duckdb_message)
        holder = "another process"
        if match:
            program = match.group("program").strip()
            holder = f"process {match.group('pid')}" + (f" ({program})" if program else "")
        return (
            f"catalog {self.path} is locked by {holder} and was still locked after waiting "
            f"{self.wait_s:g} s. DuckDB lets only one process open the file while it writes: "
            "wait for that process to finish, or pass a longer wait"
        )

    def _open_error(self, exc: duckdb.Error, existed: bool) -> CatalogError:
        message = str(exc)
        if "Permission denied" in message:
            return CatalogError(f"cannot open catalog {self.path}: permission denied ({message})")
        if "different configuration" in message:
            return CatalogError(
                f"cannot open catalog {self.path}: this process already holds a DuckDB connection "
                f"to it opened outside pruneflow's Catalog; close it first ({message})"
            )
        if not existed:
            return CatalogError(f"cannot open or create catalog {self.path}: {message}")
        return self._unreadable(exc)

    def _unreadable(self, cause: duckdb.Error | str) -> CatalogError:
        return CatalogError(
            f"{self.path} is not a readable DuckDB catalog ({cause}). It was left untouched: "
            "move it aside (e.g. rename it) to start a new catalog at this path, "
            "or pass another catalog path"
        )

    def _get_run(self, conn: duckdb.DuckDBPyConnection, run_id: str) -> RunRow | None:
        row = conn.execute(f"SELECT {RunRow.columns()} FROM runs WHERE run_id = ?", [run_id]).fetchone()
        return None if row is None else RunRow.from_db(row)

    def _require_run(self, conn: duckdb.DuckDBPyConnection, run_id: str) -> None:
        if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone() is None:
            raise CatalogError(f"no run {run_id!r} in catalog {self.path}: call start_run first")

    def _check_resumable(
        self, existing: RunRow, spec_hash: str, model_fingerprint: str, data_fingerprint: str
    ) -> None:
        for name, stored, given in (
            ("spec_hash", existing.spec_hash, spec_hash),
            ("model_fingerprint", existing.model_fingerprint, model_fingerprint),
            ("data_fingerprint", existing.data_fingerprint, data_fingerprint),
        ):
            if stored != given:
                raise CatalogError(
                    f"run {existing.run_id!r} in catalog {self.path} was recorded with "
                    f"{name} {stored!r}, not {given!r}: its scores do not apply to these inputs; "
                    "delete the run (run --fresh) or use another run id"
                )


def _read_every_table(conn: duckdb.DuckDBPyConnection) -> None:
    """Read every row once: DuckDB reads blocks lazily, so a truncated file opens fine and fails only
    when a lost block is needed, perhaps in the middle of a search. A file left by a killed writer
    (pending WAL, pre-allocated blocks) reads fine and passes."""
    tables = conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'"
    ).fetchall()
    for (table,) in tables:
        conn.execute(f'SELECT * FROM "{table}"').fetchall()


# ---- boundary validation ----------------------------------------------------------------------


def _text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _json_text(name: str, value: object) -> str:
    _text(name, value)
    try:
        json.loads(value)  # type: ignore[arg-type]
    except ValueError as exc:
        raise CatalogError(f"{name} must be a JSON document: {exc}") from exc
    return value  # type: ignore[return-value]


def _choice(name: str, value: object, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise CatalogError(f"{name} must be one of {', '.join(accepted)}; got {value!r}")
    return value  # type: ignore[return-value]


def _integer(name: str, value: object, *, minimum: int) -> int:
    # bool is an Integral too, and True as a step number is always a bug.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CatalogError(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise CatalogError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _real(name: str, value: object, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CatalogError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if minimum is not None and not (number >= minimum and math.isfinite(number)):
        raise CatalogError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return number


def _is_damage(exc: duckdb.Error) -> bool:
    """DuckDB errors that mean the file's content is damaged, as opposed to a bad statement."""
    message = str(exc)
    return "Could not read enough bytes" in message or "Corrupt database file" in message


def _stage_order(column: str) -> str:
    cases = " ".join(f"WHEN '{stage}' THEN {i}" for i, stage in enumerate(EVAL_STAGES))
    return f"CASE {column} {cases} ELSE {len(EVAL_STAGES)} END"
