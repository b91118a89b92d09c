"""Models larger than their memory budget: layers streamed from the checkpoint's shards compute the same
numbers as the resident model, read the weights once per pass, and stay within the budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flows.keys import identity_hash
from pipelines.loader import load_spec
from tasks.load import ModelSpec, open_model
from tasks.residual import perplexity
from tasks.search import Target, run_search
from tasks.stream.budget import BudgetError
from tasks.stream.open import NotStreamed
from tasks.stream.residency import streamed
from tests.flowkit import ROOT, tiny_pipeline
from tests.searchkit import search_context
from tests.tiny import tiny_checkpoint, tiny_windows

# The tiny model's pieces: a layer is 123,392 bytes in float32, the embedding and the head 32,768 each
# (the final norm's 256 bytes ride with the embedding); the whole model 559,360.
LAYER_BYTES = 123_392
BETWEEN = 0.0003  # GB: two layers, not the whole model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("streaming") / "model")


def _stored_bytes(path: Path) -> int:
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return sum(handle.get_tensor(n).nbytes for n in handle.keys())


def _open(path: Path, budget: float | str = "auto"):
    return open_model(str(path), ModelSpec(source=str(path), device="cpu", memory_budget_gb=budget), "test",
                      streams=True)


def test_a_model_within_its_budget_is_resident(checkpoint: Path):
    model = _open(checkpoint)
    assert streamed(model) is None
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_streamed_perplexity_is_the_resident_one_bit_for_bit_reading_the_model_once_per_pass(checkpoint: Path):
    windows = tiny_windows(samples=6)
    resident = perplexity(_open(checkpoint), windows, batch_windows=2)
    model = _open(checkpoint, BETWEEN)
    weights = streamed(model)
    assert weights is not None and {p.device.type for p in model.parameters()} == {"meta"}
    reads = []
    streamed_ppl = perplexity(model, windows, batch_windows=2,
                              on_windows=lambda done, total: reads.append(weights.index.bytes_read))
    assert streamed_ppl == resident
    # A pass per micro-batch of 2 windows: the first reads the whole model once; later ones read each layer
    # once more, while the embedding (and here the head) stay resident beside the layer in use.
    per_pass = [b - a for a, b in zip([0, *reads], reads)]
    assert per_pass == [_stored_bytes(checkpoint), 4 * LAYER_BYTES, 4 * LAYER_BYTES]
    assert 2 * LAYER_BYTES <= weights.peak_bytes <= BETWEEN * 1e9


@pytest.mark.parametrize("metric,strategy,granularity", [
    ("perplexity", "iterative", "sublayer"),
    ("block_influence", "one_shot", "layer"),
    ("angular_distance", "consecutive", "layer"),
])
def test_a_streamed_search_picks_the_same_blocks_with_the_same_scores(checkpoint: Path, metric, strategy,
                                                                      granularity):
    windows = tiny_windows()

    def search(model):
        ctx = search_context(model, windows, metric=metric, granularity=granularity, target=Target(blocks=2))
        return [(r.block, r.value) for r in run_search(ctx, strategy)]

    assert search(_open(checkpoint, BETWEEN)) == search(_open(checkpoint))


@pytest.mark.parametrize("states_budget_gib", [None, 0.0001])  # 0.0001: groups of 3 candidates, every 3rd state kept
def test_a_streamed_search_step_reads_the_model_at_most_once(checkpoint: Path, states_budget_gib):
    windows = tiny_windows()
    model = _open(checkpoint, BETWEEN)
    weights, reads, scores = streamed(model), [], {}

    def search(model, on_step=None):
        ctx = search_context(model, windows, target=Target(blocks=3), memory_budget_gb=states_budget_gib,
                             on_step=on_step, on_score=lambda step, s: scores.setdefault(id(model), []).append(s))
        return [(r.block, r.value) for r in run_search(ctx, "iterative")]

    streamed_steps = search(model, on_step=lambda *_: reads.append(weights.index.bytes_read))
    resident = _open(checkpoint)
    assert streamed_steps == search(resident)
    assert sorted((s.block, s.value) for s in scores[id(model)]) == sorted((s.block, s.value) for s in scores[id(resident)])
    per_step = [b - a for a, b in zip([0, *reads], reads)]
    if states_budget_gib is None:
        # One walk per step: the model's states and all 8, then 6, then 4 candidates pass each layer together.
        assert per_step[0] == _stored_bytes(checkpoint)
        assert all(r <= _stored_bytes(checkpoint) for r in per_step)
    else:  # 3 groups of candidates at the first step: three walks
        assert per_step[0] <= 3 * _stored_bytes(checkpoint)


def test_a_stage_that_does_not_stream_refuses_a_model_over_budget_naming_itself(checkpoint: Path):
    spec = ModelSpec(source=str(checkpoint), device="cpu", memory_budget_gb=BETWEEN)
    with pytest.raises(NotStreamed, match="prune does not stream weights yet.*memory_budget_gb"):
        open_model(str(checkpoint), spec, "prune")


def test_a_budget_below_the_largest_piece_names_the_piece_and_its_size(checkpoint: Path):
    with pytest.raises(BudgetError, match=r"model\.layers\.0 \(decoder layer 0\): 0\.000123 GB.*at least 0\.000124"):
        _open(checkpoint, 0.0001)


def test_the_budget_is_not_part_of_a_runs_identity(tmp_path: Path):
    spec = load_spec(tiny_pipeline(tmp_path))
    budgeted = spec.model_copy(update={"model": spec.model.model_copy(update={"memory_budget_gb": 12.5})})
    assert identity_hash(budgeted) == identity_hash(spec)


@pytest.mark.parametrize("budget,sets,expected", [
    ("0.0001", [], "smaller than the largest piece that must be on the device at once, model.layers.0"),
    (str(BETWEEN), ["recover={method: bias}"], "the model does not fit (streamed layer by layer: weights 0.000559 GB"),
    (str(BETWEEN), ["score.metric=taylor"],
     "the search: metric 'taylor' needs gradients; metrics that stream: angular_distance, block_influence"),
])
def test_run_refuses_an_over_budget_model_before_writing_anything(tmp_path: Path, budget: str, sets, expected: str):
    pipeline = tiny_pipeline(tmp_path)
    overrides = [arg for value in [f"model.memory_budget_gb={budget}", *sets] for arg in ("--set", value)]
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(pipeline), *overrides], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            out.update({name: handle.get_tensor(name) for name in handle.keys()})
    return out


@pytest.mark.parametrize("blocks,fmt", [
    (("layers.1",), "hf"),
    (("layers.1", "layers.2.attn", "layers.0.mlp"), "auto"),  # halves: remote_code
])
def test_a_streamed_prune_writes_the_resident_checkpoint_tensor_for_tensor(checkpoint: Path, tmp_path: Path,
                                                                          blocks, fmt):
    from tasks.prune import PruneSpec, prune_stage

    written = {}
    for name, budget in (("resident", "auto"), ("streamed", BETWEEN)):
        spec = ModelSpec(source=str(checkpoint), device="cpu", memory_budget_gb=budget)
        ref = prune_stage(str(checkpoint), blocks, spec, PruneSpec(format=fmt), tmp_path / name)
        written[name] = Path(ref.path)
    resident, streamed_out = _tensors(written["resident"]), _tensors(written["streamed"])
    assert sorted(resident) == sorted(streamed_out)
    assert all(torch.equal(resident[n], streamed_out[n]) for n in resident)
    configs = [json.loads((written[n] / "config.json").read_text()) for n in ("resident", "streamed")]
    assert configs[0] == configs[1]
    windows = tiny_windows()
    assert perplexity(_open(written["streamed"]), windows) == perplexity(_open(written["resident"]), windows)


def test_a_streamed_model_is_written_in_shards_of_the_set_size(checkpoint: Path, tmp_path: Path, monkeypatch):
    import tasks.stream.write as write

    monkeypatch.setattr(write, "SHARD_BYTES", 2 * LAYER_BYTES)  # two layers a shard, or the embedding and a layer
    model = _open(checkpoint, BETWEEN)
    write.write_streamed(model, streamed(model), tmp_path / "out")
    index = json.loads((tmp_path / "out" / write.INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 3 and files[0] == "model-00001-of-00003.safetensors"
    assert _tensors(tmp_path / "out").keys() == _tensors(checkpoint).keys()
    assert all(torch.equal(a, _tensors(checkpoint)[n]) for n, a in _tensors(tmp_path / "out").items())


def test_a_tied_output_head_streams_with_the_embedding(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    from tests.tiny import tiny_config, tiny_tokenizer

    config = tiny_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    tiny_tokenizer().save_pretrained(tmp_path / "tied")
    model = _open(tmp_path / "tied", BETWEEN)
    weights = streamed(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert set(weights.pieces) == {"embed", "layer:0", "layer:1", "layer:2", "layer:3"}
    windows = tiny_windows()
    assert perplexity(model, windows) == perplexity(_open(tmp_path / "tied"), windows)


@pytest.mark.parametrize("fmt,widths", [("remote_code", True), ("pruneflow", True), ("nemotron_nas", False)])
def test_a_pruned_checkpoint_with_halves_and_widths_streams_as_it_loads(checkpoint: Path, tmp_path: Path, fmt,
                                                                        widths):
    """Evaluation reads what prune wrote: removed halves (stand-ins) and narrower MLPs stream too."""
    from tasks.export import export_model
    from tasks.surgery import remove_blocks
    from tasks.surgery.width import WidthPlan, apply_width

    model = _open(checkpoint)
    remove_blocks(model, ["layers.1.attn", "layers.2"])
    keep = {"channels": sorted([*range(0, 96, 2), 1, 3, 5, 7])}  # 52 of 96 MLP channels, in every kept layer
    if widths:  # nemotron_nas writes widths in multiples of 256 only
        apply_width(model, WidthPlan.model_validate({"layers": {str(i): keep for i in (0, 1, 3)}}))
    export_model(model, tmp_path / "pruned", fmt)
    windows = tiny_windows()
    resident = _open(tmp_path / "pruned")
    streamed_model = _open(tmp_path / "pruned", 0.0002)
    assert streamed(resident) is None and streamed(streamed_model) is not None
    assert perplexity(streamed_model, windows) == perplexity(resident, windows)


def test_a_pipeline_over_its_budget_runs_streamed_with_the_resident_runs_blocks_and_floats(tmp_path: Path):
    """Through the command line as a user runs it: search, prune and evaluation stream; speed skips the models
    that do not fit. Every score, step and perplexity equals a resident run's."""
    import duckdb

    rows = {}
    for name, budget in (("resident", "auto"), ("streamed", str(BETWEEN))):
        pipeline = tiny_pipeline(tmp_path / name)
        out = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(pipeline), "--set",
                              f"model.memory_budget_gb={budget}"], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr[-3000:]
        with duckdb.connect(str(tmp_path / name / "out" / "catalog.duckdb"), read_only=True) as db:
            rows[name] = {
                "scores": db.sql("SELECT step, block, value FROM scores ORDER BY step, block").fetchall(),
                "steps": db.sql("SELECT step, block, value FROM steps ORDER BY step").fetchall(),
                "ppl": db.sql("SELECT stage, value FROM evaluations WHERE kind = 'perplexity' "
                              "ORDER BY stage, dataset").fetchall(),
                "timed": db.sql("SELECT DISTINCT stage FROM evaluations WHERE kind = 'speed' ORDER BY stage").fetchall(),
            }
    assert len(rows["streamed"]["steps"]) == 3
    for table in ("scores", "steps", "ppl"):
        assert rows["streamed"][table] == rows["resident"][table]
    assert rows["resident"]["timed"] == [("dense",), ("pruned",)]
    assert rows["streamed"]["timed"] == []  # both models exceed the budget: serving speed needs them whole
