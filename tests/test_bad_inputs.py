"""A corpus of bad inputs through the command line: each exits 2 with one message naming the field at
fault, no traceback, and writes nothing (the folder tree is the same before and after).

The default suite calls the CLI's `main` in-process (each case costs a preflight, not a Python start);
`-m integration` runs every case as its own `python -m flows.cli` process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from flows.cli import EXIT_BROKEN_PIPE, main
from tests.flowkit import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _truncate(root: Path) -> None:
    weights = root / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])


def _garbage_header(root: Path) -> None:
    weights = root / "model" / "model.safetensors"
    weights.write_bytes((200).to_bytes(8, "little") + b"{not json" + weights.read_bytes()[17:])


def _nested(root: Path, depth: int) -> None:
    path = root / "pipeline.yaml"
    path.write_text(path.read_text() + "notes: " + "[" * depth + "]" * depth + "\n")


def _make_file(path: Path) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("not a folder")
    return setup


def _no_setup(root: Path) -> None:
    pass


# (case id, what is done to a valid tiny pipeline, --set overrides, text the message must contain)
CASES = [
    ("truncated-safetensors", _truncate, [], "model.source"),
    ("garbage-safetensors-header", _garbage_header, [], "model.source"),
    ("missing-shard", lambda r: (r / "model" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})), [], "model.source"),
    ("no-weights", lambda r: (r / "model" / "model.safetensors").unlink(), [], "model.source"),
    ("unknown-model-type", lambda r: _edit_json(r / "model" / "config.json", model_type="foo_llm"), [],
     "model.source"),
    ("known-type-without-adapter", lambda r: _edit_json(r / "model" / "config.json", model_type="bert"), [],
     "model_type 'bert'"),
    ("custom-code-config", lambda r: _edit_json(r / "model" / "config.json", model_type="planted",
                                                auto_map={"AutoConfig": "configuration_planted.PlantedConfig"}),
     [], "model.trust_remote_code"),
    ("missing-model", _no_setup, ["model.source=no/such/dir"], "model.source"),
    ("output-dir-is-a-file", _make_file(Path("out/tiny")), [], "output_dir"),
    ("output-dir-under-a-file", _make_file(Path("blocker")), ["output_dir=blocker/tiny"], "output_dir"),
    ("output-dir-unwritable", _no_setup, ["output_dir=/proc/pruneflow/out"], "output_dir"),
    ("catalog-is-a-folder", lambda r: (r / "out" / "catalog.duckdb").mkdir(parents=True), [], "catalog"),
    ("catalog-unwritable", _no_setup, ["catalog=/proc/pruneflow.duckdb"], "catalog"),
    ("catalog-not-duckdb", _make_file(Path("out/catalog.duckdb")), [], "catalog.duckdb"),
    ("yaml-too-deep-for-the-parser", lambda r: _nested(r, 5000), [], "nested more than"),
    ("yaml-deeper-than-a-spec", lambda r: _nested(r, 40), [], "notes.0.0"),
    ("set-value-too-deep", _no_setup, ["score.batch_windows=" + "[" * 5000 + "]" * 5000], "--set score.batch_windows"),
    ("yaml-not-utf8", lambda r: (r / "pipeline.yaml").write_bytes(b"name: \xff\xfe\n"), [], "UTF-8"),
    ("unknown-key", _no_setup, ["model.trust_remote_cod=true"], "model.trust_remote_cod"),
    ("trust-not-a-bool", _no_setup, ["model.trust_remote_code=sometimes"], "model.trust_remote_code"),
    ("unreachable-target", _no_setup, ["search.target.blocks=100"], "search.target"),
    ("missing-dataset", _no_setup, ["calibration.dataset=no-such.txt"], "calibration.dataset"),
    ("owner-file-damaged", _make_file(Path("out/tiny/pruneflow-run.json")), [], "output_dir"),
    ("config-not-json", lambda r: (r / "model" / "config.json").write_text("{oops"), [], "model.source"),
    ("tokenizer-missing", lambda r: [(r / "model" / name).unlink() for name in ("tokenizer.json", "tokenizer_config.json")],
     [], "model.source"),
    ("tokenizer-config-not-json", lambda r: (r / "model" / "tokenizer_config.json").write_text("{oops"), [],
     "tokenizer_config.json"),
    ("bin-not-an-archive", lambda r: ((r / "model" / "model.safetensors").rename(r / "model" / "pytorch_model.bin"),),
     [], "model.source"),
    ("gguf-without-magic", lambda r: (r / "fake.gguf").write_text("not gguf"), ["model.source=fake.gguf"], "model.source"),
    ("extends-not-a-name", lambda r: (r / "pipeline.yaml").write_text((r / "pipeline.yaml").read_text() + "extends: [a]\n"),
     [], "extends"),
    ("missing-eval-dataset", _no_setup, ["evaluate.datasets=[no-such.txt]"], "evaluate.datasets"),
    ("calibration-longer-than-the-model", _no_setup, ["calibration.seq_len=300"],
     "calibration.seq_len 300 exceeds the model's 256 positions"),
    ("evaluation-longer-than-the-model", _no_setup, ["evaluate.seq_len=512"],
     "evaluate.seq_len 512 exceeds the model's 256 positions"),
    ("nothing-removed-without-width", _no_setup, ["search.target.blocks=0"], "search.target.blocks"),
    ("width-above-the-model", _no_setup, ["search.target.blocks=0", "width.shape.intermediate_size=200"],
     "width.shape.intermediate_size 200 is above the model's 96"),
    ("width-unknown-metric", _no_setup,
     ["search.target.blocks=0", "width.metric=activaton", "width.shape.intermediate_size=64"], "width.metric"),
    ("width-splits-kv-groups", _no_setup,
     ["search.target.blocks=0", "width.shape.num_attention_heads=3", "width.shape.num_key_value_heads=2"],
     "width.shape.num_attention_heads 3 must be a multiple of num_key_value_heads 2"),
    ("width-shape-and-budget", _no_setup,
     ["search.target.blocks=0", "width.shape.intermediate_size=64", "width.params_ratio=0.2"], "width"),
    ("osscar-with-a-budget", _no_setup,
     ["search.target.blocks=0", "width.strategy=osscar", "width.params_ratio=0.2"],
     "give width.shape instead of width.params_ratio"),
    ("osscar-with-a-metric", _no_setup,
     ["search.target.blocks=0", "width.strategy=osscar", "width.metric=taylor", "width.shape.intermediate_size=64"],
     "width.strategy osscar ranks the units itself: remove width.metric"),
    ("osscar-hidden-size", _no_setup,
     ["search.target.blocks=0", "width.strategy=osscar", "width.shape.hidden_size=48"],
     "width.shape.hidden_size: strategy osscar prunes heads and MLP channels"),
    ("sheared-after-a-sublayer-search", _no_setup,
     ["width.strategy=sheared", "width.shape.intermediate_size=64"],
     "width.strategy sheared works on whole layers"),
    ("sheared-more-layers-than-the-model", _no_setup,
     ["search.target.blocks=0", "width.strategy=sheared", "width.shape.intermediate_size=64",
      "width.sheared.num_hidden_layers=9"], "width.sheared.num_hidden_layers 9 is above the model's 4 layers"),
    ("osscar-settings-elsewhere", _no_setup,
     ["search.target.blocks=0", "width.shape.intermediate_size=64", "width.osscar.swap_rounds=2"],
     "width.osscar applies only with width.strategy: osscar"),
    ("width-share-resolves-to-nothing", _no_setup, ["search.target.blocks=0", "width.shape.intermediate_size=0.5%"],
     "width.shape.intermediate_size '0.5%' of the model's 96 MLP channels resolves to 0; give at least 0.53%"),
    ("width-share-of-heads-beyond-the-kept-groups", _no_setup,
     ["search.target.blocks=0", "width.shape.num_key_value_heads=50%", "width.shape.num_attention_heads=100%"],
     "width.shape.num_attention_heads '100%' of the model's 4 query heads resolves to 4, but the kept KV groups (1) "
     "hold at most 2"),
    ("width-a-float-is-no-share", _no_setup, ["search.target.blocks=0", "width.shape.intermediate_size=0.9"],
     "width.shape.intermediate_size: 0.9 is not a width"),
    ("width-a-format-cannot-hold", _no_setup,
     ["search.target.blocks=0", "width.shape.intermediate_size=64", "prune.format=nemotron_nas"],
     "width.shape.intermediate_size a multiple of 256 (not 64)"),
]
if not torch.cuda.is_available():
    CASES += [("cuda-without-gpu", _no_setup, ["model.device=cuda"], "model.device"),
              ("dask-workers-on-cuda-without-gpu", _no_setup,
               ["execution.runner=dask", "execution.workers=1", "execution.device=cuda"], "execution.device")]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base")
    tiny_pipeline(root)
    return root


def _prepared(base: Path, tmp_path: Path, setup: Callable[[Path], None]) -> Path:
    root = tmp_path / "case"
    shutil.copytree(base, root)
    spec = yaml.safe_load((root / "pipeline.yaml").read_text())
    (root / "pipeline.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(spec).replace(str(base), str(root)))))
    setup(root)
    return root


def _overrides(sets: list[str]) -> list[str]:
    return [arg for item in sets for arg in ("--set", item)]


@pytest.mark.parametrize("case, setup, sets, named", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_its_field_and_nothing_written(base, tmp_path, capsys, monkeypatch, case, setup,
                                                                  sets, named):
    root = _prepared(base, tmp_path, setup)
    monkeypatch.chdir(root)
    before = _tree(root)
    assert main(["run", str(root / "pipeline.yaml"), *_overrides(sets)]) == 2
    err = capsys.readouterr().err
    assert named in err and err.startswith("pruneflow run: error:"), err
    assert "Traceback" not in err
    assert _tree(root) == before


@pytest.mark.integration
@pytest.mark.parametrize("case, setup, sets, named", CASES, ids=[c[0] for c in CASES])
def test_bad_input_in_its_own_process(base, tmp_path, case, setup, sets, named):
    root = _prepared(base, tmp_path, setup)
    before = _tree(root)
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(root / "pipeline.yaml"), *_overrides(sets)],
                         capture_output=True, text=True, cwd=root, stdin=subprocess.DEVNULL, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and named in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert _tree(root) == before


def test_a_reader_that_closes_the_pipe_gets_no_traceback(tmp_path):
    from catalog import Catalog

    Catalog(tmp_path / "catalog.duckdb")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "runs", "--catalog", str(tmp_path / "catalog.duckdb")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()  # before the command has printed anything, as `| head -0` would
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
