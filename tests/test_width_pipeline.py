"""Width pruning through the command line: plan, catalog rows, `show`, and a checkpoint plain transformers loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from catalog import Catalog
from flows.cli import main as cli
from tasks.surgery import load_model, remove_blocks
from tasks.surgery.width import WidthPlan, apply_width
from tasks.width import WIDTH_METRICS, WidthShape, uniform_plan
from tests.flowkit import tiny_pipeline
from tests.tiny import tiny_model, tiny_windows

RELOAD = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation="sdpa").eval()
ids = load_file(sys.argv[2])["ids"]
with torch.no_grad():
    save_file({"logits": model(ids).logits.contiguous()}, sys.argv[3])
print(type(model).__name__, model.config.intermediate_size, model.config.num_key_value_heads,
      model.config.num_attention_heads, model.config.num_hidden_layers, model.config.hidden_size)
"""


def _reload_in_fresh_process(checkpoint, ids, tmp_path) -> tuple[str, torch.Tensor]:
    from safetensors.torch import load_file

    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    out = subprocess.run([sys.executable, "-c", RELOAD, str(checkpoint), str(tmp_path / "ids.safetensors"),
                          str(tmp_path / "logits.safetensors")],
                         capture_output=True, text=True, check=True, cwd=tmp_path)  # not the project: plain transformers
    return out.stdout.strip(), load_file(tmp_path / "logits.safetensors")["logits"]


@pytest.mark.parametrize("depth, sections, expected", [
    # Width alone (Minitron): every layer keeps 64 of 96 channels and one of two KV groups.
    ("none", {"search": {"target": {"blocks": 0}},
              "width": {"metric": "activation",
                        "shape": {"intermediate_size": 64, "num_key_value_heads": 1, "hidden_size": 48}},
              "recover": {"method": "distill", "steps": 3, "lr": 3e-3, "seq_len": 32, "batch_size": 2}},
     "LlamaForCausalLM 64 1 2 4 48"),
    # Depth then width: one whole layer goes, then the other three lose channels by LLM-Pruner's Taylor score.
    ("layer", {"score": {"granularity": "layer"}, "search": {"target": {"blocks": 1}},
               "width": {"metric": "taylor", "shape": {"intermediate_size": 48}},
               "recover": {"method": "lora", "steps": 2, "seq_len": 32, "batch_size": 2}},
     "LlamaForCausalLM 48 2 4 3 64"),
])
def test_width_pipeline_through_the_cli(tmp_path, capsys, depth, sections, expected):
    sections = {**sections, "recover": {**sections["recover"], "dataset": str(tmp_path / "corpus.txt")}}
    path = tiny_pipeline(tmp_path, **sections)
    assert cli(["run", str(path)]) == 0
    out = capsys.readouterr().out
    run_id = out.split()[1]
    assert "width      width plan" in out
    catalog = Catalog(tmp_path / "out" / "catalog.duckdb")
    plan = WidthPlan.from_json(catalog.plan(run_id))
    blocks = [s.block for s in catalog.steps(run_id)]
    assert len(blocks) == (0 if depth == "none" else 1)
    units = catalog.unit_scores(run_id)
    layers = 4 - len(blocks)
    assert len(units) == layers * (4 + 2 + 96) + 64  # heads, KV groups, channels of every present layer; hidden
    assert {metric for _, metric, _ in units} == {sections["width"]["metric"]}

    # The plan is what the registered metric and the shape give on the same calibration windows.
    dense = load_model(tmp_path / "model")
    remove_blocks(dense, blocks)
    from tasks.windows import load_windows

    calibration = next(a for a in catalog.artifacts(run_id) if a.kind == "calibration")
    scores = WIDTH_METRICS[sections["width"]["metric"]].scores(dense, load_windows(calibration.path), 1)
    assert uniform_plan(dense, scores, WidthShape(**sections["width"]["shape"])) == plan

    # The checkpoint loads in a fresh process with plain transformers and computes what the plan applied here does.
    checkpoints = {a.stage: a.path for a in catalog.artifacts(run_id) if a.kind == "checkpoint"}
    checkpoint = checkpoints["pruned"]
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    assert "auto_map" not in config and config["pruneflow"]["plan"] == json.loads(plan.to_json())
    ids = tiny_windows(samples=2, seq_len=24)
    shown, reloaded = _reload_in_fresh_process(checkpoint, ids, tmp_path)
    assert shown == expected
    with torch.no_grad():
        here = apply_width(dense, plan)(ids).logits
    assert torch.allclose(reloaded, here, atol=1e-5, rtol=0)

    # Healing keeps the shape, and its checkpoint loads the same way.
    assert _reload_in_fresh_process(checkpoints["recovered"], ids, tmp_path)[0] == expected

    # Evaluation measured the width-pruned models: fewer parameters than dense.
    params = {e.stage: e.value for e in catalog.evaluations(run_id) if e.metric == "params"}
    assert params["pruned"] == params["recovered"] < params["dense"]
    assert {e.stage for e in catalog.evaluations(run_id) if e.kind == "perplexity"} == {"dense", "pruned", "recovered"}
    assert cli(["show", run_id[:8], "--catalog", str(tmp_path / "out" / "catalog.duckdb")]) == 0
    table = capsys.readouterr().out.split("width plan (")[1]
    widths = expected.split()[1:4]  # channels, KV heads, query heads
    rows = [line.split() for line in table.splitlines() if line.startswith("layers.")]
    assert len(rows) == layers and all(r[1:4] == [widths[2], widths[1], widths[0]] for r in rows), table


def test_an_explicit_plan_is_refused_where_the_format_cannot_hold_it(tmp_path):
    from tasks.export import ExportError, export_model

    model = tiny_model()
    scores = WIDTH_METRICS["magnitude"].scores(model, tiny_windows(), 2)
    plan = uniform_plan(model, scores, WidthShape(intermediate_size=32))
    apply_width(model, plan)
    with pytest.raises(ExportError, match="format 'nemotron_nas' gives each block's FFN width by ffn_mult"):
        export_model(model, tmp_path / "n", "nemotron_nas")
    assert export_model(model, tmp_path / "hf", "auto") == "hf"
    remove_blocks(model, ["layers.1.attn"])
    with pytest.raises(ExportError, match="format 'hf' keeps the original architecture"):
        export_model(model, tmp_path / "again", "hf")
    assert export_model(model, tmp_path / "code", "auto") == "remote_code"


def test_width_metrics_rank_what_they_claim():
    """Activation ranks a channel whose output weights are zero last; magnitude ranks the largest weights first;
    Taylor gives zero to a unit whose weights are zero."""
    model = tiny_model()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.up_proj.weight[7] = 0  # channel 7 never fires: act(gate) * 0
        mlp.gate_proj.weight[9] *= 50
    windows = tiny_windows()
    activation = WIDTH_METRICS["activation"].scores(model, windows, 2).channels[0]
    magnitude = WIDTH_METRICS["magnitude"].scores(model, windows, 2).channels[0]
    taylor = WIDTH_METRICS["taylor"].scores(model, windows, 2)
    assert activation[7] == 0 and activation.argmin() == 7
    assert magnitude.argmax() == 9
    assert taylor.channels[0][7] < 1e-3 * taylor.channels[0].median() and len(taylor.heads[0]) == 4
    # Batching does not change what is scored.
    assert torch.allclose(WIDTH_METRICS["activation"].scores(model, windows, 1).channels[0], activation, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())


RELOAD_REMOTE = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    save_file({"logits": model(load_file(sys.argv[2])["ids"]).logits.contiguous()}, sys.argv[3])
print(sorted({layer.mlp.down_proj.in_features for layer in model.model.layers if layer.mlp is not None}))
"""


def test_per_layer_widths_after_sub_blocks_through_the_cli(tmp_path, capsys):
    """BlockPruner's sub-block search, then LLM-Pruner's per-layer Taylor widths: one plan, exported with its
    modeling code, equal in a fresh process to the plan applied here."""
    from safetensors.torch import load_file

    path = tiny_pipeline(tmp_path, search={"target": {"blocks": 2}},
                         width={"metric": "taylor", "strategy": "per_layer", "shape": {"intermediate_size": 48},
                                "per_layer": {"floor": 0.25}})
    assert cli(["run", str(path)]) == 0
    run_id = capsys.readouterr().out.split()[1]
    catalog = Catalog(tmp_path / "out" / "catalog.duckdb")
    blocks = [s.block for s in catalog.steps(run_id)]
    plan = WidthPlan.from_json(catalog.plan(run_id))
    widths = [len(layer.channels) for layer in plan.layers.values() if layer.channels]
    checkpoint = next(a.path for a in catalog.artifacts(run_id) if a.kind == "checkpoint")
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    assert config["pruneflow"]["format"] == "remote_code" and config["pruneflow"]["plan"] == json.loads(plan.to_json())
    ids = tiny_windows(samples=2, seq_len=24)
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    out = subprocess.run([sys.executable, "-c", RELOAD_REMOTE, checkpoint, str(tmp_path / "ids.safetensors"),
                          str(tmp_path / "logits.safetensors")], capture_output=True, text=True, check=True, cwd=tmp_path)
    mlp_layers = sum(1 for lid in range(4) if f"layers.{lid}.mlp" not in blocks and f"layers.{lid}" not in blocks)
    assert sum(widths) + 96 * (mlp_layers - len(widths)) == 48 * mlp_layers  # the shape's total, spread unevenly
    assert json.loads(out.stdout) == sorted(set(widths) | ({96} if mlp_layers > len(widths) else set()))
    dense = remove_blocks(load_model(tmp_path / "model"), blocks)
    with torch.no_grad():
        here = apply_width(dense, plan)(ids).logits
    assert torch.allclose(load_file(tmp_path / "logits.safetensors")["logits"], here, atol=1e-5, rtol=0)


def test_shapes_for_a_budget_remove_it_and_keep_attention_first():
    import copy

    from tasks.surgery import total_params
    from tasks.width.shapes import shapes_for_ratio

    model = tiny_model()
    dense = total_params(model)
    scores = WIDTH_METRICS["magnitude"].scores(model, tiny_windows(), 2)
    shapes = shapes_for_ratio(model, dense, 0.2, round_to=8, limit=10)
    assert shapes[0].num_attention_heads == 4 and shapes[0].num_key_value_heads == 2  # all attention kept first
    assert len({(s.num_attention_heads, s.num_key_value_heads) for s in shapes}) == len(shapes)
    for shape in shapes:
        assert shape.intermediate_size % 8 == 0
        removed = 1 - total_params(apply_width(copy.deepcopy(model), uniform_plan(model, scores, shape))) / dense
        wider = shape.model_copy(update={"intermediate_size": shape.intermediate_size + 8})
        less = 1 - total_params(apply_width(copy.deepcopy(model), uniform_plan(model, scores, wider))) / dense
        assert removed >= 0.2 > less, (shape, removed, less)  # the most channels that still meet the budget


def test_a_params_ratio_picks_the_best_shape_by_calibration_perplexity(tmp_path, capsys):
    path = tiny_pipeline(tmp_path, search={"target": {"blocks": 0}},
                         width={"metric": "activation", "params_ratio": 0.2, "round_to": 8, "candidates": 3})
    assert cli(["run", str(path)]) == 0
    out = capsys.readouterr().out
    run_id = out.split()[1]
    catalog = Catalog(tmp_path / "out" / "catalog.duckdb")
    tried = {unit: value for unit, metric, value in catalog.unit_scores(run_id) if metric == "calibration_perplexity"}
    assert len(tried) == 3 and all(unit.startswith("shape:intermediate_size=") for unit in tried)
    best = min(tried, key=tried.get)
    chosen = dict(item.split("=") for item in best.removeprefix("shape:").split(","))
    summary = catalog.get_run(run_id).summary
    assert {k: str(v) for k, v in summary["width"]["shape"].items()} == chosen
    assert summary["params_removed_ratio"] >= 0.2
    assert "chosen for params_ratio 0.2" in out


def test_taylor_variants_follow_llm_pruner():
    """vector ≤ element for every unit (|Σ| ≤ Σ|.|); second order adds -1/2 w² F with F the per-window squared
    gradients summed, checked by hand for one channel; `width.taylor` only with metric taylor."""
    from tasks.width.taylor import TaylorSettings
    from tasks.width_stage import width_section

    model, windows = tiny_model(), tiny_windows(samples=3)
    taylor = WIDTH_METRICS["taylor"]
    first = taylor.scores(model, windows, 3)
    vector = taylor.scores(model, windows, 3, TaylorSettings(variant="vector"))
    second = taylor.scores(model, windows, 3, TaylorSettings(order=2))
    assert all((vector.channels[lid] <= first.channels[lid] * (1 + 1e-5)).all() for lid in first.channels)
    assert not torch.allclose(vector.channels[0], first.channels[0])

    mlp = model.model.layers[0].mlp
    params = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    grads = []
    for window in windows:
        loss = model(window[None], labels=window[None]).loss
        grads.append(torch.autograd.grad(loss, params))
    total = sum(
        (w.detach().double() * sum(g[k] for g in grads).double()
         - 0.5 * w.detach().double() ** 2 * sum(g[k].double() ** 2 for g in grads)).abs()[index].sum()
        for k, (w, index) in enumerate(zip(params, [(5, slice(None)), (5, slice(None)), (slice(None), 5)])))
    assert float(second.channels[0][5]) == pytest.approx(float(total), rel=1e-4)

    section = width_section(__name__)
    with pytest.raises(ValueError, match="width.taylor applies only with width.metric: taylor"):
        section(metric="activation", shape={"intermediate_size": 8}, taylor={"order": 2})
