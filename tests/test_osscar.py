"""OSSCAR (width.strategy osscar): the reconstruction algebra against direct computation and brute force, the
sequential pass against a real forward of the model it writes, and the strategy through the command line."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch

from catalog import Catalog
from flows.cli import main as cli
from tasks.surgery import load_model
from tasks.surgery.width import WidthPlan, apply_width, output_projection, set_output_weights
from tasks.width import WidthShape
from tasks.width.osscar import osscar_plan
from tasks.width.plan import Calibration
from tasks.width.reconstruction import Problem, Reconstruction, eliminate, local_search
from tests.flowkit import tiny_pipeline
from tests.test_width_pipeline import _reload_in_fresh_process
from tests.tiny import tiny_model, tiny_windows


def _problem(seed: int, n: int = 64, width: int = 10, out: int = 6, damp: float = 0.01) -> tuple[Problem, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs: a unit's loss can be made up by others, which is what reconstruction exploits.
    x = torch.randn(n, width, generator=g, dtype=torch.float64) @ torch.randn(width, width, generator=g,
                                                                                 dtype=torch.float64)
    w0 = torch.randn(out, width, generator=g, dtype=torch.float64)
    y = x @ w0.T
    return Problem(w0, x.T @ x, x.T @ y, float(y.pow(2).sum()), damp), x


def _objective(problem: Problem, kept: torch.Tensor) -> float:
    """The damped objective at the exact weights of `kept`, computed from scratch."""
    hd = problem.damped()
    g = hd @ problem.w0.T
    cols = kept.nonzero().flatten()
    ws = torch.linalg.solve(hd[cols][:, cols], g[cols])
    return -float((g[cols] * ws).sum())


def test_problem_error_is_the_relative_output_error():
    problem, x = _problem(0)
    w = problem.w0 * torch.tensor([1.0] * 7 + [0.0] * 3, dtype=torch.float64) + 0.1
    direct = float((x @ w.T - x @ problem.w0.T).pow(2).sum()) / problem.target
    assert problem.error(w) == pytest.approx(direct, rel=1e-9)
    assert problem.error(problem.w0) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("per_step", [1, 3])
def test_greedy_updates_are_the_exact_least_squares_weights_of_what_is_kept(per_step):
    problem, _ = _problem(1)
    state = Reconstruction(problem)
    alive = eliminate(state, torch.arange(10)[:, None], 4, per_step)
    assert int(alive.sum()) == 6 and torch.equal(state.kept, alive)
    hd = problem.damped()
    cols = alive.nonzero().flatten()
    exact = torch.linalg.solve(hd[cols][:, cols], (hd @ problem.w0.T)[cols]).T
    assert torch.allclose(state.w[:, cols], exact, atol=1e-8)
    assert torch.all(state.w[:, ~alive] == 0)
    assert state.objective() == pytest.approx(_objective(problem, alive), rel=1e-9)


def test_swaps_never_lose_and_reach_the_optimum_more_often_than_greedy():
    at_best = {"greedy": 0, "swaps": 0}
    for seed in range(12):
        problem, _ = _problem(seed, width=9, damp=0.0)
        best = min(_objective(problem, torch.tensor([i not in gone for i in range(9)]))
                   for gone in itertools.combinations(range(9), 4))
        state = Reconstruction(problem)
        units = torch.arange(9)[:, None]
        greedy = eliminate(state, units, 4, per_step=2)
        greedy_value = _objective(problem, greedy)
        swapped, _ = local_search(state, units, greedy, rounds=6, size=2)
        swapped_value = _objective(problem, swapped)
        assert int(swapped.sum()) == 5
        assert swapped_value <= greedy_value + 1e-9 * abs(greedy_value)
        assert state.objective() == pytest.approx(swapped_value, rel=1e-9)
        at_best["greedy"] += greedy_value <= best + 1e-9 * abs(best)
        at_best["swaps"] += swapped_value <= best + 1e-9 * abs(best)
    assert at_best["swaps"] > at_best["greedy"], at_best


def test_a_block_unit_is_removed_whole_and_buckets_keep_their_quota():
    problem, _ = _problem(2, width=12)
    state = Reconstruction(problem)
    units = torch.arange(12).view(6, 2)  # six "heads" of two columns, in three groups of two
    alive = eliminate(state, units, 3, per_step=1, buckets=torch.arange(6) // 2, keep_per_bucket=1)
    assert alive.view(3, 2).sum(dim=1).tolist() == [1, 1, 1]
    assert torch.equal(state.kept.view(6, 2).all(dim=1), alive)


def _outputs(model, windows, units):
    """Per unit, the input of its output projection and that projection's output, on `windows`."""
    seen, hooks = {}, []
    for unit in units:
        proj = output_projection(model, unit)
        hooks.append(proj.register_forward_hook(
            lambda m, args, out, unit=unit: seen.__setitem__(unit, out.reshape(-1, out.shape[-1]).double())))
    with torch.no_grad():
        model(windows)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("shape", [
    {"intermediate_size": 60},  # rounded up to 64
    {"intermediate_size": 48, "num_key_value_heads": 1},
    {"num_attention_heads": 2},  # one query head per KV group
])
def test_the_sequential_pass_reports_the_errors_of_the_model_it_writes(shape):
    model, windows = tiny_model(), tiny_windows(samples=8)
    outcome = osscar_plan(model, None, WidthShape(**shape), Calibration(windows, 2), round_to=16, update_iter=2,
                          swap_rounds=4, swap_size=4)
    pruned = set_output_weights(apply_width(copy.deepcopy(model), outcome.plan), outcome.weights)
    dense_out = _outputs(model, windows, outcome.errors)
    pruned_out = _outputs(pruned, windows, outcome.errors)
    for unit, errors in outcome.errors.items():
        measured = float((pruned_out[unit] - dense_out[unit]).pow(2).sum() / dense_out[unit].pow(2).sum())
        assert errors["refit"] == pytest.approx(measured, rel=1e-3, abs=1e-6), unit
        assert errors["refit"] < errors["cut"], (unit, errors)
        assert errors["refit"] <= errors.get("swaps", errors["greedy"]) + 1e-9
    first = min(outcome.errors)
    assert outcome.errors[first]["before"] < 1e-6 < max(e["before"] for e in outcome.errors.values())
    for layer in outcome.plan.layers.values():
        if "intermediate_size" in shape:
            assert len(layer.channels) == -(-shape["intermediate_size"] // 16) * 16
        if layer.heads is not None:
            groups = {h // 2 for h in layer.heads}
            assert groups == set(layer.kv_heads) and len(layer.heads) == shape.get("num_attention_heads",
                                                                                   2 * len(groups))


def test_without_sequential_every_layer_is_fitted_on_the_dense_inputs_and_refit_off_keeps_the_columns():
    model, windows = tiny_model(), tiny_windows(samples=8)
    shape = WidthShape(intermediate_size=48)
    parallel = osscar_plan(model, None, shape, Calibration(windows, 4), round_to=16, sequential=False, refit=False)
    assert all(e["before"] < 1e-6 and "refit" not in e for e in parallel.errors.values())
    dense = dict(model.named_parameters())
    for unit, weight in parallel.weights.items():
        lid = unit.split(".")[1]
        kept = list(parallel.plan.layers[int(lid)].channels)
        assert torch.equal(weight, dense[f"model.layers.{lid}.mlp.down_proj.weight"][:, kept])


def test_osscar_through_the_cli(tmp_path, capsys):
    path = tiny_pipeline(tmp_path, score={"granularity": "layer"}, search={"target": {"blocks": 1}},
                         width={"strategy": "osscar", "shape": {"intermediate_size": 40},
                                "osscar": {"round_to": 16, "swap_rounds": 3, "update_iter": 2}})
    assert cli(["run", str(path)]) == 0
    run_id = capsys.readouterr().out.split()[1]
    catalog = Catalog(tmp_path / "out" / "catalog.duckdb")
    rows = catalog.unit_scores(run_id)
    errors = {(unit, metric): value for unit, metric, value in rows if metric.startswith("reconstruction.")}
    units = sorted({unit for unit, _ in errors})
    blocks = [s.block for s in catalog.steps(run_id)]
    assert blocks and units == sorted(f"layers.{n}.mlp" for n in range(4) if f"layers.{n}" not in blocks)
    assert {m for _, m in errors} == {f"reconstruction.{s}" for s in ("before", "greedy", "swaps", "cut", "refit")}
    assert all(errors[(u, "reconstruction.refit")] < errors[(u, "reconstruction.cut")] for u in units)
    assert {metric for _, metric, _ in rows if not metric.startswith("reconstruction.")} == {"osscar"}

    plan = WidthPlan.from_json(catalog.plan(run_id))
    assert {len(layer.channels) for layer in plan.layers.values()} == {48}
    artifacts = {a.kind: a for a in catalog.artifacts(run_id)}
    assert artifacts["width-weights"].stage == "width" and artifacts["plot-reconstruction"].bytes > 0

    # The checkpoint holds the refitted weights: a fresh process with plain transformers computes what the
    # plan and the weights applied here compute, and not what the plan alone does.
    from safetensors.torch import load_file

    dense = load_model(tmp_path / "model")
    from tasks.surgery import remove_blocks

    remove_blocks(dense, blocks)
    ids = tiny_windows(samples=2, seq_len=24)
    checkpoint = next(a.path for a in catalog.artifacts(run_id) if a.kind == "checkpoint")
    shown, reloaded = _reload_in_fresh_process(checkpoint, ids, tmp_path)
    assert shown.split()[:2] == ["LlamaForCausalLM", "48"]
    cut = apply_width(copy.deepcopy(dense), plan)
    refit = set_output_weights(apply_width(dense, plan), load_file(artifacts["width-weights"].path))
    with torch.no_grad():
        assert torch.allclose(reloaded, refit(ids).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(reloaded, cut(ids).logits, atol=1e-3, rtol=0)

    assert cli(["show", run_id[:8], "--catalog", str(tmp_path / "out" / "catalog.duckdb")]) == 0
    shown = capsys.readouterr().out
    assert "width plan (osscar, osscar: intermediate_size 48)" in shown
    table = shown.split("reconstruction error per unit")[1]
    lines = [line.split() for line in table.splitlines() if line.startswith("layers.")]
    assert [line[0] for line in lines] == units
    assert all(float(line[-1]) == pytest.approx(100 * errors[(line[0], "reconstruction.refit")], abs=0.006)
               for line in lines)
    report = json.loads((tmp_path / "out" / "tiny" / f"run-{run_id[:12]}" / "report.json").read_text())
    assert [r["unit"] for r in report["width"]["reconstruction"]] == units


def test_the_quark_recipe_is_a_valid_spec():
    from pipelines import load_spec

    spec = load_spec(Path(__file__).resolve().parent.parent / "pipelines" / "smollm2-quark-osscar.yaml")
    assert spec.width.strategy == "osscar" and spec.width.osscar.damp_percent == 0.01
    assert spec.width.shape.intermediate_size == "90%" and spec.width.osscar.round_to == 128
