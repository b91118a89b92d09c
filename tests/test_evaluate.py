"""Evaluation: lm-eval tasks on pruneflow's model object, and a pipeline that recovers and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "data" / "lm_eval"


def _our_choice_scores(model, tokenizer, question: str, choice: str) -> tuple[float, int]:
    """Log-likelihood of ' choice' after the question, as lm-eval's multiple-choice scoring defines it."""
    context = tokenizer(question, add_special_tokens=False).input_ids
    whole = tokenizer(question + " " + choice, add_special_tokens=False).input_ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits.float(), -1)[0]
    target = whole[len(context):]
    value = sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(target))
    return value, len((" " + choice).encode())


def test_local_lm_eval_task_scores_exactly_our_log_likelihoods(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    from tasks.downstream import downstream_evaluations
    from tasks.export import load_checkpoint
    from tasks.surgery import remove_blocks

    monkeypatch.chdir(ROOT)  # the task file names its data relative to the repository
    path = tiny_checkpoint(tmp_path / "m", layers=4)
    model = remove_blocks(load_checkpoint(path), ["layers.1.attn", "layers.2"])  # a pruned model object
    rows = downstream_evaluations(model, str(path), "pruned", ["pruneflow_tiny_mc"], [str(TASKS)], None, 4)
    got = {r.metric: r for r in rows}
    tokenizer = AutoTokenizer.from_pretrained(path)
    docs = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines()]
    acc = acc_norm = 0
    for doc in docs:
        scores = [_our_choice_scores(model, tokenizer, doc["question"], c) for c in doc["choices"]]
        acc += max(range(len(scores)), key=lambda i: scores[i][0]) == doc["answer"]
        acc_norm += max(range(len(scores)), key=lambda i: scores[i][0] / scores[i][1]) == doc["answer"]
    assert got["acc"].value == pytest.approx(acc / len(docs))
    assert got["acc_norm"].value == pytest.approx(acc_norm / len(docs))
    assert got["acc"].n_samples == len(docs) == 12 and got["acc"].kind == "task" and got["acc"].stage == "pruned"


def test_unknown_task_gets_did_you_mean():
    pytest.importorskip("lm_eval")
    from tasks.downstream import DownstreamError, check_tasks

    with pytest.raises(DownstreamError, match="no task 'pruneflow_tiny_mcq'; did you mean pruneflow_tiny_mc"):
        check_tasks(["pruneflow_tiny_mcq"], [str(TASKS)])


def test_pipeline_recovers_evaluates_every_stage_alike_and_reports(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from catalog import Catalog
    from flows.cli import main
    from tests.flowkit import tiny_pipeline

    monkeypatch.chdir(ROOT)
    # A random tiny model is no language model: the closed-form fit brings back the dense model's function,
    # which need not lower perplexity here, so the adapters are also refined on the loss itself.
    pipeline = tiny_pipeline(
        tmp_path, recover={"method": "low_rank", "rank": 4, "refine_steps": 30, "refine_lr": 0.01},
        evaluate={"tasks": ["pruneflow_tiny_mc"], "task_paths": [str(TASKS)]},
    )
    assert main(["run", str(pipeline)]) == 0
    out = capsys.readouterr().out
    assert "recover    low_rank ->" in out
    catalog = Catalog(tmp_path / "out" / "catalog.duckdb")
    (run,) = catalog.run_summaries()
    evals = catalog.evaluations(run.run_id)
    ppl = {e.stage: e for e in evals if e.kind == "perplexity"}
    assert set(ppl) == {"dense", "pruned", "recovered"}
    # Identical settings for every stage: same windows, same token counts.
    assert len({(e.n_tokens, e.seq_len, e.stride, e.dataset) for e in ppl.values()}) == 1
    assert ppl["recovered"].value < ppl["pruned"].value
    tasks = {(e.stage, e.metric) for e in evals if e.kind == "task"}
    assert tasks == {(s, m) for s in ("dense", "pruned", "recovered") for m in ("acc", "acc_norm")}
    kinds = {(a.stage, a.kind) for a in catalog.artifacts(run.run_id)}
    assert {("recovered", "checkpoint"), ("pruned", "report-md")} <= kinds
    run_folder = next((tmp_path / "out" / "tiny").glob("run-*"))
    report = (run_folder / "report.md").read_text()
    assert "| dataset | dense | pruned | recovered |" in report and "## Downstream tasks" in report
    assert f"{ppl['recovered'].value:.4f}" in report or f"{ppl['recovered'].value:.3f}" in report
    summary = json.loads((run_folder / "report.json").read_text())
    assert summary["recovery"]["method"] == "low_rank" and len(summary["recovery"]["fit"]) == 3
    catalog_arg = ["--catalog", str(tmp_path / "out" / "catalog.duckdb")]
    assert main(["show", run.run_id[:8], *catalog_arg]) == 0
    shown = capsys.readouterr().out
    assert str(run_folder / "report.md") in shown and "# pruneflow report" not in shown  # the report is pointed to
    assert main(["show", run.run_id[:8], "--verbose", *catalog_arg]) == 0
    assert "# pruneflow report: tiny" in capsys.readouterr().out


@pytest.mark.parametrize(
    "recover, evaluate, message",
    [
        ({"method": "bias"}, {}, "cannot carry; use prune.format auto"),
        ({"method": "lora", "seq_len": 200, "dataset": "SHORT"}, {}, "recover training source"),
        ({"method": "continued_pretraining", "seq_len": 1000}, {}, "exceeds the model's 256 positions"),
        ({"method": "none"}, {"tasks": ["pruneflow_tiny_mcq"]}, "did you mean pruneflow_tiny_mc"),
    ],
)
def test_bad_recovery_or_task_exits_2_before_writing(tmp_path, monkeypatch, capsys, recover, evaluate, message):
    pytest.importorskip("lm_eval")
    from flows.cli import main
    from tests.flowkit import tiny_pipeline

    monkeypatch.chdir(ROOT)
    (tmp_path / "short.txt").write_text("Far too short to train on.")
    recover = {k: str(tmp_path / "short.txt") if v == "SHORT" else v for k, v in recover.items()}
    changes = {"recover": recover, "evaluate": {**evaluate, "task_paths": [str(TASKS)]}}
    if recover["method"] == "bias":
        changes["prune"] = {"format": "hf"}
    pipeline = tiny_pipeline(tmp_path, **changes)
    assert main(["run", str(pipeline)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "tiny").exists() and not (tmp_path / "out" / "catalog.duckdb").exists()


@pytest.mark.integration  # indexes lm-eval's own task files (about a minute)
def test_unreachable_task_data_names_the_task(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from tasks.downstream import DownstreamError, downstream_evaluations
    from tasks.export import load_checkpoint

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = tiny_checkpoint(tmp_path / "m", layers=2)
    with pytest.raises(DownstreamError, match="the data of lm-eval task 'arc_easy' could not be reached"):
        downstream_evaluations(load_checkpoint(path), str(path), "dense", ["arc_easy"], [], 4, 4)
