"""`recover.method: distill`: the loss by hand, a student that learns its teacher, resume, and the CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from catalog import Catalog
from tasks.export import load_checkpoint
from tasks.recover import RecoveryContext, get_recovery
from tasks.recover.data import TrainingStreams
from tasks.recover.distill import DistillRecovery, Distiller, kl_to_teacher
from tasks.surgery import remove_blocks
from tests.flowkit import tiny_pipeline
from tests.tiny import tiny_checkpoint, tiny_corpus, tiny_model, tiny_windows

ROOT = Path(__file__).resolve().parents[1]
REMOVED = ["layers.1.mlp", "layers.2"]


def _settings(corpus: Path, **changes) -> DistillRecovery:
    values = {"method": "distill", "dataset": str(corpus), "steps": 20, "lr": 3e-3, "seq_len": 32, "batch_size": 4}
    return DistillRecovery.model_validate({**values, **changes})


def _context(dense_dir: Path, state_dir: Path, **changes) -> RecoveryContext:
    return RecoveryContext(dense_path=str(dense_dir), calibration=tiny_windows(4, 32), tokenizer_path=str(dense_dir),
                           state_dir=state_dir, batch_windows=4, log=lambda message: None, **changes)


def _held_out_windows(tmp_path: Path, tokenizer_dir: Path) -> torch.Tensor:
    """Windows of another corpus than the one trained on (different words, same kind of text)."""
    other = tiny_corpus(tmp_path / "held-out.txt", articles=40, seed=1)
    return TrainingStreams(str(tokenizer_dir), {str(other): 1.0}, 32, 2048).batch(0, 8, seed=5)


@pytest.fixture()
def dense_and_corpus(tmp_path) -> tuple[Path, Path]:
    return tiny_checkpoint(tmp_path / "dense", layers=4), tiny_corpus(tmp_path / "corpus.txt", articles=80)


def test_distilled_student_is_closer_to_its_teacher_on_held_out_text(tmp_path, dense_and_corpus):
    dense_dir, corpus = dense_and_corpus
    teacher = load_checkpoint(dense_dir)
    student = remove_blocks(load_checkpoint(dense_dir), REMOVED)
    windows = _held_out_windows(tmp_path, dense_dir)
    before = kl_to_teacher(student, teacher, windows)
    run = get_recovery("distill").run(student, _settings(corpus, steps=10), _context(dense_dir, tmp_path / "state"), "fp")
    after = kl_to_teacher(run.model, teacher, windows)
    assert after < 0.7 * before, (before, after)
    assert len(run.losses) == 10 and sum(run.losses[-3:]) < sum(run.losses[:3])
    assert run.trainable_params == sum(p.numel() for p in run.model.parameters())  # every weight trained
    assert not any(p.requires_grad for p in run.model.parameters())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 8.0])
def test_a_student_identical_to_its_teacher_has_no_distillation_loss(temperature):
    teacher = tiny_model("llama", layers=2)
    loss = Distiller(teacher, temperature, alpha=1.0)(copy.deepcopy(teacher), tiny_windows(4, 32))
    assert abs(loss.item()) <= 1e-6


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_loss_is_t_squared_kl_mixed_with_cross_entropy_as_computed_by_hand(alpha):
    teacher = tiny_model("llama", layers=2, seed=0)
    student = remove_blocks(tiny_model("llama", layers=2, seed=0), ["layers.1.mlp"])
    ids, temperature = tiny_windows(3, 16), 2.0
    loss = Distiller(teacher, temperature, alpha)(student, ids).item()
    with torch.no_grad():
        t_logits, s_logits = teacher(ids).logits.double(), student(ids).logits.double()
    p = torch.exp(t_logits / temperature)
    p = p / p.sum(-1, keepdim=True)
    q = torch.exp(s_logits / temperature)
    q = q / q.sum(-1, keepdim=True)
    kl = (p * (p.log() - q.log())).sum(-1).mean()  # per position, then the mean over 3 x 16 positions
    probs = torch.softmax(s_logits, -1)[:, :-1]
    cross_entropy = -probs.gather(-1, ids[:, 1:, None]).log().mean()
    expected = alpha * temperature**2 * float(kl) + (1 - alpha) * float(cross_entropy)
    assert float(kl) > 0.05  # the removed block changes the distributions: the check has something to see
    assert loss == pytest.approx(expected, rel=1e-4)


def test_distillation_resumes_where_it_stopped(tmp_path, dense_and_corpus):
    dense_dir, corpus = dense_and_corpus
    settings = _settings(corpus, steps=6, checkpoint_every=2, warmup_steps=2)
    pruned = remove_blocks(load_checkpoint(dense_dir), REMOVED)
    method = get_recovery("distill")
    reference = method.run(copy.deepcopy(pruned), settings, _context(dense_dir, tmp_path / "a"), "fp")

    def interrupt_after_step_5(done: int, total: int, loss: float) -> None:
        if done == 5:
            raise KeyboardInterrupt  # after the step-4 state was saved, before step 6

    with pytest.raises(KeyboardInterrupt):
        method.run(copy.deepcopy(pruned), settings, _context(dense_dir, tmp_path / "b", on_step=interrupt_after_step_5),
                   "fp")
    resumed = method.run(copy.deepcopy(pruned), settings, _context(dense_dir, tmp_path / "b"), "fp")
    assert resumed.resumed_from_step == 4
    assert resumed.losses == pytest.approx(reference.losses, rel=1e-5)
    for (name, a), (_, b) in zip(reference.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PRUNEFLOW_PLUGINS"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, stdin=subprocess.DEVNULL, timeout=600)


def test_pipeline_with_distill_records_a_recovered_model_closer_to_the_dense_one(tmp_path):
    recover = {"method": "distill", "steps": 4, "lr": 3e-3, "seq_len": 32, "batch_size": 4,
               "dataset": str(tmp_path / "corpus.txt")}
    pipeline = tiny_pipeline(tmp_path, recover=recover)
    done = _cli("run", str(pipeline))
    assert done.returncode == 0, done.stderr
    catalog = Catalog(tmp_path / "out" / "catalog.duckdb")
    (run,) = catalog.run_summaries()
    ppl = {e.stage: e.value for e in catalog.evaluations(run.run_id) if e.kind == "perplexity"}
    assert set(ppl) == {"dense", "pruned", "recovered"}
    run_folder = next((tmp_path / "out" / "tiny").glob("run-*"))
    recovery = json.loads((run_folder / "report.json").read_text())["recovery"]
    assert recovery["method"] == "distill" and len(recovery["losses"]) == 4
    dense = load_checkpoint(tmp_path / "model")
    windows = _held_out_windows(tmp_path, tmp_path / "model")
    pruned_kl = kl_to_teacher(load_checkpoint(run_folder / "checkpoint-pruned"), dense, windows)
    recovered_kl = kl_to_teacher(load_checkpoint(recovery["checkpoint"]), dense, windows)
    assert recovered_kl < 0.8 * pruned_kl, (pruned_kl, recovered_kl)


def test_distill_settings_that_cannot_work_exit_2_before_anything_is_written(tmp_path):
    pipeline = tiny_pipeline(tmp_path, recover={"method": "distill", "dataset": str(tmp_path / "short.txt")})
    (tmp_path / "short.txt").write_text("Far too short to train on.")
    cold = _cli("validate", str(pipeline), "--set", "recover.temperature=0")
    assert cold.returncode == 2 and "recover.distill.temperature" in cold.stderr and "Traceback" not in cold.stderr
    short = _cli("run", str(pipeline))
    assert short.returncode == 2 and "recover training source" in short.stderr, short.stderr
    assert "Traceback" not in short.stderr
    assert not (tmp_path / "out" / "tiny").exists() and not (tmp_path / "out" / "catalog.duckdb").exists()
