"""No code from a model folder runs unless the spec sets model.trust_remote_code: a folder whose code would
write a file on import is refused through the CLI (exit 2, the setting named, nothing written) and runs only
when trusted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.flowkit import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]

_PAYLOAD = """import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import {base}
class {name}({base}):
    pass
"""


def _plant(folder: Path, marker: Path, where: str) -> None:
    """Code that writes `marker` on import, mapped the way transformers would load it from `where`."""
    if where == "tokenizer":
        (folder / "tokenization_planted.py").write_text(
            _PAYLOAD.format(marker=str(marker), base="PreTrainedTokenizerFast", name="PlantedTokenizer"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.update(auto_map={"AutoTokenizer": [None, "tokenization_planted.PlantedTokenizer"]},
                      tokenizer_class="PlantedTokenizer")
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        (folder / "configuration_planted.py").write_text(
            _PAYLOAD.format(marker=str(marker), base="LlamaConfig", name="PlantedConfig")
            + "    model_type = 'planted_llama'\n")
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="planted_llama", auto_map={"AutoConfig": "configuration_planted.PlantedConfig"})
        (folder / "config.json").write_text(json.dumps(config))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, timeout=300)


@pytest.mark.parametrize("where", ["tokenizer", "config"])
def test_folder_code_is_refused_without_trust(tmp_path, where):
    pipeline = tiny_pipeline(tmp_path)
    marker = tmp_path / "marker.txt"
    _plant(tmp_path / "model", marker, where)
    out = _cli("run", str(pipeline), cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "model.trust_remote_code" in out.stderr and "Traceback" not in out.stderr
    assert "[y/N]" not in out.stdout + out.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()  # neither the output folder nor the catalog was touched


def test_a_claimed_pruneflow_format_does_not_make_tokenizer_code_trusted(tmp_path):
    """The issue's case: config.json says `pruneflow.format: remote_code`; its tokenizer code must still not run."""
    pipeline = tiny_pipeline(tmp_path)
    model = tmp_path / "model"
    config = json.loads((model / "config.json").read_text())
    config["pruneflow"] = {"format": "remote_code", "base_model_type": "llama", "layer_ids": [0, 1, 2, 3],
                           "removed": []}
    (model / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "marker.txt"
    _plant(model, marker, "tokenizer")
    out = _cli("run", str(pipeline), cwd=tmp_path)
    assert out.returncode == 2 and "model.trust_remote_code" in out.stderr, out.stderr[-3000:]
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_trusted_folder_code_runs(tmp_path):
    from tasks.export import load_tokenizer

    tiny_pipeline(tmp_path)
    marker = tmp_path / "marker.txt"
    _plant(tmp_path / "model", marker, "tokenizer")
    assert type(load_tokenizer(tmp_path / "model", trust_remote_code=True)).__name__ == "PlantedTokenizer"
    assert marker.read_text() == "ran"


def test_trust_setting_is_validated_and_left_out_of_the_run_identity(tmp_path):
    from flows.keys import identity_hash
    from pipelines import load_spec

    pipeline = tiny_pipeline(tmp_path)
    assert identity_hash(load_spec(pipeline)) == identity_hash(load_spec(pipeline, ["model.trust_remote_code=false"]))
    out = _cli("validate", str(pipeline), "--set", "model.trust_remote_code=maybe", cwd=tmp_path)
    assert out.returncode == 2 and "model.trust_remote_code" in out.stderr, out.stderr
