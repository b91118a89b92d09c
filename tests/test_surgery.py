import subprocess
import sys

import pytest
import torch

from tasks.residual import ResidualRunner, perplexity
from tasks.surgery import (
    architecture_for,
    block_param_counts,
    candidate_blocks,
    load_model,
    parse_block,
    remove_blocks,
    save_model,
    total_params,
)
from tasks.surgery.architecture import UnsupportedArchitecture
from tests.tiny import tiny_model, tiny_windows


def test_block_ids_parse_and_reject():
    assert parse_block("layers.12").id == "layers.12"
    assert parse_block("layers.3.attn").units() == ("layers.3.attn",)
    assert parse_block("layers.3").units() == ("layers.3.attn", "layers.3.mlp")
    with pytest.raises(ValueError, match="expected layers.N"):
        parse_block("layer.3.attention")


def test_candidates_by_granularity():
    ids = [0, 1, 2]
    assert candidate_blocks(ids, "layer", set()) == ["layers.0", "layers.1", "layers.2"]
    assert candidate_blocks(ids, "attn", {"layers.1.attn"}) == ["layers.0.attn", "layers.2.attn"]
    assert candidate_blocks(ids, "sublayer", {"layers.0.mlp"}) == [
        "layers.0.attn", "layers.1.attn", "layers.1.mlp", "layers.2.attn", "layers.2.mlp"]
    # A layer that lost a half is no longer a whole-layer candidate.
    assert candidate_blocks(ids, "layer", {"layers.0.mlp"}) == ["layers.1", "layers.2"]


def test_param_counts_add_up(family):
    model = tiny_model(family)
    counts = block_param_counts(model)
    assert len(counts) == 8
    rest = sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n)
    assert sum(counts.values()) + rest == total_params(model)
    layer0 = model.model.layers[0]
    expected_attn = sum(p.numel() for p in layer0.self_attn.parameters()) + layer0.input_layernorm.weight.numel()
    assert counts["layers.0.attn"] == expected_attn


@pytest.mark.parametrize("blocks", [["layers.1"], ["layers.2.attn"], ["layers.0.mlp", "layers.3.attn"],
                                    ["layers.1.attn", "layers.1.mlp", "layers.2.mlp"]])
def test_skipping_equals_deleting(family, blocks):
    model = tiny_model(family)
    windows = tiny_windows()
    skipped_units = sorted({u for b in blocks for u in parse_block(b).units()})
    skipped = ResidualRunner(model).nll(windows, skip=skipped_units)
    remove_blocks(model, blocks)
    deleted = ResidualRunner(model).nll(windows)
    torch.testing.assert_close(skipped, deleted, rtol=0, atol=1e-9)
    # Hugging Face's own forward of the edited model agrees with the residual runner.
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    hf = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1),
                                           reduction="none").view(windows.shape[0], -1).sum(1).double()
    torch.testing.assert_close(hf, deleted, rtol=1e-5, atol=1e-3)


def test_whole_layer_removal_shrinks_config():
    model = tiny_model("llama")
    before = total_params(model)
    counts = block_param_counts(model)
    remove_blocks(model, ["layers.1", "layers.2.attn", "layers.2.mlp"])
    assert model.config.num_hidden_layers == 2
    assert model.config.pruneflow["layer_ids"] == [0, 3]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    removed = sum(v for k, v in counts.items() if k.startswith(("layers.1.", "layers.2.")))
    assert total_params(model) == before - removed


def test_removed_half_has_no_weights():
    model = tiny_model("llama")
    remove_blocks(model, ["layers.2.attn"])
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("model.layers.2.self_attn") or n.startswith("model.layers.2.input_layernorm")
                   for n in names)
    assert any(n.startswith("model.layers.2.mlp") for n in names)


def test_save_reload_fresh_process(tmp_path):
    model = tiny_model("qwen2")
    windows = tiny_windows()
    remove_blocks(model, ["layers.0", "layers.2.mlp"])
    expected = perplexity(model, windows)
    save_model(model, None, tmp_path / "ckpt")
    torch.save(windows, tmp_path / "windows.pt")
    code = (
        "import sys, torch; from tasks.surgery import load_model; from tasks.residual import perplexity; "
        f"m = load_model(r'{tmp_path / 'ckpt'}'); w = torch.load(r'{tmp_path / 'windows.pt'}'); "
        "print(repr(perplexity(m, w)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-9)
    reloaded = load_model(tmp_path / "ckpt")
    assert reloaded.config.num_hidden_layers == 3


def test_whole_layers_only_is_a_standard_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    windows = tiny_windows()
    remove_blocks(model, ["layers.0", "layers.3"])
    save_model(model, None, tmp_path / "ckpt")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(windows).logits, model(windows).logits)


def test_unknown_architecture_names_supported_ones():
    with pytest.raises(UnsupportedArchitecture, match="did you mean 'llama'.*supported: .*llama, mistral"):
        architecture_for("lama")
