"""The iterative search against a brute-force reference computed here with plain full forwards."""

import itertools
import math

import pytest
import torch

from tasks.residual import perplexity
from tasks.score import CandidateScore
from tasks.search import MemoryRecorder, SearchError, Target, run_search
from tests.searchkit import search_context
from tasks.surgery import candidate_blocks, units_of
from tests.tiny import tiny_model, tiny_windows


def brute_force_order(model, windows, granularity, steps, batch_windows=1):
    """Greedy reference: at every step, full-forward perplexity of each remaining candidate."""
    removed: list[str] = []
    for _ in range(steps):
        candidates = candidate_blocks([0, 1, 2, 3], granularity, units_of(removed))
        ppl = {c: perplexity(model, windows, batch_windows, skip=sorted(units_of([*removed, c]))) for c in candidates}
        removed.append(min(candidates, key=lambda c: (ppl[c], candidates.index(c))))
    return removed, ppl


@pytest.mark.parametrize("granularity,steps", [("sublayer", 4), ("layer", 2), ("attn", 3), ("mlp", 2)])
@pytest.mark.parametrize("exact", [True, False])
def test_iterative_matches_brute_force(family, granularity, steps, exact):
    model, windows = tiny_model(family), tiny_windows(samples=4)
    expected, last_ppl = brute_force_order(model, windows, granularity, steps)
    ctx = search_context(model, windows, metric="perplexity", granularity=granularity,
                        target=Target(blocks=steps), exact=exact)
    records = run_search(ctx, "iterative")
    assert [r.block for r in records] == expected
    assert records[-1].value == pytest.approx(last_ppl[expected[-1]], rel=1e-9)
    # Every candidate of every step was recorded; in exact mode all are exact and equal the reference.
    final_scores = ctx.recorder.scores[steps - 1]
    assert set(final_scores) == set(last_ppl)
    for block, score in final_scores.items():
        if score.exact:
            assert score.value == pytest.approx(last_ppl[block], rel=1e-9)
        else:
            assert not exact and score.value <= last_ppl[block] * (1 + 1e-12)


def test_early_abort_skips_work_and_marks_lower_bounds():
    model, windows = tiny_model("llama", layers=4), tiny_windows(samples=32, seq_len=16)
    runs = {}
    for exact in (True, False):
        ctx = search_context(model, windows, metric="perplexity", granularity="sublayer",
                            target=Target(blocks=3), exact=exact)
        runs[exact] = (run_search(ctx, "iterative"), ctx)
    assert [r.block for r in runs[True][0]] == [r.block for r in runs[False][0]]
    bounds = [s for step in runs[False][1].recorder.scores.values() for s in step.values() if not s.exact]
    assert bounds, "no candidate was stopped early on a model with clearly unequal blocks"
    early, exact = runs[False][1].scorer.work, runs[True][1].scorer.work
    assert early.unit_windows < exact.unit_windows
    # A random model predicts too flatly for a cheap vocabulary bound: it stops on exact partial sums,
    # after one pass of the current model per step that finds so (counted apart).
    assert early.bound_windows == 0 and early.bound_rows == 0
    assert early.mass_windows == 3 * windows.shape[0] and exact.mass_windows == 0


def peaked_model(seed: int):
    """A tiny model whose predictions concentrate on 16 of its 128 tokens, as a trained LM's do on a few
    thousand of its vocabulary: only then is a vocabulary-subset bound cheap enough to be used."""
    model = tiny_model("llama", layers=4, seed=seed)
    with torch.no_grad():
        model.lm_head.weight[16:].mul_(0.1)
        model.lm_head.weight[:16].mul_(10.0)
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vocabulary_bounds_choose_what_exact_sums_choose(seed):
    model, windows = peaked_model(seed), tiny_windows(samples=8, seq_len=16, seed=seed)
    expected, last_ppl = brute_force_order(model, windows, "sublayer", 4)
    runs = {}
    for exact in (True, False):
        ctx = search_context(model, windows, metric="perplexity", granularity="sublayer",
                            target=Target(blocks=4), exact=exact)
        runs[exact] = ([r.block for r in run_search(ctx, "iterative")], ctx)
    assert runs[True][0] == runs[False][0] == expected
    work = runs[False][1].scorer.work
    assert 0 < work.bound_rows <= 32 and work.bound_windows > 0
    # Candidates settled by their bounds never ran the full head.
    assert work.head_windows < runs[True][1].scorer.work.head_windows
    final = runs[False][1].recorder.scores[3]
    bounded = [b for b, s in final.items() if not s.exact]
    assert bounded
    for block in bounded:
        assert final[block].value <= last_ppl[block]
        assert final[block].value > final[expected[-1]].value


def test_prefix_reuse_does_less_work_than_naive():
    model, windows = tiny_model("llama", layers=4), tiny_windows(samples=2)
    ctx = search_context(model, windows, metric="perplexity", granularity="sublayer", target=Target(blocks=2))
    run_search(ctx, "iterative")
    naive_units = sum(n * (n - 1) for n in (8, 7)) * 2  # candidates x remaining units x windows
    assert ctx.scorer.work.unit_windows < naive_units


def test_params_ratio_target_stops_at_first_step_reaching_it():
    model, windows = tiny_model("llama"), tiny_windows()
    ctx = search_context(model, windows, metric="perplexity", granularity="layer", target=Target(params_ratio=0.2))
    records = run_search(ctx, "iterative")
    removed_ratio = [1 - r.params_remaining / ctx.dense_params for r in records]
    assert removed_ratio[-1] >= 0.2 and all(r < 0.2 for r in removed_ratio[:-1])


def test_protected_blocks_are_never_candidates():
    model, windows = tiny_model("llama"), tiny_windows()
    ctx = search_context(model, windows, metric="perplexity", granularity="sublayer", target=Target(blocks=5),
                        protect=("layers.0", "layers.3.mlp"))
    removed = [r.block for r in run_search(ctx, "iterative")]
    assert not set(removed) & {"layers.0.attn", "layers.0.mlp", "layers.3.mlp"}


def test_unreachable_targets_are_refused():
    model, windows = tiny_model("llama"), tiny_windows()
    with pytest.raises(SearchError, match="has 4 candidate blocks"):
        search_context(model, windows, metric="perplexity", granularity="layer", target=Target(blocks=5))
    with pytest.raises(SearchError, match="removes only"):
        search_context(model, windows, metric="perplexity", granularity="attn", target=Target(params_ratio=0.9))


def test_resume_reuses_recorded_scores_and_steps():
    model, windows = tiny_model("llama"), tiny_windows()
    full = search_context(model, windows, metric="perplexity", granularity="sublayer", target=Target(blocks=3))
    expected = run_search(full, "iterative")
    # An interrupted run: step 0 committed, step 1 has two scores recorded.
    partial = MemoryRecorder()
    partial.steps = [expected[0]]
    partial.scores = {0: dict(full.recorder.scores[0]),
                      1: dict(list(full.recorder.scores[1].items())[:2])}
    evaluated = []
    ctx = search_context(model, windows, metric="perplexity", granularity="sublayer", target=Target(blocks=3),
                        recorder=partial, on_score=lambda step, s: evaluated.append((step, s.block)))
    records = run_search(ctx, "iterative")
    assert records == expected
    already = set(list(full.recorder.scores[1])[:2])
    assert not any(step == 0 or (step == 1 and block in already) for step, block in evaluated)
    assert len(evaluated) == (7 - 2) + 6


def test_memory_budget_keeps_fewer_states_and_changes_no_number():
    from tasks.score.prefix_reuse import PrefixReuseScorer

    model, windows = tiny_model("llama", layers=4), tiny_windows(samples=4)
    runs = {}
    for budget in (math.inf, 3 * windows.numel() * 64 * 4):  # room for 3 of the 8 entry states
        ctx = search_context(model, windows, metric="perplexity", granularity="sublayer", target=Target(blocks=3))
        ctx.scoring.scorer = PrefixReuseScorer(model, windows, 1, True, budget)
        runs[budget] = (run_search(ctx, "iterative"), ctx)
    (full, full_ctx), (small, small_ctx) = runs.values()
    assert full == small
    def numbers(ctx):
        return {step: {b: (s.value, s.exact) for b, s in scores.items()} for step, scores in ctx.recorder.scores.items()}

    assert numbers(small_ctx) == numbers(full_ctx)
    assert small_ctx.scorer.stride == 3 and full_ctx.scorer.stride == 1
    assert small_ctx.scorer.work.stored_bytes <= 3 * windows.numel() * 64 * 4
    assert small_ctx.scorer.work.stored_bytes < full_ctx.scorer.work.stored_bytes
    assert small_ctx.scorer.work.unit_windows > full_ctx.scorer.work.unit_windows


@pytest.mark.parametrize("exact", [True, False])
def test_candidates_side_by_side_give_the_same_scores(exact):
    """Waves of candidates on several threads, one torch thread each: the same blocks and the same floats
    as one at a time; with bounds, the same bounds on every run (each wave uses the best known before it)."""
    model, windows = peaked_model(0), tiny_windows(samples=8, seq_len=16)
    runs = []
    for parallel in (1, 3, 3):
        ctx = search_context(model, windows, metric="perplexity", granularity="sublayer", target=Target(blocks=3),
                            exact=exact, parallel_candidates=parallel)
        threads = torch.get_num_threads()
        blocks = [r.block for r in run_search(ctx, "iterative")]
        assert torch.get_num_threads() == threads
        values = {(step, b): (s.value, s.exact) for step, scores in ctx.recorder.scores.items() for b, s in scores.items()}
        runs.append((blocks, values, ctx.scorer.parallel))
    assert [r[2] for r in runs] == [1, 3, 3]
    assert runs[0][0] == runs[1][0] == runs[2][0]
    assert runs[1][1] == runs[2][1]
    exact_values = lambda run: {k: v for k, v in run[1].items() if v[1]}
    if exact:
        assert runs[0][1] == runs[1][1]
    else:
        # Every exact score is the same float; which candidates a bound settles depends on the wave size.
        shared = exact_values(runs[0]).keys() & exact_values(runs[1]).keys()
        assert shared and all(runs[0][1][k] == runs[1][1][k] for k in shared)


def test_parallel_residual_family_side_by_side():
    from tests.test_families import build

    model, windows = build("gpt_neox"), tiny_windows(samples=4)
    scores = []
    for parallel in (1, 2):
        ctx = search_context(model, windows, metric="perplexity", granularity="sublayer", target=Target(blocks=2),
                            parallel_candidates=parallel)
        run_search(ctx, "iterative")
        scores.append({(step, b): s.value for step, v in ctx.recorder.scores.items() for b, s in v.items()})
    assert scores[0] == scores[1]


def test_ppl_per_param_objective_picks_the_least_log_ppl_rise_per_parameter():
    model, windows = tiny_model(layers=4), tiny_windows(samples=4, seq_len=16)
    plain = search_context(model, windows, target=Target(blocks=3))
    run_search(plain, "iterative")
    # Three blocks: steps 0 and 1 choose per parameter; step 2, the last whatever it removes, by perplexity.
    cost = search_context(model, windows, target=Target(blocks=3), objective="ppl_per_param")
    records = run_search(cost, "iterative")
    # Step 0 by hand: every candidate's perplexity against the model as loaded, per parameter it holds.
    dense = math.log(perplexity(model, windows, 1))
    step0 = plain.recorder.scores[0]
    params = cost.goal.unit_params
    expected = min(step0, key=lambda b: ((math.log(step0[b].value) - dense) / sum(params[u] for u in units_of([b])),
                                         candidate_blocks(list(range(4)), "sublayer", set()).index(b)))
    assert records[0].block == expected
    # The values stored are perplexities either way; only the choice differs.
    assert records[0].value == step0[expected].value
    assert {b: s.value for b, s in cost.recorder.scores[0].items()} == {b: s.value for b, s in step0.items()}
    # Step 1 likewise, against the perplexity step 0 left.
    step1 = cost.recorder.scores[1]
    base = math.log(records[0].value)
    assert records[1].block == min(step1, key=lambda b: (math.log(step1[b].value) - base) / sum(
        params[u] for u in units_of([b])))


@pytest.mark.parametrize("target, chosen", [(Target(blocks=2), "layers.0.mlp"), (Target(blocks=1), "layers.0.attn")])
def test_ppl_per_param_takes_the_best_rate_until_the_last_step(target, chosen):
    """An MLP half worth the better rate but the higher perplexity: chosen while steps remain (2 blocks), not
    on the step that ends the search whatever it removes (1 block)."""
    model, windows = tiny_model(layers=4), tiny_windows(samples=4, seq_len=16)
    ctx = search_context(model, windows, target=target, objective="ppl_per_param")
    dense = perplexity(model, windows, 1)
    candidates = ["layers.0.attn", "layers.0.mlp"]
    attn, mlp = (ctx.goal.params_of([c]) for c in candidates)
    rise = 1.1  # the attention half's; the MLP half's rise in log-perplexity is between it and its rate's
    mlp_rise = math.log(rise) * (1 + mlp / attn) / 2
    scores = {"layers.0.attn": CandidateScore("layers.0.attn", dense * rise, 64, 0.0),
              "layers.0.mlp": CandidateScore("layers.0.mlp", dense * math.exp(mlp_rise), 64, 0.0)}
    assert scores["layers.0.mlp"].value > scores["layers.0.attn"].value and mlp_rise / mlp < math.log(rise) / attn
    assert ctx.pick(scores, candidates, []).block == chosen


def test_ppl_per_param_lands_on_a_params_ratio_target_by_perplexity():
    """Once every candidate meets the target, the step is the last whichever it removes: it takes the lowest
    perplexity, so the search does not overshoot the budget with a large block for its better rate."""
    model, windows = tiny_model(layers=4), tiny_windows(samples=4, seq_len=16)
    probe = search_context(model, windows, objective="ppl_per_param")
    attn, mlp = probe.goal.params_of(["layers.0.attn"]), probe.goal.params_of(["layers.0.mlp"])
    assert attn < mlp  # the tiny llama's attention half is the smaller block, as in SmolLM2
    # A target one attention half past two MLP halves: after them every candidate reaches it.
    ratio = (2 * mlp + attn) / probe.dense_params
    ctx = search_context(model, windows, target=Target(params_ratio=ratio), objective="ppl_per_param")
    records = run_search(ctx, "iterative")
    removed = [r.block for r in records]
    last = len(removed) - 1
    assert ctx.objective_for(removed[:last], ctx.candidates(removed[:last])) == "ppl"
    assert all(ctx.objective_for(removed[:s], ctx.candidates(removed[:s])) == "ppl_per_param" for s in range(last))
    scores = ctx.recorder.scores[last]
    assert records[-1].block == min(scores, key=lambda b: (scores[b].value, ctx.candidates(removed[:last]).index(b)))
