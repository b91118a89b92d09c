"""Cached generation, as users run it: every family in every format it exports, reloaded in a fresh process.

Greedy generation with the KV cache must give the same tokens as without it (and as the in-memory pruned
model), with left padding in the batch, under the installed transformers release. CI runs this file at
both ends of the supported transformers range. No code of pruneflow's or of the checkpoints may use the
cache keyword the installed release deprecates.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.export import export_model, format_names, get_format
from tasks.surgery import architecture_for, remove_blocks
from tests.test_families import FAMILIES, build
from tests.tiny import tiny_windows

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Removed blocks per format: whole layers for `hf`; lone halves elsewhere, with layer 0's attention gone
# (its cache slot is the one transformers reads the cached length from), except where the format
# forbids it (nemotron_nas must start with an attention).
CUTS = {"hf": ["layers.1"], "nemotron_nas": ["layers.1.attn", "layers.2.mlp"]}
SUBLAYER_CUT = ["layers.0.attn", "layers.2.mlp"]
NEW_TOKENS = 8

GENERATE = r"""
import json, logging, sys, torch, warnings
from pathlib import Path
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging
from tasks.export import load_checkpoint
from tasks.speed import cache_layers_filled
from tasks.surgery.kv_cache import output_cache

root = Path(sys.argv[1])
cases = json.loads((root / "cases.json").read_text())
prompt, mask = torch.load(root / "prompt.pt")
deprecations = []

class Collect(logging.Handler):
    def emit(self, record):
        if "deprecated" in record.getMessage():
            deprecations.append(record.getMessage())

hf_logging.get_logger("transformers").addHandler(Collect())
warnings.simplefilter("always")
results = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for name, case in cases.items():
        path = root / name
        if case["loading"] == "pruneflow":
            model = load_checkpoint(path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=case["loading"] == "remote",
                                                         attn_implementation=case["kernel"]).eval()
        kw = dict(attention_mask=mask, max_new_tokens=case["new_tokens"], min_new_tokens=case["new_tokens"],
                  do_sample=False)
        with torch.no_grad():
            cache = output_cache(model(prompt, attention_mask=mask, use_cache=True))
            results[name] = dict(cls=type(model).__name__,
                                 cached=model.generate(prompt, use_cache=True, **kw).tolist(),
                                 uncached=model.generate(prompt, use_cache=False, **kw).tolist(),
                                 cache_layers=len(cache.layers), cache_filled=cache_layers_filled(cache))
deprecations += [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
(root / "results.json").write_text(json.dumps(dict(results=results, deprecations=deprecations)))
"""


def _loading(fmt: str) -> str:
    return {"hf": "plain", "pruneflow": "pruneflow"}.get(fmt, "remote")


def _cases() -> list[tuple[str, str]]:
    """(family, format) for every format that can express the family's pruned model."""
    cases = []
    for family in FAMILIES:
        for fmt in format_names():
            if fmt == "gguf":
                continue  # llama.cpp's file, not transformers': tests/test_gguf.py serves it
            model = remove_blocks(build(family), CUTS.get(fmt, SUBLAYER_CUT))
            if get_format(fmt).problem(model) is None:
                cases.append((family, fmt))
    return cases


CASES = _cases()


def _prompt() -> tuple[torch.Tensor, torch.Tensor]:
    prompt = tiny_windows(samples=2, seq_len=7, seed=11)
    mask = torch.ones_like(prompt)
    prompt[0, :2], mask[0, :2] = 0, 0  # left padding on one row
    return prompt, mask


def _run_fresh(root: Path, tmp: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp / "hf-modules")}
    done = subprocess.run([sys.executable, "-c", GENERATE, str(root)], capture_output=True, text=True, cwd=ROOT,
                          env=env, stdin=subprocess.DEVNULL, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((root / "results.json").read_text())


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[dict, dict]:
    root = tmp_path_factory.mktemp("cached-generation")
    prompt, mask = _prompt()
    torch.save((prompt, mask), root / "prompt.pt")
    cases, expected = {}, {}
    for family, fmt in CASES:
        name = f"{family}-{fmt}"
        model = remove_blocks(build(family), CUTS.get(fmt, SUBLAYER_CUT))
        assert export_model(model, root / name, fmt) == fmt
        kernel = architecture_for(model.config.model_type).attn_implementation
        cases[name] = dict(loading=_loading(fmt), kernel=kernel, new_tokens=NEW_TOKENS)
        with torch.no_grad():
            expected[name] = model.generate(prompt, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                            min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False).tolist()
    (root / "cases.json").write_text(json.dumps(cases))
    return _run_fresh(root, tmp_path_factory.mktemp("modules")), expected


def test_every_family_has_a_loadable_format_beyond_pruneflow():
    assert {family for family, fmt in CASES if fmt == "remote_code"} == set(FAMILIES)
    assert {fmt for _, fmt in CASES} == {"hf", "pruneflow", "remote_code", "nemotron_nas"}


@pytest.mark.parametrize("family,fmt", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_greedy_generation_same_with_and_without_cache(generated, family, fmt):
    results, expected = generated
    got = results["results"][f"{family}-{fmt}"]
    assert got["cached"] == got["uncached"] == expected[f"{family}-{fmt}"]
    assert len(got["cached"][0]) == _prompt()[0].shape[1] + NEW_TOKENS
    if fmt in ("remote_code", "nemotron_nas", "hf"):
        # Each cut leaves 3 of the 4 attentions: the served model's cache has a slot for each, and no other.
        assert got["cache_layers"] == got["cache_filled"] == 3


def test_no_deprecated_cache_keyword_in_any_load_or_generation(generated):
    results, _ = generated
    assert results["deprecations"] == []


# Checkpoints written before transformers 5.24's rename (pruneflow 6879e8e), with that release's code files.
PRE_PORT = sorted(p.name for p in FIXTURES.glob("pre-port-*"))


def _pre_port_copies(root: Path) -> Path:
    cases = {}
    for name in PRE_PORT:
        expected = json.loads((FIXTURES / name / "expected.json").read_text())
        prompt = torch.tensor(expected["prompt"])  # the same prompt in every fixture
        shutil.copytree(FIXTURES / name, root / name)
        cases[name] = dict(loading="remote", kernel="sdpa", new_tokens=len(expected["greedy"][0]) - prompt.shape[1])
    torch.save((prompt, torch.ones_like(prompt)), root / "prompt.pt")
    (root / "cases.json").write_text(json.dumps(cases))
    return root


@pytest.fixture(scope="module")
def pre_port(tmp_path_factory) -> dict:
    """As written, then after `pruneflow refresh-code` rewrote their code files."""
    as_written = _pre_port_copies(tmp_path_factory.mktemp("pre-port"))
    refreshed = _pre_port_copies(tmp_path_factory.mktemp("refreshed"))
    outputs = {name: _cli("refresh-code", str(refreshed / name)) for name in PRE_PORT}
    return dict(as_written=_run_fresh(as_written, tmp_path_factory.mktemp("modules")),
                refreshed=_run_fresh(refreshed, tmp_path_factory.mktemp("modules")), outputs=outputs,
                refreshed_root=refreshed)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          stdin=subprocess.DEVNULL, timeout=300)


def test_pre_port_fixtures_are_there():
    assert PRE_PORT == ["pre-port-nemotron_nas-llama", "pre-port-remote_code-qwen2"]


@pytest.mark.parametrize("name", PRE_PORT)
@pytest.mark.parametrize("state", ["as_written", "refreshed"])
def test_checkpoint_written_before_the_port_generates_as_it_did(pre_port, name, state):
    expected = json.loads((FIXTURES / name / "expected.json").read_text())["greedy"]
    got = pre_port[state]["results"][name]
    assert got["cached"] == got["uncached"] == expected


@pytest.mark.parametrize("name", PRE_PORT)
def test_refresh_code_rewrites_only_the_code(pre_port, name):
    done = pre_port["outputs"][name]
    assert done.returncode == 0, done.stderr
    assert "kv_cache.py" in done.stdout and "modeling_" in done.stdout
    refreshed = pre_port["refreshed_root"] / name
    for kept in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (refreshed / kept).read_bytes() == (FIXTURES / name / kept).read_bytes()
    assert not (FIXTURES / name / "kv_cache.py").exists() and (refreshed / "kv_cache.py").is_file()
    assert not list(refreshed.glob(".*.tmp"))


def test_refreshed_checkpoints_use_no_deprecated_cache_keyword(pre_port):
    assert pre_port["refreshed"]["deprecations"] == []


def test_refresh_code_refuses_a_checkpoint_without_code(tmp_path):
    model = remove_blocks(build("llama"), ["layers.1"])
    export_model(model, tmp_path / "plain", "hf")
    before = sorted(p.name for p in (tmp_path / "plain").iterdir())
    done = _cli("refresh-code", str(tmp_path / "plain"))
    assert done.returncode == 2
    assert "'hf' checkpoint, which carries no modeling code" in done.stderr and "remote_code" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == before
    missing = _cli("refresh-code", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no config.json" in missing.stderr


def test_pruneflow_code_never_reads_the_exempted_deprecated_attribute():
    """pyproject.toml turns every FutureWarning into a test error except transformers' deprecation of
    `is_gradient_checkpointing`, which PEFT reads; that exemption must not hide a use of pruneflow's own."""
    sources = [p for package in ("catalog", "tasks", "pipelines", "flows", "deploy")
               for p in (ROOT / package).rglob("*.py")]
    assert len(sources) > 50
    assert [str(p.relative_to(ROOT)) for p in sources if "is_gradient_checkpointing" in p.read_text()] == []
