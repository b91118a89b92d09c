"""Search strategies on known score tables (fake metrics registered for the test), protections, resume
from a pre-filled recorder, the spec validator's refusals, and the catalog views that line runs up."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from catalog import Catalog
from pipelines import SpecError, load_spec, validate_mapping
from tasks.residual import perplexity
from tasks.score import METRICS, CandidateScore, Metric
from tasks.search import MemoryRecorder, SearchContext, SearchError, Target, run_search, set_key
from tests.searchkit import search_context
from tasks.surgery import units_of
from tests.tiny import tiny_model, tiny_windows

LAYERS = 6
PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


def layers_of(units: set[str]) -> frozenset[int]:
    return frozenset(int(u.split(".")[1]) for u in units)


class TableScorer:
    """Scores read from `cost(layers removed)`; remembers every evaluation it makes."""

    def __init__(self, cost):
        self.cost = cost
        self.calls: list[frozenset[int]] = []

    def _score(self, name: str, gone: set[str], on_score) -> CandidateScore:
        self.calls.append(layers_of(gone))
        score = CandidateScore(name, self.cost(layers_of(gone)), 10, 0.0)
        on_score(score)
        return score

    def score(self, removed, candidates, known, on_score):
        return {c: known[c] if c in known else self._score(c, removed | units_of([c]), on_score) for c in candidates}

    def score_segments(self, removed, segments, known, on_score):
        return {w: known[w] if w in known else self._score(w, removed | units_of(blocks), on_score)
                for w, blocks in segments.items()}


def fake_metric(name: str, measures: str, cost, remove: str = "lowest") -> Metric:
    class Fake(Metric):
        def scorer(self, model, windows, options):
            self.last = TableScorer(cost)
            return self.last

    Fake.name, Fake.remove, Fake.measures = name, remove, measures
    return Fake()


# Removing layers 1 and 2 together is cheap, though each alone is not the cheapest: greedy takes 0
# first and misses the pair; a beam of width 2 keeps 1 alive and finds it.
BASE = {0: 1.0, 1: 2.0, 2: 2.1, 3: 5.0, 4: 6.0, 5: 7.0}


def pair_cost(layers: frozenset[int]) -> float:
    return sum(BASE[i] for i in layers) - (3.0 if {1, 2} <= layers else 0.0)


@pytest.fixture
def fakes():
    metrics = {
        "fake_removal": fake_metric("fake_removal", "removal", pair_cost),
        "fake_block": fake_metric("fake_block", "block", lambda layers: pair_cost(layers)),
        "fake_high": fake_metric("fake_high", "block", lambda layers: -pair_cost(layers), remove="highest"),
        "fake_segment": fake_metric("fake_segment", "segment", lambda layers: sum(BASE[i] for i in layers) % 4.3),
    }
    for name, metric in metrics.items():
        METRICS.add(name, metric)
    yield metrics
    for name in metrics:
        METRICS.remove(name)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=LAYERS)


def context(model, metric, target=Target(blocks=2), granularity="layer", **kwargs) -> SearchContext:
    return search_context(model, tiny_windows(samples=2, seq_len=8), metric=metric, granularity=granularity,
                         target=target, **kwargs)


def removed_by(records) -> list[str]:
    return [r.block for r in records]


# --- strategies on known tables ------------------------------------------------------------------------
def test_one_shot_removes_the_lowest_scores_of_a_single_scoring(model, fakes):
    ctx = context(model, "fake_block", Target(blocks=3))
    records = run_search(ctx, "one_shot")
    assert removed_by(records) == ["layers.0", "layers.1", "layers.2"]
    assert [r.value for r in records] == [1.0, 2.0, 2.1]  # each block's own step-0 score
    assert list(ctx.recorder.scores) == [0] and len(ctx.recorder.scores[0]) == LAYERS
    assert fakes["fake_block"].last.calls == [frozenset({i}) for i in range(LAYERS)]


def test_one_shot_removes_the_highest_when_the_metric_says_so(model, fakes):
    records = run_search(context(model, "fake_high", Target(blocks=2)), "one_shot")
    assert removed_by(records) == ["layers.0", "layers.1"]


def test_one_shot_stops_at_the_params_ratio(model, fakes):
    ctx = context(model, "fake_block", Target(params_ratio=0.3))
    records = run_search(ctx, "one_shot")
    ratios = [1 - r.params_remaining / ctx.dense_params for r in records]
    assert ratios[-1] >= 0.3 and all(r < 0.3 for r in ratios[:-1])


def test_beam_finds_the_pair_that_greedy_search_misses(model, fakes):
    greedy = removed_by(run_search(context(model, "fake_removal"), "iterative"))
    assert greedy == ["layers.0", "layers.1"]
    width1 = removed_by(run_search(context(model, "fake_removal", strategy_settings={"width": 1}), "beam"))
    assert width1 == greedy
    ctx = context(model, "fake_removal", strategy_settings={"width": 2})
    records = run_search(ctx, "beam")
    assert removed_by(records) == ["layers.1", "layers.2"]
    assert [r.value for r in records] == [2.0, pair_cost(frozenset({1, 2}))]
    # Depth 1 scores name whole removal sets, and every child of both kept parents was scored once.
    assert set(ctx.recorder.scores[1]) == {set_key(["layers.0", f"layers.{i}"]) for i in range(1, LAYERS)} | {
        set_key(["layers.1", f"layers.{i}"]) for i in range(2, LAYERS)}
    assert len(fakes["fake_removal"].last.calls) == len(set(fakes["fake_removal"].last.calls))


def test_wide_beam_equals_exhaustive_search(model, fakes):
    def cost(layers):
        return sum(BASE[i] * (1 + 0.3 * j) for j, i in enumerate(sorted(layers))) - 4.0 * ({3, 4} <= layers)

    fakes["fake_removal"] = METRICS.add("fake_removal", fake_metric("fake_removal", "removal", cost))
    best = min(itertools.combinations(range(LAYERS), 3), key=lambda c: cost(frozenset(c)))
    records = run_search(context(model, "fake_removal", Target(blocks=3), strategy_settings={"width": 100}), "beam")
    assert sorted(int(b.split(".")[1]) for b in removed_by(records)) == list(best)


def test_consecutive_removes_the_best_window_one_step_per_layer(model, fakes):
    ctx = context(model, "fake_segment", Target(blocks=3))
    records = run_search(ctx, "consecutive")
    windows = {f"layers.{s}": sum(BASE[i] for i in range(s, s + 3)) % 4.3 for s in range(LAYERS - 2)}
    start = min(windows, key=lambda w: (windows[w], w))
    first = int(start.split(".")[1])
    assert removed_by(records) == [f"layers.{first + k}" for k in range(3)]
    assert {r.value for r in records} == {windows[start]}
    assert {b: s.value for b, s in ctx.recorder.scores[0].items()} == pytest.approx(windows)


def test_consecutive_with_a_removal_metric_and_a_params_ratio(model, fakes):
    ctx = context(model, "fake_removal", Target(params_ratio=0.3))
    records = run_search(ctx, "consecutive")
    per_layer = ctx.goal.params_of(["layers.0"]) / ctx.dense_params
    size = next(n for n in range(1, LAYERS + 1) if n * per_layer >= 0.3)
    assert len(records) == size
    assert set(fakes["fake_removal"].last.calls) == {frozenset(range(s, s + size)) for s in range(LAYERS - size + 1)}
    best = min(range(LAYERS - size + 1), key=lambda s: pair_cost(frozenset(range(s, s + size))))
    assert removed_by(records) == [f"layers.{best + k}" for k in range(size)]


def test_consecutive_by_perplexity_matches_full_forwards():
    model, windows = tiny_model("qwen2", layers=5), tiny_windows(samples=2, seq_len=16)
    ctx = search_context(model, windows, metric="perplexity", granularity="layer", target=Target(blocks=2))
    records = run_search(ctx, "consecutive")
    direct = {s: perplexity(model, windows, 1, skip=sorted(units_of([f"layers.{s}", f"layers.{s + 1}"])))
              for s in range(4)}
    best = min(direct, key=lambda s: (direct[s], s))
    assert removed_by(records) == [f"layers.{best}", f"layers.{best + 1}"]
    for s, ppl in direct.items():
        assert ctx.recorder.scores[0][f"layers.{s}"].value == pytest.approx(ppl, rel=1e-9)


def test_beam_of_width_one_is_the_iterative_search_on_a_real_model():
    model, windows = tiny_model("llama", layers=3), tiny_windows(samples=2, seq_len=16)
    runs = {}
    for strategy, settings in (("iterative", None), ("beam", {"width": 1})):
        ctx = search_context(model, windows, metric="perplexity", granularity="sublayer", target=Target(blocks=3),
                            strategy_settings=settings)
        runs[strategy] = [(r.block, r.value) for r in run_search(ctx, strategy)]
    assert [b for b, _ in runs["beam"]] == [b for b, _ in runs["iterative"]]
    assert [v for _, v in runs["beam"]] == pytest.approx([v for _, v in runs["iterative"]], rel=1e-12)


# --- protections -------------------------------------------------------------------------------------
def test_first_and_last_layers_are_protected(model, fakes):
    ctx = context(model, "fake_block", Target(blocks=3), protect_first=1, protect_last=2)
    records = run_search(ctx, "one_shot")
    assert removed_by(records) == ["layers.1", "layers.2", "layers.3"]
    assert set(ctx.recorder.scores[0]) == {"layers.1", "layers.2", "layers.3"}
    sub = context(model, "fake_block", Target(blocks=2), granularity="sublayer", protect_first=2)
    assert not {b for b in sub.candidates([])} & {"layers.0.attn", "layers.0.mlp", "layers.1.attn", "layers.1.mlp"}


def test_windows_never_contain_or_cross_a_protected_layer(model, fakes):
    ctx = context(model, "fake_segment", Target(blocks=2), protect=("layers.2.mlp",), protect_last=1)
    run_search(ctx, "consecutive")
    assert set(ctx.recorder.scores[0]) == {"layers.0", "layers.3"}  # windows 0-1 and 3-4 only
    with pytest.raises(SearchError, match="no segment of consecutive"):
        run_search(context(model, "fake_segment", Target(blocks=3), protect=("layers.2",), protect_last=1),
                   "consecutive")


def test_protections_that_leave_too_little_are_refused(model, fakes):
    with pytest.raises(SearchError, match="has 1 candidate blocks"):
        context(model, "fake_block", Target(blocks=2), protect_first=3, protect_last=2)
    with pytest.raises(SearchError, match="cannot be negative"):
        context(model, "fake_block", protect_first=-1)


# --- resume ------------------------------------------------------------------------------------------
def resumed_run(model, metric, strategy, fill, target=Target(blocks=2), **kwargs):
    """A fresh run, then a run from a recorder that `fill` pre-filled from the fresh one's records."""
    fresh = context(model, metric, target, **kwargs)
    expected = run_search(fresh, strategy)
    partial = MemoryRecorder()
    fill(fresh.recorder, partial)
    evaluated = []
    ctx = context(model, metric, target, recorder=partial, on_score=lambda step, s: evaluated.append((step, s.block)),
                  **kwargs)
    assert run_search(ctx, strategy) == expected
    return fresh.recorder, evaluated


def test_one_shot_resumes_without_rescoring(model, fakes):
    def fill(done, partial):
        partial.scores = {0: dict(list(done.scores[0].items())[:4])}
        partial.steps = done.steps[:1]

    done, evaluated = resumed_run(model, "fake_block", "one_shot", fill)
    assert evaluated == [(0, b) for b in list(done.scores[0])[4:]]


def test_consecutive_resumes_without_rescoring(model, fakes):
    def fill(done, partial):
        partial.scores = {0: dict(list(done.scores[0].items())[:2])}

    done, evaluated = resumed_run(model, "fake_segment", "consecutive", fill, Target(blocks=3))
    assert evaluated == [(0, b) for b in list(done.scores[0])[2:]]


def test_beam_resumes_without_rescoring(model, fakes):
    def fill(done, partial):
        partial.scores = {0: dict(done.scores[0]), 1: dict(list(done.scores[1].items())[:3])}

    done, evaluated = resumed_run(model, "fake_removal", "beam", fill, strategy_settings={"width": 2})
    assert evaluated == [(1, key) for key in list(done.scores[1])[3:]]


def test_iterative_resumes_with_a_block_metric(model, fakes):
    def fill(done, partial):
        partial.scores = {0: dict(done.scores[0]), 1: dict(list(done.scores[1].items())[:2])}
        partial.steps = done.steps[:1]

    done, evaluated = resumed_run(model, "fake_block", "iterative", fill)
    assert evaluated == [(1, b) for b in list(done.scores[1])[2:]]


def test_steps_that_disagree_with_the_recorded_scores_are_refused(model, fakes):
    partial = MemoryRecorder()
    run_search(context(model, "fake_block", recorder=partial), "one_shot")
    partial.steps[0] = type(partial.steps[0])(0, "layers.4", 0.0, 0)
    with pytest.raises(SearchError, match="disagree"):
        run_search(context(model, "fake_block", recorder=partial), "one_shot")


# --- refusals ------------------------------------------------------------------------------------------
def test_library_calls_get_the_validator_refusals(model, fakes):
    with pytest.raises(SearchError, match="cannot use score.metric 'fake_block'"):
        run_search(context(model, "fake_block"), "beam")
    with pytest.raises(SearchError, match="ranks candidates"):
        run_search(context(model, "fake_removal", exact=False), "one_shot")
    with pytest.raises(SearchError, match="does not support granularity 'layer'"):
        context(model, "similarity")
    with pytest.raises(SearchError, match="bad settings for metric 'shapley'"):
        context(model, "shapley", metric_settings={"samples": 0})


BASE_SPEC = {
    "name": "t",
    "model": {"source": "builtin:smollm2-135m"},
    "search": {"target": {"blocks": 2}},
    "output_dir": "out",
}


def spec(**sections):
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE_SPEC.items()}
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return data


@pytest.mark.parametrize("sections,message", [
    ({"score": {"metric": "similarity", "granularity": "layer"}},
     "score: score.metric 'similarity' does not support score.granularity 'layer' (it supports: attn, mlp, sublayer)"),
    ({"score": {"metric": "block_influence", "granularity": "attn"}}, "does not support score.granularity 'attn'"),
    ({"score": {"metric": "angular_distance", "granularity": "layer"}},
     "search: search.strategy 'iterative' cannot use score.metric 'angular_distance', which scores segments of "
     "consecutive layers"),
    ({"score": {"metric": "angular_distance", "granularity": "layer"}, "search": {"strategy": "one_shot"}},
     "'angular_distance' works with strategies: consecutive"),
    ({"score": {"granularity": "sublayer"}, "search": {"strategy": "consecutive"}},
     "search.strategy 'consecutive' needs score.granularity layer, not 'sublayer'"),
    ({"score": {"metric": "taylor", "granularity": "layer"}, "search": {"strategy": "beam"}},
     "'beam' works with metrics: perplexity"),
    ({"score": {"granularity": "layer"}, "search": {"strategy": "one_shot", "exact_scores": False}},
     "ranks candidates, so their scores must be exact"),
    ({"score": {"metric": "cosine"}, "search": {"exact_scores": False}}, "set exact_scores: true"),
    ({"score": {"metric": "angular_distance", "granularity": "layer"}, "search": {"strategy": "consecutive",
                                                                                 "mode": "racing"}},
     "search.mode 'racing' drops candidates once they are behind with confidence, which needs score.metric "
     "'perplexity'"),
    ({"score": {"shapley": {"samples": 4}}}, "score.shapley applies only with score.metric: shapley"),
    ({"score": {"metric": "shapley", "shapley": {"estimator": "leave_one_out", "seed": 1}}},
     "seed apply only to estimator 'sampled'"),
    ({"score": {"metric": "shapley", "shapley": {"samples": 0}}}, "score.shapley.samples"),
    ({"score": {"metric": "angular_distance", "granularity": "layer", "angular_distance": {"tokens": "first"}},
      "search": {"strategy": "consecutive"}}, "score.angular_distance.tokens"),
    ({"search": {"beam": {"width": 2}}}, "search.beam applies only with search.strategy: beam"),
    ({"search": {"strategy": "beam", "beam": {"width": 0}}}, "search.beam.width"),
    ({"search": {"protect_first": -1}}, "search.protect_first"),
    ({"search": {"strategy": "greedy"}}, "unknown strategy 'greedy'"),
])
def test_the_validator_refuses_impossible_combinations(sections, message):
    with pytest.raises(SpecError) as info:
        validate_mapping(spec(**sections))
    assert any(message in line for line in info.value.errors), info.value.errors


def test_every_recipe_validates_and_older_identities_are_unchanged():
    recipes = sorted(p for p in PIPELINES.glob("*.yaml") if not p.name.startswith("_"))  # "_": bases
    assert len(recipes) >= 9
    for path in recipes:
        load_spec(path)
    blockpruner = load_spec(PIPELINES / "smollm2-blockpruner.yaml")
    # Settings at their defaults are left out of a section, so adding a setting keeps run identities.
    assert blockpruner.section_json("score", "search") == '{"score":null,"search":{"target":{"blocks":8}}}'
    explicit = load_spec(PIPELINES / "smollm2-blockpruner.yaml", ["search.protect_first=0", "search.exact_scores=true"])
    assert explicit.section_json("score", "search") == blockpruner.section_json("score", "search")
    taylor = load_spec(PIPELINES / "smollm2-shortened-taylor.yaml")
    assert (taylor.search.protect_first, taylor.search.protect_last) == (4, 2)
    shapley = load_spec(PIPELINES / "smollm2-shapley.yaml", ["score.shapley={samples: 8}"])
    assert shapley.score.metric_settings() == {"estimator": "sampled", "samples": 8, "seed": 0}
    beam = load_spec(PIPELINES / "smollm2-blockpruner.yaml", ["search.strategy=beam"])
    assert beam.search.strategy_settings() == {"width": 4}
    assert '"beam":{"width":4}' in beam.section_json("search")
    again = type(beam).model_validate(beam.model_dump(mode="json"))
    assert again.spec_hash() == beam.spec_hash()


# --- catalog -------------------------------------------------------------------------------------------
def _run(catalog: Catalog, run_id: str, pipeline: str, score: dict, search: dict, ppl: float, ratio: float):
    import json

    catalog.start_run(run_id=run_id, pipeline=pipeline, spec_hash=run_id, model_fingerprint="m",
                      spec_json=json.dumps({"score": score, "search": search}), data_fingerprint="d",
                      model_source="builtin:smollm2-135m", output_dir="out")
    catalog.add_evaluation(run_id, "dense", "perplexity", "wiki", "perplexity", 10.0)
    catalog.add_evaluation(run_id, "pruned", "perplexity", "wiki", "perplexity", ppl)
    catalog.finish_run(run_id, "completed", summary={"params_removed_ratio": ratio})


def test_method_comparison_lines_up_runs_by_budget_and_method(tmp_path):
    catalog = Catalog(tmp_path / "c.duckdb")
    layer = {"metric": "block_influence", "granularity": "layer"}
    _run(catalog, "a", "shortgpt", layer, {"strategy": "one_shot", "target": {"params_ratio": 0.2}}, 40.0, 0.21)
    _run(catalog, "b", "blockpruner", {"metric": "perplexity", "granularity": "sublayer"},
         {"strategy": "iterative", "target": {"params_ratio": 0.2}}, 30.0, 0.2)
    _run(catalog, "c", "shortgpt-small", layer, {"strategy": "one_shot", "target": {"blocks": 2}}, 20.0, 0.05)
    rows = catalog.query("SELECT budget, rank_in_budget, method, final_ppl, ppl_ratio, run_id FROM method_comparison "
                         "ORDER BY budget, rank_in_budget")
    assert rows == [
        ("blocks=2", 1, "block_influence/one_shot/layer", 20.0, 2.0, "c"),
        ("params_ratio=0.2", 1, "perplexity/iterative/sublayer", 30.0, 3.0, "b"),
        ("params_ratio=0.2", 2, "block_influence/one_shot/layer", 40.0, 4.0, "a"),
    ]


def test_std_error_is_stored_and_beam_sets_win_their_steps(tmp_path):
    catalog = Catalog(tmp_path / "c.duckdb")
    _run(catalog, "r", "beam", {"metric": "perplexity"}, {"strategy": "beam"}, 12.0, 0.1)
    catalog.add_score("r", 0, "layers.1", "perplexity", 5.0, 10, 0.1, std_error=0.25)
    catalog.add_score("r", 1, "layers.1+layers.2", "perplexity", 6.0, 10, 0.1)
    catalog.add_score("r", 1, "layers.0+layers.2", "perplexity", 7.0, 10, 0.1)
    catalog.add_step("r", 0, "layers.1", 5.0, 100)
    catalog.add_step("r", 1, "layers.2", 6.0, 90)
    assert [s.std_error for s in catalog.scores("r")] == [0.25, None, None]
    rows = catalog.query("SELECT step, block, score, score_std_error, candidates FROM step_scores ORDER BY step")
    assert rows == [(0, "layers.1", 5.0, 0.25, 1), (1, "layers.2", 6.0, None, 2)]


def test_the_memory_budget_reaches_the_scorer(model):
    windows = tiny_windows(samples=2, seq_len=8)
    one_state = windows.numel() * 64 * 4  # bytes of one entry state of the tiny model
    ctx = search_context(model, windows, metric="perplexity", granularity="sublayer", target=Target(blocks=1),
                        memory_budget_gb=3 * one_state / 2**30)
    assert ctx.scorer.stride > 1
    assert search_context(model, windows, metric="perplexity", granularity="sublayer",
                         target=Target(blocks=1)).scorer.stride == 1


def test_progress_total_follows_the_strategy():
    from tasks.search.beam import BeamSettings
    from tasks.search.registry import expected_candidates

    assert expected_candidates("iterative", 8, 3) == 8 + 7 + 6
    assert expected_candidates("one_shot", 8, 3) == 8
    assert expected_candidates("consecutive", 30, 6) == 25  # windows of 6 among 30 layers
    assert expected_candidates("beam", 8, 3, BeamSettings(width=4)) == 8 + 4 * 7 + 4 * 6
    assert expected_candidates("iterative", 8, None) is None


def test_rules_without_weights_give_the_search_candidates(model, fakes):
    # The flow sizes progress totals from these rules before any model is loaded: they must be the
    # search's own candidates, protections included.
    from tasks.search.driver import SearchRules

    ctx = context(model, "fake_block", Target(blocks=2), granularity="sublayer", protect_first=1, protect_last=2,
                  protect=("layers.3.mlp",))
    rules = SearchRules.of(range(LAYERS), "sublayer", ("layers.3.mlp",), protect_first=1, protect_last=2)
    assert rules.candidates([]) == ctx.candidates([])
    assert rules.candidates([]) == [f"layers.{i}.{h}" for i in range(1, LAYERS - 2) for h in ("attn", "mlp")
                                    if (i, h) != (3, "mlp")]
    assert rules.candidates(["layers.1.attn"]) == ctx.candidates(["layers.1.attn"])
