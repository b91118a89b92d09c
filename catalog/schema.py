"""Catalog DDL as an append-only list of migrations.

Migration N is `MIGRATIONS[N - 1]`. A released migration is never edited: a schema change
is a new function appended to `MIGRATIONS`, so every existing catalog file replays exactly
the steps it has not seen. The caller runs `apply_pending` inside one transaction, so a
failing migration leaves the file at its previous version.
"""

from __future__ import annotations

from typing import Callable

import duckdb

from catalog import views

Migration = Callable[[duckdb.DuckDBPyConnection], None]

# DuckDB's current_timestamp is TIMESTAMPTZ; converting it explicitly keeps stored
# timestamps in UTC whatever the session's TimeZone setting is.
_NOW_UTC = "(now() AT TIME ZONE 'UTC')"

_VERSION_TABLE_DDL = """
CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER PRIMARY KEY,
    applied_at TIMESTAMP NOT NULL
)
"""

# No FOREIGN KEYs: DuckDB rejects updates of referenced rows, which would break the
# upsert of `runs`; the store checks that the run exists instead, in the same transaction.
_INITIAL_DDL = (
    f"""
    CREATE TABLE runs (
        run_id            VARCHAR PRIMARY KEY,
        pipeline          VARCHAR NOT NULL,
        spec_hash         VARCHAR NOT NULL,
        spec_json         VARCHAR NOT NULL,
        model_fingerprint VARCHAR NOT NULL,
        data_fingerprint  VARCHAR NOT NULL,
        model_source      VARCHAR NOT NULL,
        output_dir        VARCHAR NOT NULL,
        status            VARCHAR NOT NULL
            CHECK (status IN ('running', 'completed', 'failed')),
        created_at        TIMESTAMP NOT NULL DEFAULT {_NOW_UTC},
        finished_at       TIMESTAMP,
        wall_seconds      DOUBLE,
        summary_json      VARCHAR
    )
    """,
    f"""
    CREATE TABLE scores (
        run_id     VARCHAR NOT NULL,
        step       INTEGER NOT NULL,
        block      VARCHAR NOT NULL,
        metric     VARCHAR NOT NULL,
        value      DOUBLE NOT NULL,
        n_tokens   BIGINT NOT NULL,
        seconds    DOUBLE NOT NULL,
        exact      BOOLEAN NOT NULL DEFAULT true,
        created_at TIMESTAMP NOT NULL DEFAULT {_NOW_UTC},
        PRIMARY KEY (run_id, step, block, metric)
    )
    """,
    f"""
    CREATE TABLE steps (
        run_id           VARCHAR NOT NULL,
        step             INTEGER NOT NULL,
        block            VARCHAR NOT NULL,
        value            DOUBLE NOT NULL,
        params_remaining BIGINT NOT NULL,
        created_at       TIMESTAMP NOT NULL DEFAULT {_NOW_UTC},
        PRIMARY KEY (run_id, step)
    )
    """,
    f"""
    CREATE TABLE evaluations (
        run_id     VARCHAR NOT NULL,
        stage      VARCHAR NOT NULL CHECK (stage IN ('dense', 'pruned', 'recovered')),
        kind       VARCHAR NOT NULL CHECK (kind IN ('perplexity', 'task', 'speed', 'size')),
        dataset    VARCHAR NOT NULL,
        metric     VARCHAR NOT NULL,
        value      DOUBLE NOT NULL,
        n_tokens   BIGINT,
        seq_len    INTEGER,
        stride     INTEGER,
        created_at TIMESTAMP NOT NULL DEFAULT {_NOW_UTC},
        PRIMARY KEY (run_id, stage, kind, dataset, metric)
    )
    """,
    f"""
    CREATE TABLE artifacts (
        run_id     VARCHAR NOT NULL,
        stage      VARCHAR NOT NULL,
        kind       VARCHAR NOT NULL,
        path       VARCHAR NOT NULL,
        sha256     VARCHAR NOT NULL,
        bytes      BIGINT NOT NULL,
        created_at TIMESTAMP NOT NULL DEFAULT {_NOW_UTC},
        PRIMARY KEY (run_id, stage, kind)
    )
    """,
)


def _m1_initial(conn: duckdb.DuckDBPyConnection) -> None:
    for statement in _INITIAL_DDL:
        conn.execute(statement)


def _m2_score_std_error(conn: duckdb.DuckDBPyConnection) -> None:
    # Sampled metrics (Shapley) are estimates: their standard error sits beside the value, NULL for
    # exact metrics.
    conn.execute("ALTER TABLE scores ADD COLUMN std_error DOUBLE")


def _m3_evaluation_samples(conn: duckdb.DuckDBPyConnection) -> None:
    # Downstream tasks count examples, not tokens: their sample count gets a column of its own.
    conn.execute("ALTER TABLE evaluations ADD COLUMN n_samples BIGINT")


def _m4_score_gaps(conn: duckdb.DuckDBPyConnection) -> None:
    # Racing: a candidate that left the race keeps the confidence interval of its gap to the leader.
    conn.execute("ALTER TABLE scores ADD COLUMN gap_low DOUBLE")
    conn.execute("ALTER TABLE scores ADD COLUMN gap_high DOUBLE")


def _m5_width(conn: duckdb.DuckDBPyConnection) -> None:
    # Width pruning: every head, KV group and MLP channel's importance, and each run's final plan.
    conn.execute(f"""
        CREATE TABLE unit_scores (
            run_id     VARCHAR NOT NULL,
            unit       VARCHAR NOT NULL,
            metric     VARCHAR NOT NULL,
            value      DOUBLE NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT {_NOW_UTC},
            PRIMARY KEY (run_id, unit, metric)
        )
    """)
    conn.execute(f"""
        CREATE TABLE plans (
            run_id     VARCHAR PRIMARY KEY,
            plan_json  VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT {_NOW_UTC}
        )
    """)


MIGRATIONS: list[Migration] = [
    _m1_initial,
    _m2_score_std_error,
    _m3_evaluation_samples,
    _m4_score_gaps,
    _m5_width,
]

# Tables that every migrated catalog has; `delete_run` clears a run from each of them.
RUN_TABLES: tuple[str, ...] = ("scores", "steps", "evaluations", "artifacts", "unit_scores", "plans", "runs")


def latest_version() -> int:
    """The newest schema version this code can write (looked up live so tests can extend the list)."""
    return len(MIGRATIONS)


SCHEMA_VERSION: int = latest_version()


def read_version(conn: duckdb.DuckDBPyConnection) -> int | None:
    """The file's schema version: 0 for an empty database, None for a database that is not a catalog."""
    tables = {
        name
        for (name,) in conn.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'main' AND table_catalog = current_database()"
        ).fetchall()
    }
    if "schema_version" not in tables:
        return 0 if not tables else None
    (version,) = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()  # type: ignore[misc]
    return int(version)


def apply_pending(conn: duckdb.DuckDBPyConnection, current: int) -> list[int]:
    """Run migrations newer than `current` on `conn`'s open transaction; returns the versions applied."""
    applied: list[int] = []
    conn.execute(_VERSION_TABLE_DDL)
    for version, migration in enumerate(MIGRATIONS, start=1):
        if version <= current:
            continue
        migration(conn)
        conn.execute(
            f"INSERT INTO schema_version (version, applied_at) VALUES (?, {_NOW_UTC})", [version]
        )
        applied.append(version)
    if applied:
        # Views are derived, not versioned: recreating them from the code's current
        # definitions after the tables change means no migration has to patch a view.
        views.create_views(conn)
    return applied
