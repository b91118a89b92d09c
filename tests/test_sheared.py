"""Sheared LLaMA (width.strategy sheared): the masked model, the size model, folding the masks into the
weights, resuming the mask training, and the strategy through the command line."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from catalog import Catalog
from flows.cli import main as cli
from tasks.surgery import load_model, remove_blocks, total_params
from tasks.surgery.width import apply_width, set_output_weights
from tasks.width import WidthShape
from tasks.width.plan import Calibration
from tasks.width import WIDTH_METRICS, uniform_plan
from tasks.width.sheared import MaskedModel, _fold, _sizes, _targets, initial_logits, sheared_plan
from tests.flowkit import tiny_pipeline
from tests.test_width_pipeline import _reload_in_fresh_process
from tests.tiny import tiny_checkpoint, tiny_corpus, tiny_model, tiny_windows


def _masked(model, **target) -> MaskedModel:
    # Every structure shrinks, so every structure has masks.
    every = {"layers": 0.75, "heads": 0.5, "channels": 0.5, "hidden": 0.75, "params": 0.5}
    return MaskedModel(model, _sizes(model), target or every, warmup=0)


def test_open_gates_compute_the_dense_model_and_closed_ones_remove_units():
    dense, ids = tiny_model(), tiny_windows(2, 24)
    masked = _masked(copy.deepcopy(dense))
    with torch.no_grad():
        masked.gates(noise=False)
        assert torch.equal(masked.model(ids).logits, dense(ids).logits)
        masked.log_alpha["channel"][1, 5:] = -10.0  # deterministic gate 0: those channels compute nothing
        masked.gates(noise=False)
        cut = remove_blocks(copy.deepcopy(dense), [])
        cut.model.layers[1].mlp.down_proj.weight[:, 5:] = 0
        assert torch.allclose(masked.model(ids).logits, cut(ids).logits, atol=1e-5)


def test_the_size_model_matches_the_parameters_of_the_shape():
    model = tiny_model()
    sizes = _sizes(model)
    masked = _masked(model)
    with torch.no_grad():
        for alpha in masked.log_alpha.values():
            alpha.fill_(50.0)
    with torch.no_grad():
        assert float(masked.expected()["params"]) == pytest.approx(1.0, abs=1e-6)
    shape = WidthShape(intermediate_size=48, num_key_value_heads=1, hidden_size=48)
    share = _targets(sizes, shape, heads=2, kv=1, layers=3)["params"]
    shallower = remove_blocks(copy.deepcopy(model), ["layers.0"])
    scores = WIDTH_METRICS["magnitude"].scores(shallower, tiny_windows(), 2)
    real = apply_width(shallower, uniform_plan(shallower, scores, shape))
    # The size model counts projections and embeddings, not norms: within a percent of the real ratio.
    assert share == pytest.approx(total_params(real) / total_params(model), abs=0.01)


def test_folding_keeps_what_the_masked_model_computes_on_the_kept_units():
    model, ids = tiny_model(), tiny_windows(2, 24)
    masked = _masked(copy.deepcopy(model))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for alpha in masked.log_alpha.values():
            alpha.copy_(torch.randn(alpha.shape, generator=generator) * 2 + 1.0)
        masked.log_alpha["hidden"].fill_(5.0)  # hidden channels all kept: slicing them renormalises the norms
    shape = WidthShape(intermediate_size=48, num_key_value_heads=1)
    outcome = _fold(copy.deepcopy(masked), shape, heads=2, kv=1, layers=3, rows=[])
    assert len(outcome.blocks) == 1 and all(len(w.channels) == 48 for w in outcome.plan.layers.values())
    pruned = set_output_weights(apply_width(remove_blocks(copy.deepcopy(model), list(outcome.blocks)), outcome.plan),
                                outcome.weights)
    with torch.no_grad():  # the masked model with every unit the plan drops gated off
        masked.gates(noise=False)
        positions = {lid: p for p, lid in enumerate(range(4))}
        for block in outcome.blocks:
            p = positions[int(block.split(".")[1])]
            masked._gates["attn"][p] = masked._gates["mlp"][p] = 0.0
        for lid, kept in outcome.plan.layers.items():
            p = positions[lid]
            drop = torch.ones(4, dtype=torch.bool)
            drop[list(kept.heads)] = False
            masked._gates["head"][p][drop] = 0.0
            drop = torch.ones(96, dtype=torch.bool)
            drop[list(kept.channels)] = False
            masked._gates["channel"][p][drop] = 0.0
        assert torch.allclose(pruned(ids).logits, masked.model(ids).logits, atol=1e-4)


def test_mask_training_reaches_the_target_and_resumes_where_it_stopped(tmp_path):
    tiny_checkpoint(tmp_path / "model")
    tiny_corpus(tmp_path / "corpus.txt")
    model = load_model(tmp_path / "model").eval()
    shape = WidthShape(intermediate_size=48, num_key_value_heads=1)
    settings = dict(steps=30, warmup=10, seq_len=32, dataset=str(tmp_path / "corpus.txt"), lr=1e-3, mask_lr=1.0,
                    init="uniform", num_hidden_layers=3, checkpoint_every=4)

    def run(state, stop_at=None):
        def on_step(done, total, detail=""):
            if done == stop_at:
                raise KeyboardInterrupt
        calibration = Calibration(tiny_windows(), 2, on_step, str(tmp_path / "model"), tmp_path / state)
        return sheared_plan(model, None, shape, calibration, **settings)

    whole = run("a")
    assert [r["step"] for r in whole.trace] == list(range(1, 31))
    last = whole.trace[-1]
    # The ramp opened a gap of a fifth of the dense size by step 10; the constraint pulled the masks to within 0.15.
    assert max(r["gap.params"] for r in whole.trace) > 0.2 and abs(last["gap.params"]) < 0.15, last
    with pytest.raises(KeyboardInterrupt):
        run("b", stop_at=19)
    resumed = run("b")
    assert resumed.plan == whole.plan and resumed.blocks == whole.blocks
    assert [r["step"] for r in resumed.trace] == list(range(1, 31))
    assert all(a["loss"] == pytest.approx(b["loss"], rel=1e-4) for a, b in zip(resumed.trace, whole.trace))
    assert all(torch.allclose(resumed.weights[k], whole.weights[k], atol=1e-5) for k in whole.weights)


def test_sheared_through_the_cli(tmp_path, capsys):
    path = tiny_pipeline(tmp_path, search={"target": {"blocks": 0}},
                         width={"strategy": "sheared", "shape": {"intermediate_size": 48, "num_key_value_heads": 1},
                                "sheared": {"steps": 8, "warmup": 4, "seq_len": 32, "num_hidden_layers": 3,
                                            "dataset": str(tmp_path / "corpus.txt"), "lr": 1e-3}})
    assert cli(["run", str(path)]) == 0
    run_id = capsys.readouterr().out.split()[1]
    catalog = Catalog(tmp_path / "out" / "catalog.duckdb")
    width = catalog.get_run(run_id).summary["width"]
    assert [r["step"] for r in width["training"]] == list(range(1, 9))
    assert len(width["blocks"]) == 1 and len(width["layers"]) == 3
    assert {metric for _, metric, _ in catalog.unit_scores(run_id)} == {"sheared"}
    checkpoint = next(a.path for a in catalog.artifacts(run_id) if a.kind == "checkpoint")
    ids = tiny_windows(samples=2, seq_len=24)
    shown, reloaded = _reload_in_fresh_process(checkpoint, ids, tmp_path)
    assert shown == "LlamaForCausalLM 48 1 2 3 64"
    from safetensors.torch import load_file
    from tasks.surgery.width import WidthPlan

    weights = load_file(next(a.path for a in catalog.artifacts(run_id) if a.kind == "width-weights"))
    here = set_output_weights(apply_width(remove_blocks(load_model(tmp_path / "model"), width["blocks"]),
                                          WidthPlan.from_json(catalog.plan(run_id))), weights)
    with torch.no_grad():
        assert torch.allclose(reloaded, here(ids).logits, atol=1e-5, rtol=0)
    folder = tmp_path / "out" / "tiny" / f"run-{run_id[:12]}"
    assert (folder / "mask_training.png").stat().st_size > 0
    assert json.loads((folder / "report.json").read_text())["width"]["training"] == width["training"]


def test_metric_init_starts_the_masks_at_the_metrics_plan():
    model, ids = tiny_model(), tiny_windows(2, 24)
    shape = WidthShape(intermediate_size=48, num_key_value_heads=1)
    sizes = _sizes(model)
    scores = WIDTH_METRICS["activation"].scores(model, tiny_windows(), 2)
    targets = _targets(sizes, shape, heads=2, kv=1, layers=4)
    assert set(targets) == {"heads", "channels", "params"}  # the shape keeps layers and hidden whole
    masked = MaskedModel(copy.deepcopy(model), sizes, targets, warmup=0,
                         init=initial_logits(model, scores, shape, heads=2, kv=1))
    assert set(masked.log_alpha) == {"head", "channel"}
    minitron = uniform_plan(model, scores, shape)
    # At step 0 the fold keeps exactly the metric's top-k units ...
    assert _fold(copy.deepcopy(masked), shape, heads=2, kv=1, layers=4, rows=[]).plan == minitron
    # ... and the deterministic masks compute the metric's pruned model: gates exactly 1 on its units, 0 elsewhere.
    with torch.no_grad():
        masked.gates(noise=False)
        assert set(masked._gates["channel"].unique().tolist()) == {0.0, 1.0}
        assert torch.allclose(masked.model(ids).logits, apply_width(copy.deepcopy(model), minitron)(ids).logits,
                              atol=1e-5)
        # The ramp starts at the initial expected size, which is already close to the shape's.
        assert masked.ramped()["channels"] == pytest.approx(0.5, abs=0.02)


def test_metric_init_through_the_strategy_keeps_the_metrics_plan_when_the_masks_cannot_move(tmp_path):
    tiny_checkpoint(tmp_path / "model")
    tiny_corpus(tmp_path / "corpus.txt")
    model = load_model(tmp_path / "model").eval()
    shape = WidthShape(intermediate_size=40, num_key_value_heads=1)
    calibration = Calibration(tiny_windows(), 2, None, str(tmp_path / "model"), tmp_path / "state")
    outcome = sheared_plan(model, None, shape, calibration, steps=2, warmup=0, seq_len=32, init="magnitude",
                           lr=0.0, mask_lr=1e-9, lambda_lr=1e-9, dataset=str(tmp_path / "corpus.txt"))
    assert outcome.plan == uniform_plan(model, WIDTH_METRICS["magnitude"].scores(model, tiny_windows(), 2), shape)
    assert outcome.blocks == ()
    # lr 0 froze the weights: the folded weights are the dense ones on the kept units (gates exactly 1).
    kept = apply_width(copy.deepcopy(model), outcome.plan).state_dict()
    assert all(torch.equal(outcome.weights[k], kept[k]) for k in kept)


@pytest.mark.parametrize("sheared, message", [
    ({"init": "activations"}, "width.sheared.init"),
    ({"init": "activations"}, "accepted: uniform, activation"),
    ({"lr": -1e-5}, "width.sheared.lr"),
])
def test_bad_sheared_settings_exit_2_naming_the_field(tmp_path, capsys, sheared, message):
    path = tiny_pipeline(tmp_path, search={"target": {"blocks": 0}},
                         width={"strategy": "sheared", "shape": {"intermediate_size": 48}, "sheared": sheared})
    assert cli(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
