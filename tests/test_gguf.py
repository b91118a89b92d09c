"""`prune.format: gguf`: one file in llama.cpp's llama or deci architecture, with the tokenizer, read back by
pruneflow exactly, and (marker `llama_cpp`) served by llama.cpp with transformers' greedy tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tasks.export import ExportError, checkpoint_format, export_model, load_checkpoint, resolve_format
from tasks.export.gguf_format import GGUF_FILE, ZERO_FFN_CHANNELS, rotary_halves, rotary_pairs
from tasks.surgery import remove_blocks
from tasks.surgery.adapted import install_adapters
from tasks.surgery.width import LayerWidth, WidthPlan, apply_width
from tests.tiny import tiny_bpe_tokenizer, tiny_model, tiny_tokenizer

VOCAB = 264  # the tokenizer's 260 tokens, padded
CASES = {
    # name: (blocks removed, width plan, architecture written)
    "layers": (["layers.1"], None, "llama"),
    "halves": (["layers.1.attn", "layers.2.mlp"], None, "deci"),
    "uniform": ([], {lid: LayerWidth(heads=(0, 1), kv_heads=(0,), channels=tuple(range(0, 96, 2))) for lid in range(4)},
                "llama"),
    "per_layer": (["layers.3.attn"], {0: LayerWidth(channels=tuple(range(40))),
                                      1: LayerWidth(heads=(2, 3), kv_heads=(1,))}, "deci"),
}


def build(blocks: list[str], plan: dict | None, seed: int = 0) -> torch.nn.Module:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=259)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.mul_(1.0 + torch.rand(()) * 4.0)
    remove_blocks(model, blocks)
    return apply_width(model, WidthPlan(layers=plan)) if plan else model


def export(model, path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    tiny_bpe_tokenizer().save_pretrained(path)
    assert export_model(model, path, "gguf") == "gguf"
    return path


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path / GGUF_FILE))
    out = {}
    for key, field in reader.fields.items():
        values = [field.parts[i] for i in field.data]
        if field.types and field.types[0] == gguf.GGUFValueType.STRING:
            values = [bytes(v).decode() for v in values]
        else:
            values = [v.tolist()[0] if len(v) == 1 else v.tolist() for v in values]
        out[key] = values[0] if len(values) == 1 and field.types[0] != gguf.GGUFValueType.ARRAY else values
    out["tensors"] = {t.name: list(reversed(t.shape.tolist())) for t in reader.tensors}
    return out


def test_rotary_rows_interleave_and_back():
    weight = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of 8 rows
    paired = rotary_pairs(weight, 2)
    # Head 0's rows 0..3 (first half) and 4..7 (second half) alternate: 0, 4, 1, 5, ...
    assert paired[:8, 0].tolist() == [0.0, 12.0, 3.0, 15.0, 6.0, 18.0, 9.0, 21.0]
    assert torch.equal(rotary_halves(paired, 2), weight)


@pytest.mark.parametrize("name", CASES)
def test_written_file_reads_back_as_the_pruned_model(name, tmp_path):
    blocks, plan, arch = CASES[name]
    model = build(blocks, plan)
    path = export(model, tmp_path / name)
    assert sorted(p.name for p in path.iterdir() if p.suffix in (".gguf", ".safetensors")) == [GGUF_FILE]
    assert checkpoint_format(path) == "gguf"
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path)(ids).logits, model(ids).logits)
    meta = fields(path)
    assert meta["general.architecture"] == arch
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == VOCAB and meta["tokenizer.ggml.eos_token_id"] == 259
    assert meta[f"{arch}.block_count"] == 4 - len([b for b in blocks if b.count(".") == 1])


def test_deci_arrays_give_each_layer_its_sizes(tmp_path):
    blocks, plan, _ = CASES["per_layer"]
    meta = fields(export(build(blocks, plan), tmp_path / "ckpt"))
    assert meta["deci.attention.head_count"] == [4, 2, 4, 0]  # layer 3's attention is gone
    assert meta["deci.attention.head_count_kv"] == [2, 1, 2, 0]
    assert meta["deci.feed_forward_length"] == [40, 96, 96, 96]
    assert meta["deci.attention.key_length"] == 16
    assert "blk.3.attn_q.weight" not in meta["tensors"] and "blk.3.attn_norm.weight" not in meta["tensors"]
    assert meta["tensors"]["blk.1.attn_q.weight"] == [32, 64] and meta["tensors"]["blk.1.attn_k.weight"] == [16, 64]

    # A removed MLP is written as zero channels: llama.cpp's deci graph would drop the attention of an
    # FFN-free layer.
    meta = fields(export(build(*CASES["halves"][:2]), tmp_path / "halves"))
    assert meta["deci.feed_forward_length"] == [96, 96, ZERO_FFN_CHANNELS, 96]
    reader = gguf.GGUFReader(str(tmp_path / "halves" / GGUF_FILE))
    down = next(t for t in reader.tensors if t.name == "blk.2.ffn_down.weight")
    assert not np.array(down.data).any()


def test_what_gguf_cannot_hold_is_refused(tmp_path):
    with pytest.raises(ExportError, match=r"first kept layer \(layers.0\) has no attention"):
        resolve_format("gguf", build(["layers.0.attn"], None))
    with pytest.raises(ExportError, match="writes Llama models.*'qwen2'"):
        resolve_format("gguf", remove_blocks(tiny_model("qwen2"), ["layers.1.attn"]))
    adapted = build(["layers.1.attn"], None)
    install_adapters(adapted, {"layers.1.attn": 2})
    with pytest.raises(ExportError, match="format 'gguf' has no place for the recovery adapters"):
        resolve_format("gguf", adapted)
    path = tmp_path / "char-tokenizer"
    path.mkdir()
    tiny_tokenizer().save_pretrained(path)
    with pytest.raises(ExportError, match="byte-level BPE tokenizers.*WordLevel"):
        export_model(build(["layers.1"], None), path, "gguf")


def test_config_records_the_format_and_no_safetensors(tmp_path):
    path = export(build(*CASES["halves"][:2]), tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    assert config["pruneflow"]["format"] == "gguf"
    assert config["pruneflow"]["removed"] == ["layers.1.attn", "layers.2.mlp"]


def test_cli_run_writes_a_gguf_checkpoint_and_refuses_what_it_cannot_hold(tmp_path, capsys):
    from catalog import Catalog
    from flows.cli import main as cli
    from tests.flowkit import tiny_pipeline
    from tests.tiny import tiny_corpus

    root = tmp_path / "bpe"
    build([], None).save_pretrained(root / "model")
    tiny_bpe_tokenizer().save_pretrained(root / "model")
    tiny_corpus(root / "corpus.txt")
    # llama.cpp needs the first layer's attention (see test_what_gguf_cannot_hold_is_refused).
    path = tiny_pipeline(root, search={"target": {"blocks": 2}, "protect": ["layers.0.attn"]},
                         prune={"format": "gguf"})
    assert cli(["run", str(path)]) == 0
    run_id = capsys.readouterr().out.split()[1]
    catalog = Catalog(root / "out" / "catalog.duckdb")
    checkpoint = Path(next(a.path for a in catalog.artifacts(run_id) if a.kind == "checkpoint"))
    assert (checkpoint / GGUF_FILE).is_file() and checkpoint_format(checkpoint) == "gguf"
    blocks = [s.block for s in catalog.steps(run_id)]
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(checkpoint)(ids).logits, remove_blocks(build([], None), blocks)(ids).logits)
    assert {("pruned", "perplexity")} <= {(e.stage, e.metric) for e in catalog.evaluations(run_id)}

    # The tiny character-level tokenizer has no GGUF form: refused before anything is written.
    refused = tmp_path / "chars"
    path = tiny_pipeline(refused, prune={"format": "gguf"})
    assert cli(["run", str(path)]) == 2
    assert "prune.format: format 'gguf' writes byte-level BPE tokenizers" in capsys.readouterr().err
    assert not (refused / "out").exists()


SERVE = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
root = sys.argv[1]
out = {}
for name, case in json.load(open(f"{root}/cases.json")).items():
    llm = Llama(model_path=case["path"], n_ctx=1024, n_batch=512, n_threads=2, logits_all=True, verbose=False,
                type_k=0, type_v=0)  # an fp32 KV cache (llama.cpp keeps fp16 by default)
    greedy = []
    for prompt in case["prompts"]:
        llm.reset()
        tokens = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            tokens.append(int(token))
            if len(tokens) == 32:
                break
        greedy.append(tokens)
    llm.reset()
    window = case["window"]
    llm.eval(window)
    logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    out[name] = {"greedy": greedy, "logprobs": logprobs[np.arange(len(window) - 1), window[1:]].tolist()}
json.dump(out, open(f"{root}/served.json", "w"))
"""


def serve(root: Path, models: dict, prompts: list[list[int]], window: torch.Tensor) -> dict:
    """What llama.cpp computes from each model's gguf file (in `root/<name>`), and what transformers computes
    from the model in memory: greedy 32 tokens per prompt, next-token log-probabilities over `window`."""
    import subprocess
    import sys

    cases = {name: {"path": str(root / name / GGUF_FILE), "prompts": prompts, "window": window.tolist()}
             for name in models}
    (root / "cases.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, "-c", SERVE, str(root)], check=True, cwd=root)
    served = json.loads((root / "served.json").read_text())
    expected = {}
    with torch.no_grad():
        for name, model in models.items():
            greedy = [model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False,
                                     eos_token_id=None)[0, len(p):].tolist() for p in prompts]
            logprobs = torch.log_softmax(model(window[None]).logits[0, :-1].double(), -1)
            expected[name] = {"greedy": greedy, "logprobs": logprobs[range(len(window) - 1), window[1:]].tolist()}
    return {name: (served[name], expected[name]) for name in models}


@pytest.mark.llama_cpp
def test_llama_cpp_serves_every_layout_as_transformers_computes_it(tmp_path):
    """llama-cpp-python (built from source once; see README) loads each file: greedy tokens for 3 prompts x 32
    equal the in-memory pruned model's, and next-token log-probabilities agree within 1e-3 (fp32)."""
    pytest.importorskip("llama_cpp", reason="install llama-cpp-python (README: Serving engines)")
    prompts = [torch.randint(0, 259, (12,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(3)]
    models = {name: build(*CASES[name][:2]) for name in CASES}
    for name, model in models.items():
        export(model, tmp_path / name)
    window = torch.randint(0, 259, (64,), generator=torch.Generator().manual_seed(9))
    for name, (got, want) in serve(tmp_path, models, prompts, window).items():
        assert got["greedy"] == want["greedy"], name
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"])) < 1e-3, name


@pytest.mark.integration
@pytest.mark.llama_cpp
def test_the_pruned_demo_model_serves_in_llama_cpp(tmp_path):
    """SmolLM2-135M without a middle attention, a late MLP and a whole layer (llama.cpp's deci layout), with its
    own tokenizer: llama.cpp gives transformers' greedy 32 tokens on 3 prompts, and the same perplexity on 512
    held-out tokens of the encyclopedia."""
    from transformers import AutoTokenizer

    from tasks.sources import load_texts, resolve_model
    from tasks.surgery import load_model
    from tasks.windows import leading_windows, tokenize_stream

    pytest.importorskip("llama_cpp", reason="install llama-cpp-python (README: Serving engines)")
    source = resolve_model("builtin:smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model = remove_blocks(load_model(source.path), ["layers.12.attn", "layers.24.mlp", "layers.28"])
    path = tmp_path / "pruned"
    path.mkdir()
    tokenizer.save_pretrained(path)
    assert export_model(model, path, "gguf") == "gguf"
    prompts = [tokenizer(p).input_ids for p in ["The capital of France is", "def fibonacci(n):",
                                                 "Water boils at a temperature of"]]
    window = leading_windows(tokenize_stream(load_texts("builtin:wiki-vital-en", "evaluation")[:20], tokenizer),
                             512, 512)[0]
    got, want = serve(tmp_path, {"pruned": model}, prompts, window)["pruned"]
    assert got["greedy"] == want["greedy"]
    ppl = {k: float(np.exp(-np.mean(v["logprobs"]))) for k, v in (("served", got), ("transformers", want))}
    assert ppl["served"] == pytest.approx(ppl["transformers"], rel=1e-4), ppl


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_tensors_stay_half(dtype, tmp_path):
    model = build(*CASES["per_layer"][:2]).to(getattr(torch, dtype))
    path = export(model, tmp_path / dtype)
    reader = gguf.GGUFReader(str(path / GGUF_FILE))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.ffn_down.weight"] == {"float16": "F16", "bfloat16": "BF16"}[dtype]
    assert kinds["blk.0.attn_norm.weight"] == "F32"  # norms in fp32, as llama.cpp's converter writes them
    assert fields(path)["general.file_type"] == {"float16": 1, "bfloat16": 32}[dtype]
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path, dtype=dtype)(ids).logits, model(ids).logits)
