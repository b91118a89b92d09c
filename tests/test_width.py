"""Width surgery on every family that has heads and channels: slicing a plan equals masking its units."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tasks.surgery import remove_blocks, total_params
from tasks.surgery.width import LayerWidth, WidthError, WidthPlan, apply_width, is_uniform, layer_shapes, mask_width
from tests.test_families import CONFIGS
from tests.tiny import tiny_windows

WIDTH_FAMILIES = ["gemma2", "gemma3_text", "llama", "mistral", "olmo2", "qwen2", "qwen3"]
HEADS_FAMILIES = [f for f in WIDTH_FAMILIES if f != "olmo2"]


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # random norms and biases, so that no unit is interchangeable with another
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.normal_(0.5, 0.2)
    return model


def per_layer_plan(heads: bool) -> WidthPlan:
    """Different widths per layer: 4 query heads over 2 KV heads (groups of 2), 96 MLP channels."""
    layers = {
        0: LayerWidth(channels=tuple(range(0, 96, 2)), **({"heads": (1, 3), "kv_heads": (0, 1)} if heads else {})),
        1: LayerWidth(channels=tuple(range(40)), **({"heads": (2, 3), "kv_heads": (1,)} if heads else {})),
        3: LayerWidth(channels=(5, 17, 90)),
    }
    return WidthPlan(layers=layers)


def uniform_plan(layers=range(4)) -> WidthPlan:
    return WidthPlan(layers={lid: LayerWidth(heads=(0, 3), kv_heads=(0, 1), channels=tuple(range(7, 71)))
                             for lid in layers})


def logits(model, windows):
    with torch.no_grad():
        return model(windows).logits


@pytest.mark.parametrize("family", WIDTH_FAMILIES)
def test_slicing_a_plan_equals_masking_its_units(family):
    windows = tiny_windows(samples=2, seq_len=32)
    plan = per_layer_plan(heads=family in HEADS_FAMILIES)
    masked = logits(mask_width(build(family), plan), windows)
    dense = build(family)
    before = total_params(dense)
    sliced = apply_width(dense, plan)
    assert torch.allclose(logits(sliced, windows), masked, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(build(family), windows), masked, atol=1e-3)  # the plan changed something
    shapes = layer_shapes(sliced)
    assert shapes[1]["channels"] == 40 and shapes[3]["channels"] == 3 and shapes[2]["channels"] == 96
    if family in HEADS_FAMILIES:
        assert (shapes[1]["heads"], shapes[1]["kv_heads"]) == (2, 1)
        assert (shapes[0]["heads"], shapes[0]["kv_heads"]) == (2, 2)
    assert total_params(sliced) < before
    assert sliced.config.pruneflow["plan"]["layers"]["1"]["channels"] == list(range(40))
    assert not is_uniform(sliced)


@pytest.mark.parametrize("family", HEADS_FAMILIES)
def test_a_uniform_plan_is_a_standard_checkpoint(family, tmp_path):
    windows = tiny_windows(samples=2, seq_len=32)
    model = apply_width(build(family), uniform_plan())
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 2, 64)
    assert config.head_dim == 16  # written out: hidden_size // heads is 32 now
    assert is_uniform(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.allclose(logits(reloaded, windows), logits(model, windows), atol=1e-5, rtol=0)


def test_depth_then_width_keeps_original_ids():
    windows = tiny_windows(samples=2, seq_len=32)
    model = remove_blocks(build("llama"), ["layers.1", "layers.2.attn"])
    plan = WidthPlan(layers={0: LayerWidth(channels=(0, 1, 2)), 2: LayerWidth(channels=tuple(range(50))),
                             3: LayerWidth(heads=(0, 1), kv_heads=(0,))})
    masked = logits(mask_width(remove_blocks(build("llama"), ["layers.1", "layers.2.attn"]), plan), windows)
    sliced = apply_width(model, plan)
    assert torch.allclose(logits(sliced, windows), masked, atol=1e-5, rtol=0)
    assert set(layer_shapes(sliced)) == {0, 2, 3}
    assert layer_shapes(sliced)[2] == {"heads": 0, "kv_heads": 0, "channels": 50}


@pytest.mark.parametrize("layer, message", [
    (LayerWidth(heads=(0, 1, 2), kv_heads=(0, 1)), "same number"),
    (LayerWidth(heads=(0, 2), kv_heads=(0,)), "read KV heads the plan removes"),
    (LayerWidth(channels=(3, 96)), "index 96 is beyond the model's 96 channels"),
])
def test_bad_plans_are_refused_before_anything_changes(layer, message):
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WidthError, match=message):
        apply_width(model, WidthPlan(layers={0: layer}))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_families_without_width_are_refused_by_name():
    with pytest.raises(WidthError, match="model_type 'phi3' cannot be pruned in width.*llama"):
        apply_width(build("phi3"), WidthPlan(layers={0: LayerWidth(channels=(1,))}))
    with pytest.raises(WidthError, match="olmo2.*prune MLP channels only"):
        apply_width(build("olmo2"), WidthPlan(layers={0: LayerWidth(heads=(0, 1), kv_heads=(0,))}))
    with pytest.raises(ValueError, match="increasing order"):
        LayerWidth(channels=(3, 1))
    with pytest.raises(WidthError, match="already width-pruned"):
        apply_width(apply_width(build("llama"), uniform_plan()), uniform_plan())


RELOAD_REMOTE = """
import sys, torch
from transformers import AutoModelForCausalLM
# The kernel the model was built with (Gemma 2 defaults to SDPA before transformers 5.24).
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, attn_implementation="eager").eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits
    cached = model.generate(ids[:, :8], max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(ids[:, :8], max_new_tokens=6, do_sample=False, use_cache=False)
torch.save({"logits": logits, "cached": cached, "uncached": uncached}, sys.argv[3])
"""


@pytest.mark.parametrize("family", WIDTH_FAMILIES)
def test_per_layer_widths_and_removed_halves_export_with_their_code(family, tmp_path):
    """Different widths per layer and a removed attention: remote_code carries them, a fresh process loads them
    with transformers alone (logits within 1e-5, cached generation equal to uncached), and pruneflow reads
    the same model back."""
    import subprocess
    import sys

    from tasks.export import export_model, load_checkpoint

    windows = tiny_windows(samples=2, seq_len=24)
    model = apply_width(remove_blocks(build(family), ["layers.2.attn"]), per_layer_plan(heads=family in HEADS_FAMILIES))
    assert export_model(model, tmp_path / "ckpt", "auto") == "remote_code"
    torch.save(windows, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", RELOAD_REMOTE, str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], check=True, cwd=tmp_path)
    out = torch.load(tmp_path / "out.pt")
    expected = logits(model, windows)
    assert torch.allclose(out["logits"], expected, atol=1e-5, rtol=0)
    assert torch.equal(out["cached"], out["uncached"])
    again = load_checkpoint(tmp_path / "ckpt")
    assert torch.allclose(logits(again, windows), expected, atol=1e-5, rtol=0)
    assert layer_shapes(again) == layer_shapes(model)


def test_per_layer_ranks_units_across_layers_with_a_floor_and_protections():
    from tasks.width import UnitScores, WidthShape, per_layer_plan, uniform_plan

    model = build("llama")
    # Layer 1's channels and heads matter ten times more than layer 2's; layer 0 and 3 in between.
    base = torch.linspace(1.0, 2.0, 96)
    scores = UnitScores(channels={0: base * 3, 1: base * 10, 2: base, 3: base * 3},
                        heads={0: torch.tensor([3.0, 2, 1, 4]), 1: torch.tensor([30.0, 20, 10, 40]),
                               2: torch.tensor([0.3, 0.2, 0.1, 0.4]), 3: torch.tensor([3.0, 2, 1, 4])})
    shape = WidthShape(intermediate_size=48, num_key_value_heads=1)
    plan = per_layer_plan(model, scores, shape, floor=0.25, protect_first=1)
    assert 0 not in plan.layers  # protected: full width
    kept = {lid: len(plan.layers[lid].channels) for lid in (1, 2, 3)}
    assert sum(kept.values()) == 48 * 3 and kept[1] == 96 and kept[2] == 24  # the floor: a quarter of 96
    assert kept[3] == 48 * 3 - 96 - 24
    assert plan.layers[2].channels == tuple(range(72, 96))  # its best ones
    groups = {lid: plan.layers[lid].kv_heads for lid in (1, 2, 3)}
    assert sum(len(g) for g in groups.values()) == 3 and all(len(g) >= 1 for g in groups.values())
    assert plan.layers[1].heads == (2, 3) or plan.layers[1].heads == (0, 1)  # whole groups of 2 heads
    assert plan != uniform_plan(model, scores, shape)
    # Applied, it is a model whose layers differ, equal to masking the same units.
    windows = tiny_windows(samples=2, seq_len=16)
    masked = logits(mask_width(build("llama"), plan), windows)
    assert torch.allclose(logits(apply_width(model, plan), windows), masked, atol=1e-5, rtol=0)
    assert not is_uniform(model)


def test_nemotron_nas_carries_per_layer_ffn_widths_in_multiples_of_256(tmp_path):
    """DeciLM blocks: each FFN's width from ffn_mult (vLLM's and llama.cpp's rule), the query heads fixed."""
    import json
    import subprocess
    import sys

    from tasks.export import ExportError, export_model, load_checkpoint
    from tasks.export.nemotron_nas import check_nemotron_nas

    def wide():  # SmolLM2-like: an FFN width of a multiple of 256 (a fresh config: pruning writes into it)
        config = CONFIGS["llama"]()
        config.intermediate_size = 1024
        return AutoModelForCausalLM.from_config(config).eval()

    torch.manual_seed(0)
    model = wide()
    plan = WidthPlan(layers={0: LayerWidth(channels=tuple(range(0, 1024, 2))), 2: LayerWidth(channels=tuple(range(256)))})
    apply_width(model, plan)
    written = tmp_path / "nas"
    assert export_model(model, written, "nemotron_nas") == "nemotron_nas"
    assert check_nemotron_nas(written) == []
    blocks = json.loads((written / "config.json").read_text())["block_configs"]
    from tasks.export.templates.configuration_decilm import ffn_mult_to_intermediate_size
    assert [ffn_mult_to_intermediate_size(b["ffn"]["ffn_mult"], 64) for b in blocks] == [512, 1024, 256, 1024]
    windows = tiny_windows(samples=2, seq_len=16)
    torch.save(windows, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", RELOAD_REMOTE, str(written), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
                   check=True, cwd=tmp_path)
    out = torch.load(tmp_path / "o.pt")
    assert torch.allclose(out["logits"], logits(model, windows), atol=1e-5, rtol=0)
    assert torch.equal(out["cached"], out["uncached"])
    assert torch.allclose(logits(load_checkpoint(written), windows), logits(model, windows), atol=1e-5, rtol=0)

    odd = apply_width(wide(), WidthPlan(layers={1: LayerWidth(channels=(1, 2, 3))}))
    with pytest.raises(ExportError, match=r"keeps \{1: 3\} channels"):
        export_model(odd, tmp_path / "odd", "nemotron_nas")
    heads = apply_width(build("llama"), WidthPlan(layers={1: LayerWidth(heads=(0, 1), kv_heads=(0,))}))
    with pytest.raises(ExportError, match="keeps every layer's 4 query heads"):
        export_model(heads, tmp_path / "heads", "nemotron_nas")


class _KeptChannelsNorm(torch.nn.Module):
    """The reference for a sliced norm: RMS over the kept channels only, zeros elsewhere."""

    def __init__(self, norm, kept: torch.Tensor):
        super().__init__()
        self.norm, self.kept = norm, kept

    def forward(self, x):
        part = x[..., self.kept].float()
        scaled = part * torch.rsqrt(part.pow(2).mean(-1, keepdim=True) + self.norm.variance_epsilon)
        out = torch.zeros_like(x)
        out[..., self.kept] = (self.norm.weight[self.kept] * scaled).to(x.dtype)
        return out


def _hidden_reference(model, kept: tuple[int, ...]):
    from tasks.surgery import architecture_of

    adapter, index = architecture_of(model), torch.tensor(kept)
    gone = torch.tensor(sorted(set(range(model.config.hidden_size)) - set(kept)))
    with torch.no_grad():
        model.get_input_embeddings().weight[:, gone] = 0
        for layer in adapter.decoder_layers(model):
            for part, writer in (("attn", "o_proj"), ("mlp", "down_proj")):
                half = adapter.half(part)
                getattr(getattr(layer, half.slot), writer).weight[gone] = 0
                for name in half.norms:
                    setattr(layer, name, _KeptChannelsNorm(getattr(layer, name), index))
        model.model.norm = _KeptChannelsNorm(model.model.norm, index)
    return model


@pytest.mark.parametrize("family", ["llama", "mistral", "olmo2", "qwen2", "qwen3"])
def test_hidden_channels_slice_the_residual_stream(family, tmp_path):
    """Slicing hidden channels equals the dense model whose residual stream is zero on the other channels
    and whose norms divide by the kept ones; the checkpoint reloads with plain transformers."""
    windows = tiny_windows(samples=2, seq_len=24)
    kept = tuple(range(0, 64, 4)) + tuple(range(1, 64, 4))
    kept = tuple(sorted(kept))
    plan = WidthPlan(layers={1: LayerWidth(channels=tuple(range(48)))}, hidden=kept)
    reference = logits(_hidden_reference(mask_width(build(family), WidthPlan(layers=plan.layers)), kept), windows)
    sliced = apply_width(build(family), plan)
    assert sliced.config.hidden_size == 32 and sliced.get_input_embeddings().weight.shape[1] == 32
    assert torch.allclose(logits(sliced, windows), reference, atol=1e-5, rtol=0)
    uniform = apply_width(build(family), WidthPlan(hidden=kept))
    uniform.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.allclose(logits(reloaded, windows), logits(uniform, windows), atol=1e-5, rtol=0)


def test_hidden_channels_of_tied_embeddings_stay_tied_and_gemma_is_refused():
    config = CONFIGS["llama"]()
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config).eval()
    apply_width(model, WidthPlan(hidden=tuple(range(40))))
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.shape == (config.vocab_size, 40)
    with pytest.raises(WidthError, match="gemma2.*hidden channels cannot be pruned"):
        apply_width(build("gemma2"), WidthPlan(hidden=(0, 1)))
