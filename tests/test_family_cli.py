"""Every supported family through `pruneflow run`, as a user runs it: a two-block sublayer search and a
one-layer search with the default evaluate and prune stages, then each pruned checkpoint reloaded with
transformers alone in a fresh process (remote code only where halves were removed), computing what pruneflow's
own pruned model computes, with no FutureWarning from pruneflow's code or the checkpoint's."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from catalog import Catalog
from flows.cli import main as cli
from tasks.surgery import architecture_for, load_model, remove_blocks
from tests.flowkit import tiny_pipeline
from tests.test_families import FAMILIES, build
from tests.tiny import tiny_corpus, tiny_tokenizer, tiny_windows

pytestmark = pytest.mark.integration

SEARCHES = {"sublayer": {"blocks": 2}, "layer": {"blocks": 1}}

# Transformers alone: each checkpoint as a user loads it, with the kernel of its family (Gemma 2: eager).
RELOAD = r"""
import json, sys, warnings, torch
from transformers import AutoModelForCausalLM
warnings.simplefilter("error", FutureWarning)
root = sys.argv[1]
ids = torch.load(f"{root}/ids.pt")
out = {}
for name, case in json.load(open(f"{root}/cases.json")).items():
    model = AutoModelForCausalLM.from_pretrained(case["path"], trust_remote_code=case["remote"],
                                                 attn_implementation=case["kernel"]).eval()
    with torch.no_grad():
        settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
        out[name] = {"cls": type(model).__name__, "logits": model(ids).logits,
                     "cached": model.generate(ids[:, :8], use_cache=True, **settings),
                     "uncached": model.generate(ids[:, :8], use_cache=False, **settings)}
torch.save(out, f"{root}/reloaded.pt")
"""


def _run(root: Path, family: str, granularity: str) -> dict:
    """`pruneflow run` on the family's tiny model; what the catalog says the run removed and wrote."""
    model_dir = root / "model"
    if not model_dir.exists():
        build(family).save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
        tiny_corpus(root / "corpus.txt")
    catalog_path = root / "out" / granularity / "catalog.duckdb"
    path = tiny_pipeline(root, name=f"cli-{family.replace('_', '-')}-{granularity}",
                         score={"granularity": granularity}, search={"target": SEARCHES[granularity]},
                         output_dir=str(root / "out" / granularity / "run"), catalog=str(catalog_path))
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = cli(["run", str(path)])
    assert code == 0, (family, granularity, errors.getvalue()[-3000:])
    catalog = Catalog(catalog_path)
    run_id = printed.getvalue().split()[1]
    checkpoint = next(a.path for a in catalog.artifacts(run_id) if a.kind == "checkpoint" and a.stage == "pruned")
    return {"blocks": [s.block for s in catalog.steps(run_id)], "checkpoint": checkpoint,
            "evaluations": sorted({(e.stage, e.metric) for e in catalog.evaluations(run_id)})}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every family and search through the CLI, then every checkpoint reloaded in one fresh process."""
    root = tmp_path_factory.mktemp("family-cli")
    ids = tiny_windows(samples=2, seq_len=24)
    torch.save(ids, root / "ids.pt")
    runs, cases, expected = {}, {}, {}
    for family in FAMILIES:
        for granularity in SEARCHES:
            name = f"{family}-{granularity}"
            run = runs[name] = _run(root / family, family, granularity)
            config = json.loads((Path(run["checkpoint"]) / "config.json").read_text())
            run["format"] = (config.get("pruneflow") or {}).get("format", "hf")
            kernel = architecture_for(build(family).config.model_type).attn_implementation
            cases[name] = {"path": run["checkpoint"], "remote": run["format"] != "hf", "kernel": kernel}
            # pruneflow's own pruned model: the source with the run's blocks removed, in memory.
            pruned = remove_blocks(load_model(root / family / "model"), run["blocks"])
            with torch.no_grad():
                expected[name] = pruned(ids).logits
    (root / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run([sys.executable, "-c", RELOAD, str(root)], capture_output=True, text=True,
                          cwd=root)  # not the project folder: transformers and the checkpoint's own files only
    assert done.returncode == 0, done.stderr[-4000:]
    return runs, expected, torch.load(root / "reloaded.pt")


@pytest.mark.parametrize("family", FAMILIES)
def test_sublayer_search_gives_a_checkpoint_transformers_loads(results, family):
    runs, expected, reloaded = results
    name = f"{family}-sublayer"
    run, got = runs[name], reloaded[name]
    assert len(run["blocks"]) == 2
    # The search removes at least one lone half, so the checkpoint needs (and carries) its own code.
    assert any(b.endswith((".attn", ".mlp")) for b in run["blocks"])
    assert run["format"] == "remote_code" and got["cls"].startswith("Pruned")
    assert (got["logits"] - expected[name]).abs().max().item() <= 1e-5
    assert torch.equal(got["cached"], got["uncached"])
    # The default evaluate stage measured the dense and the pruned model, speed included.
    assert {("dense", "perplexity"), ("pruned", "perplexity"), ("pruned", "params")} <= set(map(tuple, run["evaluations"]))
    assert any(stage == "pruned" and "tokens_per_s" in metric for stage, metric in run["evaluations"])


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_layer_search_gives_a_plain_checkpoint(results, family):
    runs, expected, reloaded = results
    name = f"{family}-layer"
    run, got = runs[name], reloaded[name]
    assert run["format"] == "hf" and not got["cls"].startswith("Pruned")
    assert (got["logits"] - expected[name]).abs().max().item() <= 1e-5
    assert torch.equal(got["cached"], got["uncached"])
