"""Racing (`search.mode: racing`): candidates leave once they are behind the leader (or, for a strategy
that keeps several, as many references) with confidence; the rest run every window, so the chosen blocks
and the winners' scores are those of exact mode, for every perplexity-driven strategy."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.score.racing import Racer, RacingOptions, RacingScorer, leavers, looks, t_quantile
from tasks.search import MemoryRecorder, Target, run_search
from tests.searchkit import search_context
from tests.tiny import recurrence_windows, tiny_model


@pytest.fixture(scope="module")
def trained():
    model = tiny_model(layers=4)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        batch = recurrence_windows(8, 24, generator)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, recurrence_windows(32, 16, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("p, dof, expected", [(0.975, 10, 2.228139), (0.999, 7, 4.785290), (0.995, 1, 63.65674),
                                              (0.9999, 31, 4.215503)])
def test_t_quantile_matches_the_tables(p, dof, expected):
    assert t_quantile(p, dof) == pytest.approx(expected, rel=1e-6)


def test_looks_count_the_chances_to_leave():
    options = RacingOptions(min_windows=8, round_windows=4)
    assert looks(8, options) == 0  # the first look would see every window: none is taken
    assert looks(9, options) == 1 and looks(12, options) == 1 and looks(13, options) == 2
    assert looks(64, options) == 1 + (64 - 1 - 8) // 4


def test_the_best_rarely_leaves_and_clearly_worse_ones_do():
    """The bound at one look: over many synthetic races the best leaves at most as often as alpha allows
    (with a binomial margin), while candidates one standard error per window behind mostly leave."""
    generator = torch.Generator().manual_seed(0)
    alpha, trials, dropped_best, dropped_worse = 0.05, 400, 0, 0
    for _ in range(trials):
        shared = torch.randn(32, generator=generator) * 5  # the windows' own spread, common to all
        nll = {"best": shared + torch.randn(32, generator=generator) * 0.5}
        nll["twin"] = shared + torch.randn(32, generator=generator) * 0.5  # as good as the best
        nll["worse"] = shared + 1.0 + torch.randn(32, generator=generator) * 0.5
        left = leavers(nll, alpha)
        dropped_best += "best" in left
        dropped_worse += "worse" in left
        if "worse" in left:
            gap = left["worse"]
            assert gap.low > 0 and gap.low < gap.mean < gap.high
    assert dropped_best <= alpha * trials + 3 * math.sqrt(alpha * (1 - alpha) * trials)
    assert dropped_worse >= 0.95 * trials


def test_racing_picks_the_exact_blocks_with_the_exact_scores_for_less_work(trained):
    model, windows = trained
    runs = {}
    for racing in (False, True):
        ctx = search_context(model, windows, target=Target(blocks=2))
        if racing:
            ctx.scoring.scorer = RacingScorer(model, windows, 1, RacingOptions(confidence=0.99))
        records = run_search(ctx, "iterative")
        runs[racing] = ([(r.block, r.value) for r in records], ctx.scorer.work.unit_windows, ctx.recorder.scores)
    (exact, exact_work, _), (raced, raced_work, scores) = runs[False], runs[True]
    assert raced == exact  # same blocks, same floats
    left = [s for step in scores.values() for s in step.values() if not s.exact]
    assert left and raced_work < 0.8 * exact_work
    for score in left:
        assert score.n_tokens < 32 * 15 and 0 < score.gap_low < score.gap_high and score.std_error > 0
    winners = {b for b, _ in raced}
    assert all(scores[step][block].exact for step, (block, _) in enumerate(raced)) and len(winners) == 2


def test_resumed_race_reuses_recorded_scores(trained):
    model, windows = trained
    def race(recorder):
        ctx = search_context(model, windows, target=Target(blocks=2), recorder=recorder)
        ctx.scoring.scorer = RacingScorer(model, windows, 1, RacingOptions())
        return run_search(ctx, "iterative"), ctx
    full, _ = race(MemoryRecorder())
    partial = MemoryRecorder()
    first, ctx = race(partial)
    # Interrupted during step 1 after three candidates were recorded.
    partial.steps = partial.steps[:1]
    partial.scores = {0: partial.scores[0], 1: dict(list(partial.scores[1].items())[:3])}
    again, resumed = race(partial)
    assert again == full == first and resumed.reused == 3


def test_a_race_for_the_best_k_drops_only_those_behind_k_references():
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(24, generator=generator) * 5
    nll = {name: shared + shift + torch.randn(24, generator=generator) * 0.1
           for name, shift in [("a", 0.0), ("b", 0.05), ("c", 2.0), ("d", 2.0), ("e", 4.0)]}
    assert set(leavers(nll, 0.001, keep=1)) == {"c", "d", "e"}
    assert set(leavers(nll, 0.001, keep=2)) == {"c", "d", "e"}
    # c and d are the third and fourth: keeping three, only e is behind all three references.
    left = leavers(nll, 0.001, keep=3)
    assert set(left) == {"e"} and 1.5 < left["e"].mean < 2.5 and left["e"].low > 0  # least sure: behind c or d
    assert leavers(nll, 0.001, keep=5) == {}


def test_a_fixed_reference_drops_with_its_own_level():
    """A yardstick chosen before the windows were drawn needs no correction for which candidate leads, so
    its level is far looser: a candidate behind it leaves where the leader test at its level keeps it."""
    generator = torch.Generator().manual_seed(1)
    shared = torch.randn(12, generator=generator) * 5
    nll = {"a": shared + torch.randn(12, generator=generator) * 0.5,
           "b": shared + 0.05 + torch.randn(12, generator=generator) * 0.5,
           "c": shared + 1.0 + torch.randn(12, generator=generator) * 0.5}
    assert "c" not in leavers(nll, 1e-7)
    left = leavers(nll, 1e-7, fixed="b", fixed_alpha=1e-3)
    assert set(left) == {"c"} and left["c"].low > 0 and 0.5 < left["c"].mean < 1.5  # the gap to b decided
    assert leavers(nll, 1e-7, fixed="missing", fixed_alpha=1e-3) == leavers(nll, 1e-7)


def test_every_step_draws_its_own_window_order():
    racer = Racer(RacingOptions(seed=3, min_windows=4, round_windows=2), [1] * 16, [15] * 16)
    first, second = racer.rounds(0), racer.rounds(1)
    assert first == racer.rounds(0) and first != second
    assert sorted(i for r in first for i in r) == sorted(i for r in second for i in r) == list(range(16))
    assert [len(r) for r in first] == [4, 2, 2, 2, 2, 2, 2]


def test_step_tables_tell_left_candidates_from_bounds():
    from flows.ui import step_rows
    from tasks.score import CandidateScore

    scores = {"a": CandidateScore("a", 17.0, 8160, 1.0),
              "b": CandidateScore("b", 16.5, 2040, 0.3, exact=False, std_error=0.002, gap_low=0.003, gap_high=0.011),
              "c": CandidateScore("c", 30.0, 255, 0.1, exact=False)}
    rows = step_rows(scores, ["a"], 4)
    assert [(r["block"], r["kind"], r["gap low"], r["removed"]) for r in rows] == [
        ("b", "left the race (windows seen)", 0.003, ""), ("a", "exact", None, "step 4"),
        ("c", "lower bound", None, "")]


def _raced_and_exact(model, windows, strategy: str, target: Target, **kwargs):
    """(records, unit windows, scores) of an exact search and of the same search raced."""
    runs = []
    for racing in (None, RacingOptions(confidence=0.99)):
        ctx = search_context(model, windows, target=target, racing=racing, **kwargs)
        records = run_search(ctx, strategy)
        runs.append(([(r.block, r.value) for r in records], ctx.scorer.work.unit_windows, ctx.recorder.scores))
    return runs


@pytest.mark.parametrize("strategy, target, kwargs", [
    ("one_shot", Target(blocks=3), {}),
    ("one_shot", Target(params_ratio=0.2), {}),
    ("beam", Target(blocks=2), {"strategy_settings": {"width": 2}}),
    ("consecutive", Target(blocks=2), {"granularity": "layer"}),
    ("iterative", Target(params_ratio=0.2), {"objective": "ppl_per_param"}),
])
def test_every_perplexity_strategy_races_to_the_exact_choice(trained, strategy, target, kwargs):
    model, windows = trained
    (exact, exact_work, _), (raced, raced_work, scores) = _raced_and_exact(model, windows, strategy, target, **kwargs)
    assert raced == exact  # the same plan, with the same floats
    left = [s for step in scores.values() for s in step.values() if not s.exact]
    assert raced_work <= exact_work
    if strategy != "consecutive":  # three segments of two layers: too close to tell apart on 32 windows
        assert left and raced_work < exact_work
    for score in left:
        assert score.gap_low > 0 and score.n_tokens < 32 * 15


def test_a_larger_budget_re_races_what_left_a_smaller_one(trained):
    """one_shot for 1 block then 6 on one recorder: candidates that left the first race (which kept one)
    race again, so the larger plan is exact mode's too."""
    model, windows = trained
    plans = {}
    for racing in (None, RacingOptions(confidence=0.99)):
        recorder = MemoryRecorder()
        for blocks in (1, 6):
            ctx = search_context(model, windows, target=Target(blocks=blocks), racing=racing, recorder=recorder)
            plans[racing is not None, blocks] = [(r.block, r.value) for r in run_search(ctx, "one_shot")]
    assert plans[True, 1] == plans[False, 1] and plans[True, 6] == plans[False, 6]


def test_one_shot_keeps_as_many_as_its_plan_may_take(trained):
    model, windows = trained
    ctx = search_context(model, windows, target=Target(params_ratio=0.2))
    candidates = ctx.candidates([])
    most = ctx.goal.most_blocks(candidates)
    smallest = sorted(candidates, key=lambda c: ctx.goal.params_of([c]))
    assert ctx.target_met(smallest[:most]) and not ctx.target_met(smallest[: most - 1])
    assert ctx.goal.most_blocks(candidates) >= 2  # attention halves are the smaller ones: more than one


def test_round_entry_states_keep_memory_to_a_round(trained):
    """A budget too small for every entry state: the race computes them per round, with the same result."""
    model, windows = trained
    runs = []
    for budget in (None, 1e-6):
        ctx = search_context(model, windows, target=Target(blocks=2), racing=RacingOptions(), memory_budget_gb=budget)
        records = run_search(ctx, "iterative")
        runs.append(([(r.block, r.value) for r in records], ctx.scorer))
    (whole, whole_scorer), (rounds, round_scorer) = runs
    assert rounds == whole and round_scorer.per_round and not whole_scorer.per_round
    state = windows[:1].numel() * model.config.hidden_size * 4  # one window's hidden states, float32
    units = len(round_scorer.runner.units)
    assert round_scorer.work.stored_bytes <= units * 8 * state < whole_scorer.work.stored_bytes
    assert round_scorer.current_perplexity(set()) == whole_scorer.current_perplexity(set())


def _cli(*args: str):
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], stdin=subprocess.DEVNULL, timeout=600)


def test_racing_through_the_command_line(tmp_path, capsys):
    import duckdb

    from flows.cli import main
    from tests.flowkit import tiny_pipeline

    pipeline = tiny_pipeline(tmp_path, calibration={"samples": 16, "seq_len": 16},
                             search={"target": {"blocks": 2}, "mode": "racing", "racing": {"min_windows": 4}})

    def validate(*settings: str) -> tuple[int, str]:
        code = main(["validate", str(pipeline), *(arg for setting in settings for arg in ("--set", setting))])
        return code, capsys.readouterr().err

    for strategy in ("one_shot", "beam", "consecutive"):
        assert validate(f"search.strategy={strategy}", "score.granularity=layer")[0] == 0
    # One refusal from a real process: exit 2, one message, no traceback.
    refused = _cli("validate", str(pipeline), "--set", "score.metric=block_influence",
                   "--set", "score.granularity=layer")
    assert refused.returncode == 2 and "search.mode 'racing'" in refused.stderr and "'perplexity'" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert validate("search.objective=ppl_per_param")[0] == 0
    code, message = validate("search.objective=ppl_per_param", "search.strategy=one_shot")
    assert code == 2 and "search.objective ppl_per_param" in message
    code, message = validate("search.exact_scores=true")
    assert code == 2 and "contradicts search.exact_scores" in message
    done = _cli("run", str(pipeline))
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = done.stdout.split()[1]
    db = duckdb.connect(str(tmp_path / "out" / "catalog.duckdb"), read_only=True)
    rows = db.execute("select s.block, s.exact, s.gap_low, s.gap_high from scores s join steps t "
                      "on s.run_id = t.run_id and s.step = t.step and s.block = t.block where s.run_id = ?",
                      [run_id]).fetchall()
    assert len(rows) == 2 and all(exact and low is None for _, exact, low, _ in rows)  # winners are exact
    spec = db.execute("select spec_json from runs where run_id = ?", [run_id]).fetchone()[0]
    assert '"mode":"racing"' in spec.replace(" ", "") and '"min_windows":4' in spec.replace(" ", "")


@pytest.mark.integration  # a flow with a Prefect server, about a minute
def test_hundreds_of_calibration_windows_race_within_the_memory_budget(tmp_path):
    """256 windows whose entry states (8 units x 256 x 16 tokens x 64 values) do not fit a 1 MB budget:
    the race keeps a round's states at a time and still runs through the flow."""
    from flows import prune_pipeline
    from tests.flowkit import tiny_pipeline

    pipeline = tiny_pipeline(tmp_path, calibration={"samples": 256, "seq_len": 16},
                             score={"memory_budget_gb": 1e-3}, search={"target": {"blocks": 1}, "mode": "racing"})
    summary = prune_pipeline(str(pipeline))
    one_window = 16 * 64 * 4  # float32 hidden states of one window
    every_state = 8 * 256 * one_window
    assert 0 < summary["search"]["stored_bytes"] <= 8 * 8 * one_window < 1e-3 * 2**30 < every_state


def test_a_race_runs_its_rounds_on_the_candidate_threads_with_the_same_floats(trained):
    """Side by side, a round's (candidate, window) pairs go to the candidate threads, one torch thread each:
    on the caller's thread a team of torch threads waits at every operation for a member that a busy core
    has descheduled, which made racing several times slower than exact mode on shared cores (issue 36).
    The race itself is the same: the same blocks, scores and leavers as one pair at a time."""
    import threading

    model, windows = trained
    threads = torch.get_num_threads()
    runs, where = [], set()
    for parallel in (1, 2):
        ctx = search_context(model, windows, target=Target(blocks=2), racing=RacingOptions(),
                             parallel_candidates=parallel)
        batch_nll = ctx.scorer._batch_nll

        def observed(*args, parallel=parallel, batch_nll=batch_nll):
            on_pool = threading.current_thread().name.startswith("pruneflow-candidate")
            where.add((parallel, on_pool, torch.get_num_threads()))
            return batch_nll(*args)

        ctx.scorer._batch_nll = observed
        records = run_search(ctx, "iterative")
        assert torch.get_num_threads() == threads
        runs.append(([(r.block, r.value) for r in records],
                     {(step, b): (s.value, s.exact, s.n_tokens, s.gap_low) for step, scores in ctx.recorder.scores.items()
                      for b, s in scores.items()}))
    assert where == {(1, False, threads), (2, True, 1)}
    assert runs[0] == runs[1]
    assert any(not exact for _, exact, _, _ in runs[1][1].values())  # candidates left the race side by side too


def test_auto_mode_races_only_where_a_race_can_drop_candidates(tmp_path, trained):
    """search.mode: auto races from twice racing.min_windows windows, else takes bounded mode where the
    strategy and objective allow it, else exact; it says why, and it picks exact mode's blocks."""
    from pipelines import load_spec
    from tasks.search import SearchContext
    from tests.flowkit import tiny_pipeline

    model, windows = trained
    pipeline = tiny_pipeline(tmp_path, search={"target": {"blocks": 2}, "mode": "auto"})

    def chosen(n: int, *overrides: str) -> tuple[str, str]:
        spec = load_spec(pipeline, list(overrides))
        ctx = SearchContext.of(model, windows[:n], spec.score, spec.search)
        return ctx.scoring.mode, ctx.scoring.mode_reason

    assert chosen(16)[0] == chosen(32)[0] == "racing" and "16 windows" in chosen(16)[1]
    assert chosen(15)[0] == "bounded" and "fewer than twice racing.min_windows (16)" in chosen(15)[1]
    assert chosen(8, "search.racing.min_windows=4")[0] == "racing"
    assert chosen(15, "search.objective=ppl_per_param")[0] == "exact"  # ppl_per_param needs exact scores
    assert chosen(32, "search.objective=ppl_per_param")[0] == "racing"
    mode, reason = chosen(15, "search.strategy=one_shot")  # one_shot races but takes no lower bounds
    assert mode == "exact" and "bounded mode does not fit strategy 'one_shot'" in reason
    mode, reason = chosen(32, "score.metric=block_influence", "score.granularity=layer")
    assert mode == "exact" and "racing does not fit" in reason and "metric 'block_influence'" in reason
    assert chosen(4, "search.mode=racing") == ("racing", "search.mode says racing")
    assert chosen(4, "search.mode=exact")[0] == "exact" and chosen(4)[0] == "bounded"
    spec = load_spec(pipeline)
    auto = SearchContext.of(model, windows, spec.score, spec.search)
    blocks = [(r.block, r.value) for r in run_search(auto, "iterative")]
    exact = search_context(model, windows, target=Target(blocks=2))
    assert blocks == [(r.block, r.value) for r in run_search(exact, "iterative")]


def test_auto_mode_is_its_own_spec(tmp_path, capsys):
    """auto's identity names auto (not the mode it picks per run); with exact_scores it is refused, and
    a spec that names no mode keeps exact mode."""
    from flows.cli import main
    from pipelines import load_spec
    from tests.flowkit import tiny_pipeline

    pipeline = tiny_pipeline(tmp_path, search={"target": {"blocks": 2}})
    plain = load_spec(pipeline)
    assert plain.search.scoring_mode() == "exact" and plain.search.racing_options() is None
    auto = load_spec(pipeline, ["search.mode=auto", "search.racing.min_windows=4"])
    section = auto.model_dump(mode="json", exclude_defaults=True)["search"]
    assert section["mode"] == "auto" and section["racing"]["min_windows"] == 4 and "exact_scores" not in section
    assert auto.section_json("search") != load_spec(pipeline, ["search.mode=racing"]).section_json("search")
    assert main(["validate", str(pipeline), "--set", "search.mode=auto", "--set", "search.exact_scores=false"]) == 2
    err = capsys.readouterr().err
    assert "search.mode 'auto'" in err and "search.exact_scores" in err
