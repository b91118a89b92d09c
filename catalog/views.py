"""SQL views over the catalog tables, for `Catalog.run_summaries` and for ad-hoc queries.

They are (re)created whenever a migration runs, always from the definitions below.
"""

from __future__ import annotations

import duckdb

# One row per run. `final_ppl` is the 'recovered' perplexity if the run has one, else the
# 'pruned' one; with several datasets the alphabetically first is used, so the choice is
# stable across runs of different pipelines that evaluate on the same datasets.
RUN_OVERVIEW = """
CREATE OR REPLACE VIEW run_overview AS
WITH step_stats AS (
    SELECT run_id,
           count(*) AS blocks_removed,
           arg_max(params_remaining, step) AS params_remaining
    FROM steps
    GROUP BY run_id
),
ppl AS (
    SELECT run_id, stage, arg_min(value, dataset) AS value
    FROM evaluations
    WHERE kind = 'perplexity' AND metric = 'perplexity'
    GROUP BY run_id, stage
)
SELECT r.run_id,
       r.pipeline,
       r.status,
       r.model_source,
       coalesce(s.blocks_removed, 0) AS blocks_removed,
       TRY_CAST(json_extract_string(r.summary_json, '$.params_removed_ratio') AS DOUBLE)
           AS params_removed,
       dense.value AS dense_ppl,
       CASE WHEN recovered.run_id IS NOT NULL THEN recovered.value ELSE pruned.value END
           AS final_ppl,
       r.wall_seconds,
       r.created_at,
       s.params_remaining,
       CASE WHEN recovered.run_id IS NOT NULL THEN 'recovered'
            WHEN pruned.run_id IS NOT NULL THEN 'pruned' END AS final_stage,
       r.finished_at,
       r.spec_hash,
       r.model_fingerprint
FROM runs r
LEFT JOIN step_stats s ON s.run_id = r.run_id
LEFT JOIN ppl dense ON dense.run_id = r.run_id AND dense.stage = 'dense'
LEFT JOIN ppl pruned ON pruned.run_id = r.run_id AND pruned.stage = 'pruned'
LEFT JOIN ppl recovered ON recovered.run_id = r.run_id AND recovered.stage = 'recovered'
"""

# One row per search step: the removed block, its winning score and how contested the step
# was. `lower_bounds` counts candidates whose evaluation stopped early (scores.exact = false).
# If the winner was scored with several metrics, the one equal to steps.value is reported.
# Beam search records removal sets ('layers.3+layers.7.mlp'); the winner is then the set holding
# the step's block whose score equals steps.value. A consecutive window is scored once, at step 0,
# under its first layer, so its later steps have no score of their own.
STEP_SCORES = """
CREATE OR REPLACE VIEW step_scores AS
WITH candidates AS (
    SELECT run_id, step,
           count(DISTINCT block) AS candidates,
           count(DISTINCT block) FILTER (WHERE NOT exact) AS lower_bounds
    FROM scores
    GROUP BY run_id, step
),
winner AS (
    SELECT st.run_id, st.step, sc.metric, sc.value, sc.exact, sc.n_tokens, sc.seconds, sc.std_error
    FROM steps st
    JOIN scores sc ON sc.run_id = st.run_id AND sc.step = st.step
        AND (sc.block = st.block OR list_contains(string_split(sc.block, '+'), st.block))
    QUALIFY row_number() OVER (
        PARTITION BY st.run_id, st.step
        ORDER BY (sc.value = st.value) DESC, (sc.block = st.block) DESC, sc.metric, sc.block
    ) = 1
)
SELECT st.run_id,
       st.step,
       st.block,
       st.value,
       st.params_remaining,
       w.metric AS score_metric,
       w.value AS score,
       w.exact AS score_exact,
       w.n_tokens AS score_n_tokens,
       w.seconds AS score_seconds,
       coalesce(c.candidates, 0) AS candidates,
       coalesce(c.lower_bounds, 0) AS lower_bounds,
       st.created_at,
       w.std_error AS score_std_error
FROM steps st
LEFT JOIN winner w ON w.run_id = st.run_id AND w.step = st.step
LEFT JOIN candidates c ON c.run_id = st.run_id AND c.step = st.step
"""

# Runs of the same model lined up by budget (the search target) and method (metric, strategy,
# granularity), best final perplexity first within each budget. Read from each run's spec, so runs
# of different pipelines compare as long as they prune the same model_source.
METHOD_COMPARISON = """
CREATE OR REPLACE VIEW method_comparison AS
WITH methods AS (
    SELECT o.run_id, o.pipeline, o.status, o.model_source,
           json_extract_string(r.spec_json, '$.score.metric') AS metric,
           json_extract_string(r.spec_json, '$.search.strategy') AS strategy,
           json_extract_string(r.spec_json, '$.score.granularity') AS granularity,
           TRY_CAST(json_extract_string(r.spec_json, '$.search.target.blocks') AS INTEGER) AS target_blocks,
           TRY_CAST(json_extract_string(r.spec_json, '$.search.target.params_ratio') AS DOUBLE)
               AS target_params_ratio,
           o.blocks_removed, o.params_removed, o.dense_ppl, o.final_ppl, o.final_stage, o.created_at
    FROM run_overview o
    JOIN runs r USING (run_id)
)
SELECT model_source,
       CASE WHEN target_params_ratio IS NOT NULL THEN 'params_ratio=' || CAST(target_params_ratio AS VARCHAR)
            ELSE 'blocks=' || CAST(target_blocks AS VARCHAR) END AS budget,
       metric || '/' || strategy || '/' || granularity AS method,
       metric,
       strategy,
       granularity,
       params_removed,
       blocks_removed,
       dense_ppl,
       final_ppl,
       final_ppl / dense_ppl AS ppl_ratio,
       rank() OVER (
           PARTITION BY model_source, target_blocks, target_params_ratio
           ORDER BY final_ppl ASC NULLS LAST
       ) AS rank_in_budget,
       pipeline,
       run_id,
       status,
       final_stage,
       created_at
FROM methods
"""

VIEWS: tuple[str, ...] = (RUN_OVERVIEW, STEP_SCORES, METHOD_COMPARISON)

# Documented in the README; tests run them so the documentation cannot rot.
EXAMPLE_QUERIES: dict[str, str] = {
    "best final perplexity per model across pipelines": """
SELECT model_source,
       min(final_ppl)                AS best_final_ppl,
       arg_min(pipeline, final_ppl)  AS pipeline,
       arg_min(run_id, final_ppl)    AS run_id,
       arg_min(dense_ppl, final_ppl) AS dense_ppl
FROM run_overview
WHERE status = 'completed' AND final_ppl IS NOT NULL
GROUP BY model_source
ORDER BY model_source
""".strip(),
    "methods compared per model and budget": """
SELECT model_source, budget, rank_in_budget, method, params_removed, final_ppl, pipeline, run_id
FROM method_comparison
WHERE status = 'completed'
ORDER BY model_source, budget, rank_in_budget, run_id
""".strip(),
    "which block was removed first in every run": """
SELECT s.run_id, r.pipeline, r.model_source,
       s.block AS first_block, s.score, s.candidates, s.lower_bounds
FROM step_scores s
JOIN runs r USING (run_id)
QUALIFY row_number() OVER (PARTITION BY s.run_id ORDER BY s.step) = 1
ORDER BY r.created_at, s.run_id
""".strip(),
}


def create_views(conn: duckdb.DuckDBPyConnection) -> None:
    for statement in VIEWS:
        conn.execute(statement)
