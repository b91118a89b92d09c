"""Export formats: every checkpoint reloads in a fresh process exactly as the in-memory pruned model runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.spec import PipelineSpec
from tasks.export import ExportError, checkpoint_format, export_model, load_checkpoint, resolve_format
from tasks.export.nemotron_nas import check_nemotron_nas, ffn_mult_for, weight_shapes
from tasks.prune import PruneError, prune_stage
from tasks.surgery import remove_blocks, save_model
from tasks.surgery.adapted import install_adapters
from tests.tiny import tiny_checkpoint, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 6
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16  # tests/tiny.py's config
MIXED = ["layers.1.attn", "layers.2", "layers.4.mlp", "layers.5.attn"]

# name: (family, blocks removed, format, kept attention layers)
CASES = {
    "hf": ("llama", ["layers.2", "layers.4"], "hf", 4),
    "remote_code": ("llama", MIXED, "remote_code", 3),
    # The first layer's attention gone: cache slot 0 then belongs to a later layer.
    "remote_code_qwen2": ("qwen2", ["layers.0.attn", *MIXED[1:]], "remote_code", 3),
    "nemotron_nas": ("llama", MIXED, "nemotron_nas", 3),
    "pruneflow": ("qwen2", MIXED, "pruneflow", 3),
    # Recovery adapters where a first layer, a lone MLP and a last layer were (before, in, after layers).
    "remote_code_adapters": ("llama", ["layers.0", "layers.2.mlp", "layers.5"], "remote_code", 4),
    "pruneflow_adapters": ("qwen2", ["layers.0", "layers.2.mlp", "layers.5"], "pruneflow", 4),
}
ADAPTER_RANKS = {"layers.0.attn": 3, "layers.0.mlp": 0, "layers.2.mlp": 2, "layers.5.attn": 0, "layers.5.mlp": 4}
# How transformers loads each format: plain, with trust_remote_code, or not at all (pruneflow reads it).
LOADING = {"hf": "plain", "remote_code": "remote", "nemotron_nas": "remote", "pruneflow": "refused"}

# Runs in a fresh interpreter: nothing of pruneflow's in-memory models, only the files.
FRESH = r"""
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from tasks.export import load_checkpoint
from tasks.speed import cache_bytes, cache_layers_filled
from tasks.surgery.kv_cache import output_cache

root = Path(sys.argv[1])
ids = torch.load(root / "ids.pt")
results = {}
for name, loading in json.loads((root / "cases.json").read_text()).items():
    path, ref = root / name, torch.load(root / f"{name}.logits.pt")
    refused = None
    if loading != "plain":  # without trust_remote_code transformers must refuse, not half-load
        try:
            AutoModelForCausalLM.from_pretrained(path)
            refused = False
        except (ValueError, OSError, KeyError):
            refused = True
    prompt = AutoTokenizer.from_pretrained(path)("pruned", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = load_checkpoint(path)(ids).logits
    results[name] = dict(refused_without_trust=refused, prompt_tokens=prompt.shape[1],
                         pruneflow_diff=(ours - ref).abs().max().item())
    if loading == "refused":
        continue
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=loading == "remote").eval()
    with torch.no_grad():
        out = model(ids, use_cache=True)
    kw = dict(max_new_tokens=10, do_sample=False)
    results[name].update(
        cls=type(model).__name__,
        logits_diff=(out.logits - ref).abs().max().item(),
        pruneflow_diff=(ours - ref).abs().max().item(),
        cache_layers=len(output_cache(out).layers),
        cache_filled=cache_layers_filled(output_cache(out)),
        cache_bytes=cache_bytes(output_cache(out)),
        cached=model.generate(ids[:1, :6], use_cache=True, **kw).tolist(),
        uncached=model.generate(ids[:1, :6], use_cache=False, **kw).tolist(),
    )
(root / "results.json").write_text(json.dumps(results))
"""


def _pruned(family: str, blocks: list[str], adapters: bool = False):
    model = tiny_model(family, layers=LAYERS)
    remove_blocks(model, blocks)
    if adapters:
        torch.manual_seed(3)
        with torch.no_grad():
            for param in install_adapters(model, ADAPTER_RANKS).parameters():
                param.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case exported with its tokenizer, reference logits and greedy output from the in-memory model."""
    root = tmp_path_factory.mktemp("exports")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save(ids, root / "ids.pt")
    greedy = {}
    for name, (family, blocks, fmt, _) in CASES.items():
        model = _pruned(family, blocks, adapters=name.endswith("_adapters"))
        assert export_model(model, root / name, fmt) == fmt
        tiny_tokenizer().save_pretrained(root / name)
        with torch.no_grad():
            torch.save(model(ids).logits, root / f"{name}.logits.pt")
            greedy[name] = model.generate(ids[:1, :6], max_new_tokens=10, do_sample=False, use_cache=False).tolist()
    (root / "cases.json").write_text(json.dumps({name: LOADING[fmt] for name, (_, _, fmt, _) in CASES.items()}))
    return root, greedy


@pytest.fixture(scope="module")
def fresh(exported, tmp_path_factory):
    root, _ = exported
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("hf-modules"))}
    out = subprocess.run([sys.executable, "-c", FRESH, str(root)], capture_output=True, text=True, cwd=ROOT,
                         env=env, stdin=subprocess.DEVNULL, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((root / "results.json").read_text())


SERVED = [name for name, case in CASES.items() if LOADING[case[2]] != "refused"]


@pytest.mark.parametrize("name", CASES)
def test_fresh_process_logits_equal_in_memory_model(fresh, name):
    assert fresh[name]["pruneflow_diff"] < 1e-5  # pruneflow's own reader, in the fresh process
    if name in SERVED:
        assert fresh[name]["logits_diff"] < 1e-5  # transformers' from_pretrained
    assert fresh[name]["prompt_tokens"] > 0  # the tokenizer travels with the checkpoint


@pytest.mark.parametrize("name", SERVED)
def test_greedy_generate_same_with_and_without_cache(fresh, exported, name):
    _, greedy = exported
    assert fresh[name]["cached"] == fresh[name]["uncached"] == greedy[name]


@pytest.mark.parametrize("name", SERVED)
def test_kv_cache_holds_kept_attention_only(fresh, name):
    kept_attention = CASES[name][3]
    result = fresh[name]
    assert result["cache_layers"] == result["cache_filled"] == kept_attention
    batch, seq, fp32 = 2, 12, 4
    assert result["cache_bytes"] == kept_attention * 2 * KV_HEADS * HEAD_DIM * batch * seq * fp32


def test_plain_loading_classes_and_refusal(fresh):
    assert fresh["hf"]["cls"] == "LlamaForCausalLM"
    assert fresh["remote_code"]["cls"] == "PrunedLlamaForCausalLM"
    assert fresh["remote_code_qwen2"]["cls"] == "PrunedQwen2ForCausalLM"
    assert fresh["nemotron_nas"]["cls"] == "DeciLMForCausalLM"
    # Without trust_remote_code a self-contained checkpoint is refused, never half-loaded with random blocks.
    assert all(fresh[n]["refused_without_trust"] for n in ("remote_code", "remote_code_qwen2", "nemotron_nas",
                                                          "pruneflow", "remote_code_adapters", "pruneflow_adapters"))


def test_adapters_travel_with_their_weights(exported):
    root, _ = exported
    config = json.loads((root / "remote_code_adapters" / "config.json").read_text())
    assert config["pruneflow"]["adapters"] == ADAPTER_RANKS
    shapes = weight_shapes(root / "remote_code_adapters")
    assert shapes["pruneflow_adapters.layers_0_attn.down.weight"] == (3, 64)
    assert shapes["pruneflow_adapters.layers_5_mlp.up.weight"] == (64, 4)
    assert "pruneflow_adapters.layers_0_mlp.down.weight" not in shapes  # rank 0: a bias alone
    assert (root / "remote_code_adapters" / "residual_adapters.py").is_file()


def test_remote_code_checkpoint_contents(exported):
    root, _ = exported
    path = root / "remote_code"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "pruneflow_llama"
    assert config["auto_map"] == {"AutoConfig": "configuration_pruned.PrunedLlamaConfig",
                                  "AutoModelForCausalLM": "modeling_pruned.PrunedLlamaForCausalLM"}
    assert config["pruneflow"]["removed"] == ["layers.1.attn", "layers.2.attn", "layers.2.mlp", "layers.4.mlp",
                                              "layers.5.attn"]
    assert config["pruneflow"]["layer_ids"] == [0, 1, 3, 4, 5]
    names = set(weight_shapes(path))
    # Positions 1 and 4 are original layers 1 and 5 (attention removed), position 3 is layer 4 (MLP removed).
    assert not any(n.startswith(("model.layers.1.self_attn", "model.layers.1.input_layernorm",
                                 "model.layers.4.self_attn", "model.layers.3.mlp",
                                 "model.layers.3.post_attention_layernorm")) for n in names)
    assert "model.layers.3.self_attn.q_proj.weight" in names and "model.layers.1.mlp.up_proj.weight" in names
    for code in ("configuration_pruned.py", "modeling_pruned.py"):
        assert len((path / code).read_text().splitlines()) < 150  # small enough to read


def test_nemotron_nas_follows_the_format_rules(exported, tmp_path):
    root, _ = exported
    path = root / "nemotron_nas"
    assert check_nemotron_nas(path) == []
    config = json.loads((path / "config.json").read_text())
    blocks = config["block_configs"]
    assert len(blocks) == config["num_hidden_layers"] == 5
    assert [b["attention"]["no_op"] for b in blocks] == [False, True, False, False, True]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, False, False, True, False]
    assert {b["attention"]["n_heads_in_group"] for b in blocks if not b["attention"]["no_op"]} == {HEADS // KV_HEADS}
    # 96 is no DeciLM ffn_mult size (multiples of 256), so the size is explicit.
    assert {b["ffn"].get("intermediate_size") for b in blocks if not b["ffn"]["no_op"]} == {96}
    names = set(weight_shapes(path))
    for i, block in enumerate(blocks):
        has_attn = any(n.startswith(f"model.layers.{i}.self_attn.") for n in names)
        has_ffn = any(n.startswith(f"model.layers.{i}.mlp.") for n in names)
        assert has_attn != block["attention"]["no_op"] and has_ffn != block["ffn"]["no_op"]
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # for readers before rope_parameters

    def broken(edit) -> list[str]:
        copy = tmp_path / "broken"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(path, copy)
        changed = json.loads((copy / "config.json").read_text())
        edit(changed)
        (copy / "config.json").write_text(json.dumps(changed))
        return check_nemotron_nas(copy)

    assert any("entries" in p for p in broken(lambda c: c["block_configs"].pop()))
    assert any("does not divide" in p for p in broken(lambda c: c["block_configs"][0]["attention"].update(n_heads_in_group=3)))
    assert any("does not allow" in p for p in broken(lambda c: c["block_configs"][0]["attention"].update(no_op=True)))
    assert any("exactly one" in p for p in broken(lambda c: c["block_configs"][0]["ffn"].update(ffn_mult=1.5)))
    assert any("shape" in p for p in broken(lambda c: c["block_configs"][2]["attention"].update(n_heads_in_group=1)))


def test_ffn_mult_only_when_deciLM_rule_is_exact():
    assert ffn_mult_for(1536, 576) == 4.0  # SmolLM2-135M
    assert ffn_mult_for(14336, 4096) == 5.25  # Llama-3-8B
    assert ffn_mult_for(96, 64) is None


def test_format_choice_and_refusals():
    whole = _pruned("llama", ["layers.1"])
    mixed = _pruned("llama", MIXED)
    assert resolve_format("auto", whole) == "hf"
    assert resolve_format("auto", mixed) == "remote_code"
    with pytest.raises(ExportError, match=r"cannot express removed halves \['layers.1.attn'"):
        resolve_format("hf", mixed)
    with pytest.raises(ExportError, match="model_type 'qwen2' needs format 'remote_code'"):
        resolve_format("nemotron_nas", _pruned("qwen2", MIXED))
    with pytest.raises(ExportError, match=r"first kept layer \(layers.0\) has no attention"):
        resolve_format("nemotron_nas", _pruned("llama", ["layers.0.attn"]))
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        resolve_format("onnx", whole)
    adapted = _pruned("llama", ["layers.0", "layers.2.mlp", "layers.5"], adapters=True)
    assert resolve_format("auto", adapted) == "remote_code"
    with pytest.raises(ExportError, match="format 'nemotron_nas' has no place for the recovery adapters"):
        resolve_format("nemotron_nas", adapted)
    whole_adapted = _pruned("llama", ["layers.0", "layers.5"])
    install_adapters(whole_adapted, {"layers.0.attn": 2, "layers.5.mlp": 0})
    assert resolve_format("auto", whole_adapted) == "remote_code"
    with pytest.raises(ExportError, match=r"format 'hf' has no place for the recovery adapters of \['layers.0.attn'"):
        resolve_format("hf", whole_adapted)


def test_auto_falls_back_to_pruneflow_without_a_modeling_template(monkeypatch):
    # An architecture adapter (a plugin's, say) for a model_type that transformers has no causal LM class for.
    from transformers.models.auto import modeling_auto

    mixed, whole = _pruned("qwen2", MIXED), _pruned("qwen2", ["layers.1"])
    monkeypatch.delitem(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "qwen2")
    assert resolve_format("auto", mixed) == "pruneflow"
    assert resolve_format("auto", whole) == "hf"
    with pytest.raises(ExportError, match="no modeling template for model_type 'qwen2'"):
        resolve_format("remote_code", mixed)


def test_legacy_interim_checkpoints_still_load(tmp_path):
    model = _pruned("llama", MIXED)
    save_model(model, None, tmp_path / "old")  # pruneflow's interim format: llama config + stand-ins
    assert checkpoint_format(tmp_path / "old") == "hf"
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert (load_checkpoint(tmp_path / "old")(ids).logits - model(ids).logits).abs().max() < 1e-5


def _prune(source: Path, out: Path, fmt: str):
    """prune_stage as the flow calls it, with the sections of a validated pipeline."""
    spec = PipelineSpec.model_validate({
        "name": "export", "model": {"source": str(source)}, "search": {"target": {"blocks": 1}},
        "output_dir": str(out.parent / "out"), "prune": {"format": fmt},
    })
    return prune_stage(str(source), tuple(MIXED), spec.model, spec.prune, out)


def test_prune_stage_writes_the_chosen_format(tmp_path):
    source = tiny_checkpoint(tmp_path / "model")
    ref = _prune(source, tmp_path / "run", "auto")
    assert ref.kind == "checkpoint" and len(ref.sha256) == 64 and ref.bytes > 0
    target = Path(ref.path)
    assert checkpoint_format(target) == "remote_code"
    assert (target / "tokenizer.json").is_file() and (target / "generation_config.json").is_file()
    nemotron = _prune(source, tmp_path / "n", "nemotron_nas")
    assert checkpoint_format(nemotron.path) == "nemotron_nas"
    with pytest.raises(PruneError, match="format 'hf'"):
        _prune(source, tmp_path / "h", "hf")


def test_speed_rows_of_served_checkpoints(exported):
    from tasks.speed_stage import SpeedSettings, speed_stage

    root, _ = exported
    settings = SpeedSettings(prefill_tokens=8, prefill_batches=(1, 2), decode_prompt=4, decode_tokens=4, rounds=1)
    # The `pruneflow` format has no runtime outside pruneflow: no speed rows; without dense, no ratios.
    rows = speed_stage({"pruned": str(root / "remote_code"), "recovered": str(root / "pruneflow")}, "float32", "cpu",
                       settings=settings)
    rates = {("speed", "batch1x8", "prefill_tokens_per_s"), ("speed", "batch2x8", "prefill_tokens_per_s"),
             ("speed", "batch1x4", "decode_tokens_per_s")}
    spreads = {(kind, workload, f"{metric}_spread") for kind, workload, metric in rates}
    assert {(r.kind, r.dataset, r.metric) for r in rows} == rates | spreads | {("speed", "-", "kv_bytes_per_token")}
    assert all(r.stage == "pruned" for r in rows)
    assert all(r.value > 0 for r in rows if not r.metric.endswith("_spread"))
    assert all(r.value >= 0 for r in rows if r.metric.endswith("_spread"))
    kv = next(r.value for r in rows if r.metric == "kv_bytes_per_token")
    assert kv == 3 * 2 * KV_HEADS * HEAD_DIM * 4  # three kept attention layers, fp32 keys and values


def test_reading_a_tokenizer_never_asks_to_run_code(exported):
    """transformers asks on the terminal before running a checkpoint's code; pruneflow trusts only its own."""
    root, _ = exported
    code = ("import sys; from tasks.export import load_tokenizer; "
            "print(type(load_tokenizer(sys.argv[1])).__name__)")
    for name in ("remote_code", "nemotron_nas", "pruneflow", "hf"):
        out = subprocess.run([sys.executable, "-c", code, str(root / name)], capture_output=True, text=True,
                             cwd=ROOT, stdin=subprocess.DEVNULL, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        assert "Do you wish to run the custom code" not in out.stdout + out.stderr
