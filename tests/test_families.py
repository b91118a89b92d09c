"""Every supported decoder family, each as a tiny random model built from its config (no download).

Per family: blocks and parameter counts add up, skipping a block equals deleting it (and the family's own
forward of the edited model agrees), the search picks what a brute-force search picks, a removed
attention keeps cached generation exact, and pruned checkpoints reload identically in a fresh process.
Three families with the most unusual layouts also go through the real Prefect flow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM

from tasks.residual import ResidualRunner, perplexity
from tasks.score.vocab_bound import VocabBound
from tasks.search import Target, run_search
from tests.searchkit import search_context
from tasks.surgery import (
    architecture_for,
    architecture_of,
    block_param_counts,
    candidate_blocks,
    layer_ids,
    remove_blocks,
    save_model,
    supported_model_types,
    total_params,
    units_of,
)
from tasks.export import export_model
from tasks.surgery.adapted import install_adapters
from tasks.surgery.architecture import UnsupportedArchitecture
from tests.tiny import VOCAB, tiny_corpus, tiny_tokenizer, tiny_windows

LAYERS = 4
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
ROTARY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **TOKENS)
# Windows are 32 tokens: a sliding window of 8 makes the local masks differ from the causal one.
WINDOW = 8

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**ROTARY),
    "mistral": lambda: tf.MistralConfig(**ROTARY, sliding_window=WINDOW),
    "qwen2": lambda: tf.Qwen2Config(**ROTARY, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "qwen3": lambda: tf.Qwen3Config(**ROTARY, head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
                                    max_window_layers=1),
    "gemma2": lambda: tf.Gemma2Config(**ROTARY, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**ROTARY, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                               sliding_window_pattern=2, final_logit_softcapping=30.0),
    "phi3": lambda: tf.Phi3Config(**ROTARY, sliding_window=WINDOW),
    "olmo2": lambda: tf.Olmo2Config(**ROTARY),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=256,
                                  tie_word_embeddings=False, **TOKENS),
    "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=LAYERS,
                                num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                                tie_word_embeddings=False, **TOKENS),
    # OPT-350m's layout: post-norm layers, embeddings projected in and out of a narrower width.
    "opt-postnorm": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=LAYERS,
                                         num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32,
                                         do_layer_norm_before=False, tie_word_embeddings=False, **TOKENS),
    "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=256,
                                         use_parallel_residual=True, tie_word_embeddings=False, **TOKENS),
    "gpt_neox-sequential": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                                    num_hidden_layers=LAYERS, num_attention_heads=4,
                                                    max_position_embeddings=256, use_parallel_residual=False,
                                                    tie_word_embeddings=False, **TOKENS),
    "mixtral": lambda: tf.MixtralConfig(**ROTARY, num_local_experts=4, num_experts_per_tok=2),
    # Sparse MoE blocks on layers 1 and 3, dense MLPs on 0 and 2: deleting layer 0 must keep that pattern.
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**ROTARY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=48, decoder_sparse_step=2),
}
FAMILIES = sorted(CONFIGS)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models spend their time in thread hand-offs; one thread is several times faster on shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(family: str, seed: int = 0) -> torch.nn.Module:
    config = CONFIGS[family]()
    torch.manual_seed(seed)
    implementation = architecture_for(config.model_type).attn_implementation
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    # Random init gives near-identical blocks; scale weights so blocks differ clearly in importance.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name and ".wte." not in name and ".wpe." not in name:
                param.mul_(1.0 + torch.rand(()) * 4.0)
    return model.eval()


def hf_nll(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Per-window NLL sums from the family's own Hugging Face forward."""
    with torch.no_grad():
        logits = model(windows).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1),
                                            reduction="none")
    return nll.view(windows.shape[0], -1).sum(1).double()


def test_every_family_has_an_adapter():
    families = {CONFIGS[f]().model_type for f in FAMILIES}
    assert families <= set(supported_model_types())
    for model_type in families:
        formats = architecture_for(model_type).export_formats
        assert {"hf", "pruneflow", "remote_code"} <= set(formats)
        assert ("nemotron_nas" in formats) == (model_type in ("llama", "mistral", "qwen2", "qwen3"))


def test_unknown_model_type_lists_families_and_points_at_registry():
    with pytest.raises(UnsupportedArchitecture) as info:
        architecture_for("gpt_neo")
    message = str(info.value)
    assert "did you mean 'gpt_neox'" in message
    assert f"supported: {', '.join(supported_model_types())}." in message
    assert "tasks/surgery/" in message and "@register_architecture" in message


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_and_parameters_add_up(family):
    model = build(family)
    adapter = architecture_of(model)
    counts = block_param_counts(model)
    assert list(counts) == [f"layers.{i}.{part}" for i in range(LAYERS) for part in ("attn", "mlp")]
    layers = adapter.decoder_layers(model)
    for i, layer in enumerate(layers):
        # The two halves account for every parameter of the layer, nothing twice.
        assert counts[f"layers.{i}.attn"] + counts[f"layers.{i}.mlp"] == sum(p.numel() for p in layer.parameters())
        assert counts[f"layers.{i}.attn"] > 0 and counts[f"layers.{i}.mlp"] > 0
    in_layers = {id(p) for p in layers.parameters()}
    outside = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in in_layers)
    assert sum(counts.values()) + outside == total_params(model)
    # The residual runner reproduces the family's own forward of the dense model.
    windows = tiny_windows()
    torch.testing.assert_close(ResidualRunner(model).nll(windows), hf_nll(model, windows), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("blocks", [["layers.0"], ["layers.1.attn", "layers.2.mlp"],
                                    ["layers.0.attn", "layers.1", "layers.3.mlp"]])
@pytest.mark.parametrize("family", FAMILIES)
def test_skipping_equals_deleting(family, blocks):
    model = build(family)
    windows = tiny_windows()
    skipped = ResidualRunner(model).nll(windows, skip=sorted(units_of(blocks)))
    counts, before = block_param_counts(model), total_params(model)
    remove_blocks(model, blocks)
    assert total_params(model) == before - sum(counts[u] for u in units_of(blocks))
    deleted = ResidualRunner(model).nll(windows)
    torch.testing.assert_close(skipped, deleted, rtol=0, atol=1e-9)
    torch.testing.assert_close(hf_nll(model, windows), deleted, rtol=1e-5, atol=1e-3)


def test_gpt2_refuses_deletions_that_rescale_later_attention():
    config = CONFIGS["gpt2"]()
    config.scale_attn_by_inverse_layer_idx = True
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        remove_blocks(model, ["layers.1"])
    assert len(model.transformer.h) == LAYERS and "pruneflow" not in model.config.to_dict()
    # The last layer and lone halves leave every other layer's index alone.
    remove_blocks(model, ["layers.3", "layers.1.attn"])
    assert layer_ids(model) == [0, 1, 2]


def brute_force(model, windows, steps: int) -> list[str]:
    removed: list[str] = []
    for _ in range(steps):
        candidates = candidate_blocks(layer_ids(model), "sublayer", units_of(removed))
        ppl = {c: perplexity(model, windows, 1, skip=sorted(units_of([*removed, c]))) for c in candidates}
        removed.append(min(candidates, key=lambda c: (ppl[c], candidates.index(c))))
    return removed


@pytest.mark.parametrize("family", FAMILIES)
def test_search_matches_brute_force(family):
    model, windows = build(family), tiny_windows(samples=2, seq_len=24)
    ctx = search_context(model, windows, metric="perplexity", granularity="sublayer", target=Target(blocks=3))
    assert [r.block for r in run_search(ctx, "iterative")] == brute_force(model, windows, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_survives_removed_attention(family):
    # Layer 0's attention is the one transformers reads the cached length from.
    model = build(family)
    remove_blocks(model, ["layers.0.attn", "layers.2"])
    prompt = tiny_windows(samples=2, seq_len=8, seed=3)
    prompt[0, :3] = 0  # left padding on one row: mask sizes and positions must come from the cache
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                    output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **settings)
        plain = model.generate(prompt, use_cache=False, **settings)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.scores, plain.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from tasks.residual import ResidualRunner
from tasks.surgery import architecture_for, load_model
root = sys.argv[1]
torch.set_num_threads(int(sys.argv[2]))
windows = torch.load(f"{root}/windows.pt")
out = {}
for name in json.load(open(f"{root}/cases.json")):
    if name.endswith("-remote_code"):
        # Transformers alone, running the checkpoint's own code (stand-ins and recovery adapters).
        kernel = architecture_for(json.load(open(f"{root}/{name}/config.json"))["pruneflow"]["base_model_type"]).attn_implementation
        model = AutoModelForCausalLM.from_pretrained(f"{root}/{name}", trust_remote_code=True,
                                                     attn_implementation=kernel).eval()
        with torch.no_grad():
            out[name] = {"logits": model(windows).logits}
        continue
    model = load_model(f"{root}/{name}")
    with torch.no_grad():
        out[name] = {"logits": model(windows).logits, "nll": ResidualRunner(model).nll(windows)}
    if name.endswith("-hf"):
        # The family's attention kernel, as pruneflow uses it: releases differ in their default (Gemma 2:
        # SDPA before 5.24, eager after), which moves logits in the last bits, not the checkpoint.
        kernel = architecture_for(model.config.model_type).attn_implementation
        plain = AutoModelForCausalLM.from_pretrained(f"{root}/{name}", attn_implementation=kernel).eval()
        with torch.no_grad():
            out[name]["plain"] = plain(windows).logits
torch.save(out, f"{root}/reloaded.pt")
"""


def test_save_reload_in_a_fresh_process(tmp_path):
    windows = tiny_windows()
    torch.save(windows, tmp_path / "windows.pt")
    cuts = {"hf": ["layers.0", "layers.2"], "pruneflow": ["layers.0", "layers.1.attn", "layers.3.mlp"],
            "remote_code": ["layers.0", "layers.1.attn", "layers.3"]}
    expected = {}
    for family in FAMILIES:
        for fmt, blocks in cuts.items():
            model = remove_blocks(build(family), blocks)
            name = f"{family}-{fmt}"
            if fmt == "remote_code":
                # Recovery adapters before the first kept layer, in a removed half's slot, after the last layer.
                torch.manual_seed(5)
                with torch.no_grad():
                    for param in install_adapters(model, {u: 2 for u in units_of(blocks)}).parameters():
                        param.normal_(0.0, 0.2)
                export_model(model, tmp_path / name, "remote_code")
            else:
                save_model(model, None, tmp_path / name)
            with torch.no_grad():
                expected[name] = {"logits": model(windows).logits, "nll": ResidualRunner(model).nll(windows)}
    (tmp_path / "cases.json").write_text(json.dumps(sorted(expected)))
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path), str(torch.get_num_threads())],
                          cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    reloaded = torch.load(tmp_path / "reloaded.pt")
    for name, want in expected.items():
        got = reloaded[name]
        if name.endswith("-remote_code"):
            torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=1e-5, msg=name)
            continue
        torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(got["nll"], want["nll"], rtol=0, atol=0, msg=name)
        if name.endswith("-hf"):
            # Whole layers only: a standard checkpoint of the original architecture.
            torch.testing.assert_close(got["plain"], want["logits"], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", ["gpt_neox", "gemma3_text", "qwen2_moe"])
def test_two_step_search_through_the_flow(family, tmp_path):
    # Sublayer search, so the checkpoint carries its own code; tests/test_family_cli.py runs every family
    # through the command line, with whole-layer searches too.
    from flows import prune_pipeline
    from tasks.export import load_checkpoint
    from tests.flowkit import tiny_pipeline

    build(family).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    tiny_corpus(tmp_path / "corpus.txt")
    path = tiny_pipeline(tmp_path, name=f"tiny-{family.replace('_', '-')}",
                         score={"granularity": "sublayer"}, search={"target": {"blocks": 2}})
    summary = prune_pipeline(path)
    assert len(summary["blocks"]) == 2
    kernel = architecture_for(CONFIGS[family]().model_type).attn_implementation
    pruned = AutoModelForCausalLM.from_pretrained(summary["checkpoint"], trust_remote_code=True,
                                                  attn_implementation=kernel).eval()
    ours = load_checkpoint(summary["checkpoint"])
    assert total_params(pruned) == summary["params_pruned"] == total_params(ours)
    windows = tiny_windows()
    with torch.no_grad():
        torch.testing.assert_close(pruned(windows).logits, ours(windows).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_vocabulary_bound_stays_under_the_exact_nll(family):
    """The subset bound of tasks.score.vocab_bound: below the exact NLL for any rows (targets inside or
    outside them), and equal to it up to its margin when the rows are the whole vocabulary. Covers each
    family's head: Gemma's soft cap, OPT's projection out, biases."""
    model, windows = build(family), tiny_windows(samples=3)
    runner = ResidualRunner(model)
    with torch.no_grad():
        hidden = runner.embed(windows)
        hidden = runner.run(hidden, runner.context(hidden), runner.units)
        exact = runner.window_nll(hidden, windows)
        generator = torch.Generator().manual_seed(0)
        for count in (1, 9, VOCAB // 2):
            rows = torch.randperm(VOCAB, generator=generator)[:count].sort().values
            bound = VocabBound(runner.adapter, model, rows).window_bounds(hidden, windows)
            assert (bound <= exact).all(), (count, bound, exact)
            assert (bound > 0).all()
        whole = VocabBound(runner.adapter, model, torch.arange(VOCAB)).window_bounds(hidden, windows)
    assert (whole <= exact).all()
    assert torch.allclose(whole, exact, rtol=1e-4)
