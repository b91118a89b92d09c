"""Dynamic batch loading: the update rule, the weights steering the draws, resuming, and the CLI run."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from catalog import Catalog
from flows.cli import main as cli
from tasks.recover.data import TrainingStreams
from tasks.recover.dynamic_loading import DomainWeights, DynamicLoading, domain_losses, updated
from tasks.recover.training import TrainSettings, train
from tests.flowkit import tiny_pipeline
from tests.tiny import tiny_checkpoint, tiny_corpus, tiny_model


def test_the_update_raises_the_domains_above_their_reference_and_smooths_to_uniform():
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    losses = torch.tensor([2.0, 3.5, 1.0], dtype=torch.float64)
    reference = torch.tensor([2.5, 3.0, 0.5], dtype=torch.float64)  # excess: 0 (clipped), 0.5, 0.5
    new = updated(weights, losses, reference, eta=2.0, smoothing=0.0)
    direct = weights * torch.exp(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(new, direct / direct.sum())
    assert new.sum() == pytest.approx(1.0) and new[1] > weights[1] and new[0] < weights[0]
    assert torch.allclose(updated(weights, losses, reference, 2.0, 1.0), torch.full((3,), 1 / 3, dtype=torch.float64))
    # At or below the reference everywhere: nothing moves but the smoothing.
    assert torch.allclose(updated(weights, reference - 1, reference, 5.0, 0.0), weights)


def _domains(tmp_path):
    """Two domains a character model tells apart: prose and digits."""
    tiny_corpus(tmp_path / "prose.txt")
    lines = [" ".join(str((i * 7919 + j * 104729) % 100000) for j in range(12)) for i in range(400)]
    (tmp_path / "digits.txt").write_text("\n\n".join(lines))
    return str(tmp_path / "prose.txt"), str(tmp_path / "digits.txt")


def test_weights_steer_the_draws_and_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    prose, digits = _domains(tmp_path)
    tiny_checkpoint(tmp_path / "model")
    streams = TrainingStreams(str(tmp_path / "model"), {prose: 1.0, digits: 1.0}, 16, 4096, held_apart=2)
    assert all(streams.held[s].shape == (2, 16) for s in streams.sources)
    held = {s: set(map(tuple, streams.held[s].tolist())) for s in streams.sources}
    drawn = streams.batch(0, 64, seed=0, weights=torch.tensor([0.0, 1.0], dtype=torch.float64))
    second = set(map(tuple, streams.streams[streams.sources[1]].unfold(0, 16, 1).tolist()))
    assert all(tuple(row) in second for row in drawn.tolist())  # all from the weighted domain
    assert not any(tuple(row) in held[streams.sources[1]] for row in drawn.tolist())

    settings = DynamicLoading(every=2, eta=4.0, smoothing=0.0, eval_windows=2)
    model = tiny_model()
    # A reference the first domain is far above and the second below: the first gains weight.
    reference = {s: loss - (3.0 if s == streams.sources[0] else -3.0)
                 for s, loss in domain_losses(model, streams).items()}
    schedule = TrainSettings(steps=6, lr=1e-3, warmup_steps=0, seed=0, checkpoint_every=2, label="t")

    def run(state, stop_at=None):
        hook = DomainWeights(streams, settings, reference)

        def on_step(done, total, loss):
            if done == stop_at:
                raise KeyboardInterrupt

        log = train(copy.deepcopy(model).requires_grad_(True), lambda step: streams.batch(step, 2, 0, hook.weights),
                    schedule, tmp_path / state, "fp", log=lambda m: None, on_step=on_step, hook=hook)
        return log, hook

    whole, hook = run("a")
    assert [t["step"] for t in hook.trace()] == [0, 2, 4, 6]
    assert hook.trace()[-1]["weights"][streams.sources[0]] > 0.9
    with pytest.raises(KeyboardInterrupt):
        run("b", stop_at=5)
    resumed, again = run("b")
    assert resumed.resumed_from_step == 4
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
    assert [t["step"] for t in again.trace()] == [0, 2, 4, 6]
    assert all(a["weights"] == pytest.approx(b["weights"], rel=1e-6)
               for a, b in zip(again.trace(), hook.trace()))


def test_dynamic_loading_through_the_cli(tmp_path, capsys):
    prose, digits = _domains(tmp_path)
    path = tiny_pipeline(tmp_path, recover={
        "method": "continued_pretraining", "tokens": 8 * 2 * 32, "lr": 3e-3, "seq_len": 32, "batch_size": 2,
        "datasets": [{"source": prose, "weight": 3.0}, {"source": digits}],
        "dynamic": {"every": 2, "eta": 1.0, "eval_windows": 2, "smoothing": 0.2}})
    assert cli(["run", str(path)]) == 0
    run_id = capsys.readouterr().out.split()[1]
    catalog = Catalog(tmp_path / "out" / "catalog.duckdb")
    trace = catalog.get_run(run_id).summary["recovery"]["domains"]
    assert [t["step"] for t in trace] == [0, 2, 4, 6, 8]
    assert trace[0]["weights"] == {digits: 0.25, prose: 0.75}
    # The reference is the dense model's loss on each domain's held-apart windows.
    streams = TrainingStreams(str(tmp_path / "model"), {prose: 3.0, digits: 1.0}, 32, 8 * 2 * 32, held_apart=2)
    dense = domain_losses(tiny_model_from(tmp_path / "model"), streams)
    assert trace[0]["reference"] == pytest.approx(dense, rel=1e-5)
    # Every recorded update is the rule applied to the losses it saw.
    sources = sorted(trace[0]["weights"])
    as_tensor = lambda d: torch.tensor([d[s] for s in sources], dtype=torch.float64)  # noqa: E731
    for before, after in zip(trace, trace[1:]):
        expected = updated(as_tensor(before["weights"]), as_tensor(after["losses"]), as_tensor(dense), 1.0, 0.2)
        assert torch.allclose(as_tensor(after["weights"]), expected, rtol=1e-5), (before, after)
    assert trace[-1]["weights"][prose] < 0.75  # smoothing alone pulls it towards uniform
    folder = tmp_path / "out" / "tiny" / f"run-{run_id[:12]}"
    assert (folder / "domain_weights.png").stat().st_size > 0
    assert "Dynamic batch loading: domain weights" in (folder / "report.md").read_text()
    assert json.loads((folder / "report.json").read_text())["recovery"]["domains"] == trace


def tiny_model_from(path):
    from tasks.surgery import load_model

    return load_model(path).eval()


@pytest.mark.parametrize("change, message", [
    ({"datasets": [{"source": "builtin:wiki-vital-en"}]}, "two or more distinct recover.datasets"),
    ({"dynamic": {"reference_losses": [{"source": "builtin:wiki-vital-en", "loss": 2.0}]}},
     "it needs exactly the sources"),
])
def test_dynamic_loading_refuses_what_it_cannot_balance(change, message):
    from pipelines import SpecError, validate_mapping

    recover = {"method": "continued_pretraining", "dynamic": {},
               "datasets": [{"source": "builtin:wiki-vital-en"}, {"source": "builtin:cmake-docs"}], **change}
    spec = {"name": "x", "model": {"source": "m"}, "calibration": {"dataset": "builtin:wiki-vital-en"},
            "search": {"target": {"blocks": 1}}, "recover": recover}
    with pytest.raises(SpecError) as info:
        validate_mapping(spec)
    assert any(message in line for line in info.value.errors), info.value.errors
