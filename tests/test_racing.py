"""Racing (`search.mode: racing`): candidates leave once they are behind the leader with confidence; the
rest run every window, so the chosen blocks and the winners' scores are those of exact mode."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.score.racing import RacingOptions, RacingScorer, leavers, looks, t_quantile
from tasks.search import MemoryRecorder, Target, run_search
from tests.searchkit import search_context
from tests.tiny import VOCAB, tiny_model


def _pattern(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Windows of a fixed recurrence with 15% noise tokens: a model can learn it, so removing a block it
    relies on hurts every window alike (the paired gaps racing needs), unlike random tokens."""
    steps = [torch.randint(0, VOCAB, (n, 1), generator=generator)]
    for _ in range(length - 1):
        steps.append((steps[-1] * 5 + 3) % VOCAB)
    tokens = torch.cat(steps, 1)
    noise = torch.rand(tokens.shape, generator=generator) < 0.15
    return torch.where(noise, torch.randint(0, VOCAB, tokens.shape, generator=generator), tokens)


@pytest.fixture(scope="module")
def trained():
    model = tiny_model(layers=4)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        batch = _pattern(8, 24, generator)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, _pattern(32, 16, torch.Generator().manual_seed(1))


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


def _cli(*args: str):
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], stdin=subprocess.DEVNULL, timeout=600)


def test_racing_through_the_command_line(tmp_path):
    import duckdb

    from tests.flowkit import tiny_pipeline

    pipeline = tiny_pipeline(tmp_path, calibration={"samples": 16, "seq_len": 16},
                             search={"target": {"blocks": 2}, "mode": "racing", "racing": {"min_windows": 4}})
    refused = _cli("validate", str(pipeline), "--set", "search.strategy=one_shot")
    assert refused.returncode == 2 and "search.mode 'racing'" in refused.stderr and "iterative" in refused.stderr
    per_param = _cli("validate", str(pipeline), "--set", "search.objective=ppl_per_param")
    assert per_param.returncode == 2 and "search.objective ppl_per_param" in per_param.stderr
    clash = _cli("validate", str(pipeline), "--set", "search.exact_scores=true")
    assert clash.returncode == 2 and "contradicts search.exact_scores" in clash.stderr
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
