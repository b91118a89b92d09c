"""vLLM serves pruneflow's exports of the real demo model as transformers computes them (marker `vllm`).

vLLM's CPU build needs its own environment (`torch==2.13.0+cpu`, `transformers<5.20`): `.ci/run` builds it
once into `${PRUNEFLOW_CACHE:-~/.cache/pruneflow}/vllm-venv`, and each case runs there in a fresh process
with the offline `LLM` API. Per checkpoint: greedy generation of 32 tokens on 3 prompts equals transformers'
greedy generation from the same checkpoint, and the prompts' log-probabilities agree within 2e-3 (fp32).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.export import export_model
from tasks.sources import resolve_model
from tasks.surgery import load_model, remove_blocks
from tasks.surgery.width import LayerWidth, WidthPlan, apply_width

pytestmark = pytest.mark.vllm

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
NEW_TOKENS = 32
LOGPROB_TOLERANCE = 2e-3
SUBLAYER_CUT = ["layers.8.attn", "layers.17.attn", "layers.20.mlp", "layers.28"]


def _cases() -> dict:
    """name: (blocks removed, width plan or None, export format); None for the dense source itself."""
    channels = {3: tuple(range(0, 1536, 2))[:768], 10: tuple(range(1024))}  # multiples of 256 (DeciLM's ffn_mult)
    return {
        "dense": None,
        "nemotron_nas-halves": (SUBLAYER_CUT, None, "nemotron_nas"),
        "hf-layers": (["layers.15", "layers.28"], None, "hf"),
        "nemotron_nas-widths": (["layers.8.attn"], {lid: LayerWidth(channels=c) for lid, c in channels.items()},
                                "nemotron_nas"),
    }


SERVE = r"""
import json, sys

def main():
    from vllm import LLM, SamplingParams
    case = json.load(open(sys.argv[1]))
    llm = LLM(model=case["path"], dtype="float32", trust_remote_code=case["remote"], max_model_len=256,
              enforce_eager=True, seed=0)
    # ignore_eos without min_tokens: min_tokens would also forbid the end-of-text token, which greedy may pick.
    params = SamplingParams(temperature=0.0, max_tokens=case["new_tokens"], ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in case["prompts"]], params)
    result = []
    for ids, out in zip(case["prompts"], outs):
        # prompt_logprobs[i]: {token id: Logprob} for prompt token i (None for the first).
        logprobs = [entry[token].logprob for token, entry in zip(ids[1:], out.prompt_logprobs[1:])]
        result.append({"tokens": list(out.outputs[0].token_ids), "prompt_logprobs": logprobs})
    json.dump(result, open(sys.argv[2], "w"))

if __name__ == "__main__":
    main()
"""


def vllm_python() -> Path:
    root = Path(os.environ.get("PRUNEFLOW_CACHE", Path.home() / ".cache" / "pruneflow"))
    python = root / "vllm-venv" / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"no vLLM environment at {python.parent.parent} (.ci/run builds it)")
    return python


def _checkpoint(root: Path, name: str, source: Path) -> Path:
    case = _cases()[name]
    if case is None:
        return source
    blocks, plan, fmt = case
    model = remove_blocks(load_model(source), blocks)
    if plan:
        apply_width(model, WidthPlan(layers=plan))
    path = root / name
    path.mkdir()
    assert export_model(model, path, fmt) == fmt
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


def _transformers(path: Path, prompts: list[list[int]]) -> list[dict]:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            tokens = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                    eos_token_id=None)[0, len(ids):].tolist()  # past end-of-text, as vLLM
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
            out.append({"tokens": tokens, "prompt_logprobs": logprobs[range(len(ids) - 1), ids[1:]].tolist()})
    return out


@pytest.fixture(scope="module")
def source() -> Path:
    return Path(resolve_model("builtin:smollm2-135m").path)


@pytest.mark.parametrize("name", list(_cases()))
def test_vllm_serves_the_checkpoint_as_transformers_computes_it(name, source, tmp_path):
    python = vllm_python()
    path = _checkpoint(tmp_path, name, source)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    remote = (path / "config.json").read_text().count("auto_map") > 0
    (tmp_path / "case.json").write_text(json.dumps({"path": str(path), "prompts": prompts, "remote": remote,
                                                    "new_tokens": NEW_TOKENS}))
    (tmp_path / "serve.py").write_text(SERVE)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(python), "serve.py", "case.json", "served.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    served = json.loads((tmp_path / "served.json").read_text())
    expected = _transformers(path, prompts)
    for got, want in zip(served, expected):
        assert got["tokens"] == want["tokens"]
        diff = max(abs(a - b) for a, b in zip(got["prompt_logprobs"], want["prompt_logprobs"]))
        assert diff <= LOGPROB_TOLERANCE, diff
