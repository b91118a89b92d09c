"""The speed stage: models timed in turn, round by round, and each stage's speed against dense as the median
of per-round ratios with its lowest and highest round, "within noise" when the rounds straddle 1."""

from __future__ import annotations

import re

import pytest

from catalog import Catalog
from catalog.speed import SpeedRatio, side_by_side, speed_ratios, speed_summary
from flows.report import markdown_report
from flows.ui import summary_markdown
from tasks.export import export_model
from tasks.speed import Timing, alternate
from tasks.speed_stage import SpeedSettings, Workload, speed_stage, workload_rows
from tasks.surgery import remove_blocks
from tests.tiny import tiny_checkpoint, tiny_model, tiny_tokenizer


def test_alternate_takes_turns_and_reverses_the_order_every_other_round():
    order: list[tuple[str, int]] = []
    calls = {name: iter(range(100)) for name in "ABC"}
    runs = {name: (lambda name=name: f"{name}{next(calls[name])}") for name in "ABC"}
    got = alternate(runs, rounds=3, after=lambda name, r: order.append((name, r)))
    assert order == [("A", 0), ("B", 0), ("C", 0),  # warm-ups, discarded
                     ("A", 1), ("B", 1), ("C", 1), ("C", 2), ("B", 2), ("A", 2), ("A", 3), ("B", 3), ("C", 3)]
    assert got == {"A": ["A1", "A2", "A3"], "B": ["B1", "B2", "B3"], "C": ["C1", "C2", "C3"]}
    assert alternate(runs, rounds=2, warmup=False) == {"A": ["A4", "A5"], "B": ["B4", "B5"], "C": ["C4", "C5"]}


def _workload(tokens: int = 100) -> Workload:
    return Workload("batch1x100", "prefill_tokens_per_s", tokens, 100, run=lambda model: Timing(0.0, 0.0))


def _timings(walls: list[float]) -> list[Timing]:
    return [Timing(w, w) for w in walls]


def test_ratio_is_the_median_of_per_round_ratios_with_its_range():
    # Load rose in rounds 2 and 5 for both models: per-model medians would give 125 / 100 = 1.25x, the rounds 2x.
    dense = _timings([1.0, 2.0, 1.0, 1.0, 4.0])  # 100, 50, 100, 100, 25 tokens/s
    pruned = _timings([0.5, 1.0, 0.8, 0.4, 1.0])  # 200, 100, 125, 250, 100 tokens/s: ratios 2, 2, 1.25, 2.5, 4
    rows = {(r.stage, r.metric): r for r in workload_rows(_workload(), {"dense": dense, "pruned": pruned})}
    assert rows[("dense", "prefill_tokens_per_s")].value == 100.0
    assert rows[("pruned", "prefill_tokens_per_s")].value == 125.0
    assert rows[("dense", "prefill_tokens_per_s_spread")].value == pytest.approx((100 - 25) / 100)
    assert rows[("pruned", "prefill_tokens_per_s_ratio_median")].value == pytest.approx(2.0)
    assert rows[("pruned", "prefill_tokens_per_s_ratio_low")].value == pytest.approx(1.25)
    assert rows[("pruned", "prefill_tokens_per_s_ratio_high")].value == pytest.approx(4.0)
    assert all(r.n_samples == 5 and r.n_tokens == 100 for r in rows.values())
    assert not any(stage == "dense" and "ratio" in metric for stage, metric in rows)
    (ratio,) = speed_ratios(rows.values()).values()
    assert ratio["pruned"] == SpeedRatio(2.0, 1.25, 4.0, 5) and not ratio["pruned"].within_noise
    assert ratio["pruned"].text() == "2.00x [1.25-4.00]"


def test_ratios_that_straddle_1_are_within_noise():
    dense = _timings([1.0, 1.0, 1.0])
    rows = workload_rows(_workload(), {"dense": dense, "pruned": _timings([0.9, 1.25, 1.0]),
                                       "recovered": _timings([2.0, 1.5, 2.5])})
    ratios = speed_ratios(rows)[("batch1x100", "prefill_tokens_per_s")]
    assert ratios["pruned"] == SpeedRatio(pytest.approx(1.0), pytest.approx(0.8), pytest.approx(1 / 0.9), 3)
    assert ratios["pruned"].within_noise and ratios["pruned"].text() == "within noise (1.00x [0.80-1.11])"
    assert not ratios["recovered"].within_noise and ratios["recovered"].text() == "0.50x [0.40-0.67]"
    assert SpeedRatio.of([1.0, 1.0]).within_noise  # no difference at all is noise too
    with pytest.raises(ValueError):
        SpeedRatio.of([])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny dense checkpoint and the same model without layer 1, in the plain hf format."""
    root = tmp_path_factory.mktemp("speed")
    dense = tiny_checkpoint(root / "dense")
    pruned = remove_blocks(tiny_model(), ["layers.1"])
    export_model(pruned, root / "pruned", "hf")
    tiny_tokenizer().save_pretrained(root / "pruned")
    return {"dense": str(dense), "pruned": str(root / "pruned")}


SETTINGS = SpeedSettings(prefill_tokens=8, prefill_batches=(1,), decode_prompt=4, decode_tokens=4, rounds=2)


# Models whose weights fit in model.memory_budget_gb together take turns; else one after the other (6e-4 GB:
# each tiny model alone, 559,360 and about 436,000 bytes, but not both).
@pytest.mark.parametrize("budget, together", [("auto", True), (6e-4, False)])
def test_speed_stage_times_the_models_in_turn_and_records_ratio_rows(checkpoints, budget, together, tmp_path):
    progress: list[tuple[int, int, str]] = []
    rows = speed_stage(checkpoints, "float32", "cpu", settings=SETTINGS, memory_budget=budget,
                       on_run=lambda done, total, detail: progress.append((done, total, detail)))
    total = 2 * 2 * (SETTINGS.rounds + 1)  # workloads x models x (rounds + warm-up)
    assert [p[:2] for p in progress] == [(k, total) for k in range(1, total + 1)]
    stages = [re.search(r"\((\w+)\)$", detail).group(1) for _, _, detail in progress]
    first = stages[:2 * (SETTINGS.rounds + 1)]  # the first workload, prefill 1x8
    if together:
        assert first == ["dense", "pruned", "dense", "pruned", "pruned", "dense"]
    else:
        assert stages == ["dense"] * (total // 2) + ["pruned"] * (total // 2)  # one model after the other
    assert progress[0][2] == "prefill 1x8 warm-up (dense)" and progress[-1][2].startswith("decode 1x4 round 2/2")

    catalog = Catalog(tmp_path / "catalog.duckdb")
    catalog.start_run(run_id="r", pipeline="p", spec_hash="h", spec_json="{}", model_fingerprint="m",
                      data_fingerprint="d", model_source="s", output_dir=str(tmp_path))
    for e in rows:
        catalog.add_evaluation("r", e.stage, e.kind, e.dataset, e.metric, e.value, n_tokens=e.n_tokens,
                               seq_len=e.seq_len, n_samples=e.n_samples)
    stored = catalog.evaluations("r")
    assert {e.kind for e in stored} == {"speed"}
    ratios = speed_ratios(stored)
    assert set(ratios) == {("batch1x8", "prefill_tokens_per_s"), ("batch1x4", "decode_tokens_per_s")}
    for by_stage in ratios.values():
        ratio = by_stage["pruned"]
        assert set(by_stage) == {"pruned"} and ratio.rounds == SETTINGS.rounds
        assert 0 < ratio.low <= ratio.median <= ratio.high
    assert side_by_side(stored) == {"pruned": together}
    assert {e.metric for e in stored if e.stage == "dense"} == {"prefill_tokens_per_s", "prefill_tokens_per_s_spread",
                                                               "decode_tokens_per_s", "decode_tokens_per_s_spread",
                                                               "kv_bytes_per_token"}
    summary = speed_summary(stored)
    assert summary["batch1x4 decode_tokens_per_s"]["pruned"]["side_by_side"] is together

    run = {"pipeline": "p", "run_id": "r", "params_dense": 1, "params_pruned": 1, "params_removed_ratio": 0.0,
           "checkpoint": "c", "wall_seconds": 1.0, "blocks": ["layers.1"], "perplexity": {}, "recover": "none",
           "output_dir": str(tmp_path), "speed": summary}
    report = markdown_report(run, [], stored, tmp_path)
    decode = next(line for line in report.splitlines() if line.startswith("| batch1x4 decode_tokens_per_s"))
    text = ratios[("batch1x4", "decode_tokens_per_s")]["pruned"].text()
    assert text in decode
    assert ("pruned: timed one after the other" in report) is not together
    # The Prefect summary artifact says the same.
    assert f"| speed against dense (batch1x4 decode_tokens_per_s) | pruned {text} |" in summary_markdown(run, {}, "m", "t")


def test_a_model_over_its_budget_alone_is_not_timed(checkpoints):
    """Serving speed needs a model whole: one that streams (tasks.stream) gets no speed rows, and says why."""
    from tasks.speed_stage import streamed_stages

    assert speed_stage(checkpoints, "float32", "cpu", settings=SETTINGS, memory_budget=1e-6) == []
    reasons = streamed_stages(checkpoints, "float32", "cpu", 1e-6)
    assert sorted(reasons) == ["dense", "pruned"] and "not timed: the model streams" in reasons["dense"]
