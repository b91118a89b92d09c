"""Every block-importance metric against a direct computation made here from the model's own Hugging
Face forward, with hooks that read (or zero) the attention and MLP outputs of each layer."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tasks.score import METRICS, CandidateScore, ScoringOptions
from tasks.score.shapley import draw_halves
from tests.tiny import tiny_model, tiny_windows

LAYERS = 4


@dataclass
class Trace:
    """Per layer i: its input x[i], attention output a[i] and MLP output m[i]; x[LAYERS] is the output."""

    x: list[torch.Tensor]
    a: list[torch.Tensor]
    m: list[torch.Tensor]

    def unit_io(self, unit: str) -> tuple[torch.Tensor, torch.Tensor]:
        _, layer, part = unit.split(".")
        i = int(layer)
        mid = self.x[i] + self.a[i]
        return (self.x[i], mid) if part == "attn" else (mid, mid + self.m[i])


@contextmanager
def zeroed(model, units: set[str]):
    """Hooks that make the given units add nothing to the residual stream (their output is zero)."""
    handles = []
    for unit in units:
        _, layer, part = unit.split(".")
        block = model.model.layers[int(layer)]
        if part == "attn":
            handles.append(block.self_attn.register_forward_hook(
                lambda mod, args, out: (torch.zeros_like(out[0]), *out[1:])))
        else:
            handles.append(block.mlp.register_forward_hook(lambda mod, args, out: torch.zeros_like(out)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def trace(model, windows, zero: set[str] = frozenset()) -> Trace:
    with zeroed(model, set(zero)):  # registered first, so the recording hooks see the zeroed outputs
        return _record(model, windows)


def _record(model, windows) -> Trace:
    layers = model.model.layers
    x, a, m = [None] * (LAYERS + 1), [None] * LAYERS, [None] * LAYERS
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: x.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(
            lambda mod, args, out, i=i: a.__setitem__(i, out[0].clone())))
        handles.append(layer.mlp.register_forward_hook(lambda mod, args, out, i=i: m.__setitem__(i, out.clone())))
    handles.append(layers[-1].register_forward_hook(lambda mod, args, out: x.__setitem__(LAYERS, out.clone())))
    try:
        model(windows)
    finally:
        for handle in handles:
            handle.remove()
    return Trace(x, a, m)


def window_losses(model, windows, zero: set[str] = frozenset()) -> torch.Tensor:
    """Mean next-token NLL of every window, from the HF forward's logits."""
    with torch.no_grad(), zeroed(model, set(zero)):
        logits = model(windows).logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="none")
    return nll.view(windows.shape[0], -1).double().mean(dim=1)


def run_metric(name, model, windows, candidates, removed=frozenset(), batch_windows=2, **settings):
    reported: list[CandidateScore] = []
    scorer = METRICS[name].configure(**settings).scorer(model, windows, ScoringOptions(batch_windows))
    scores = scorer.score(set(removed), candidates, {}, reported.append)
    assert [s.block for s in reported] == [c for c in candidates]
    return scores


def units(block: str) -> list[str]:
    return [block] if block.count(".") == 2 else [f"{block}.attn", f"{block}.mlp"]


def mean_cos(inputs, outputs) -> float:
    return float(F.cosine_similarity(inputs, outputs, dim=-1).double().mean())


@pytest.fixture(scope="module")
def setup():
    return tiny_model("llama", layers=LAYERS), tiny_windows(samples=4, seq_len=24)


def test_trace_is_consistent_with_the_layer_outputs(setup):
    model, windows = setup
    t = trace(model, windows)
    for i in range(LAYERS):
        torch.testing.assert_close(t.x[i] + t.a[i] + t.m[i], t.x[i + 1])


def test_block_influence_is_one_minus_mean_cosine_of_layer_input_and_output(setup):
    model, windows = setup
    t = trace(model, windows)
    layers = [f"layers.{i}" for i in range(LAYERS)]
    scores = run_metric("block_influence", model, windows, layers)
    for i, block in enumerate(layers):
        assert scores[block].value == pytest.approx(1 - mean_cos(t.x[i], t.x[i + 1]), abs=1e-6)
        assert scores[block].n_tokens == windows.numel()


def test_similarity_is_mean_cosine_of_sub_block_input_and_residual_sum(setup):
    model, windows = setup
    t = trace(model, windows)
    blocks = [f"layers.{i}.{p}" for i in range(LAYERS) for p in ("attn", "mlp")]
    scores = run_metric("similarity", model, windows, blocks)
    for block in blocks:
        assert scores[block].value == pytest.approx(mean_cos(*t.unit_io(block)), abs=1e-6)


@pytest.mark.parametrize("granularity", ["layer", "sublayer"])
def test_update_norms_and_cosine_of_the_blocks_update(setup, granularity):
    model, windows = setup
    t = trace(model, windows)
    if granularity == "layer":
        blocks = [f"layers.{i}" for i in range(LAYERS)]
        io = {b: (t.x[i], t.x[i + 1]) for i, b in enumerate(blocks)}
    else:
        blocks = [f"layers.{i}.{p}" for i in range(LAYERS) for p in ("attn", "mlp")]
        io = {b: t.unit_io(b) for b in blocks}
    expected = {
        "relative_l1": lambda x, y: float(((y - x).abs().sum(-1) / x.abs().sum(-1)).double().mean()),
        "relative_l2": lambda x, y: float(((y - x).norm(dim=-1) / x.norm(dim=-1)).double().mean()),
        "cosine": lambda x, y: 1 - mean_cos(x, y),
    }
    for name, direct in expected.items():
        scores = run_metric(name, model, windows, blocks)
        for block in blocks:
            assert scores[block].value == pytest.approx(direct(*io[block]), rel=1e-5, abs=1e-7), (name, block)


def test_block_metrics_see_blocks_removed_earlier_as_skipped(setup):
    model, windows = setup
    removed = {"layers.1.attn", "layers.2.mlp"}
    t = trace(model, windows, zero=removed)
    blocks = ["layers.0.mlp", "layers.1.mlp", "layers.2.attn", "layers.3.attn"]
    scores = run_metric("relative_l2", model, windows, blocks, removed=removed)
    for block in blocks:
        x, y = t.unit_io(block)
        direct = float(((y - x).norm(dim=-1) / x.norm(dim=-1)).double().mean())
        assert scores[block].value == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize("tokens", ["last", "all"])
def test_angular_distance_of_segments_of_consecutive_layers(setup, tokens):
    model, windows = setup
    t = trace(model, windows)
    n = 2
    starts = list(range(LAYERS - n + 1))
    wins = {f"layers.{s}": tuple(f"layers.{s + k}" for k in range(n)) for s in starts}
    reported = []
    scorer = METRICS["angular_distance"].configure(tokens=tokens).scorer(model, windows, ScoringOptions(3))
    scores = scorer.score_segments(set(), wins, {}, reported.append)
    assert sorted(s.block for s in reported) == sorted(wins)
    for s in starts:
        x, y = t.x[s], t.x[s + n]
        if tokens == "last":
            x, y = x[:, -1], y[:, -1]
        cos = F.cosine_similarity(x, y, dim=-1).double().clamp(-1, 1)
        assert scores[f"layers.{s}"].value == pytest.approx(float((torch.arccos(cos) / math.pi).mean()), abs=1e-6)
    with pytest.raises(TypeError, match="consecutive"):
        scorer.score(set(), ["layers.0"], {}, reported.append)


def test_shapley_leave_one_out_is_the_loss_rise_without_each_block(setup):
    model, windows = setup
    blocks = [f"layers.{i}" for i in range(LAYERS)]
    dense = window_losses(model, windows)
    scores = run_metric("shapley", model, windows, blocks, estimator="leave_one_out")
    for block in blocks:
        diff = window_losses(model, windows, zero=set(units(block))) - dense
        assert scores[block].value == pytest.approx(float(diff.mean()), abs=1e-5)
        assert scores[block].std_error == pytest.approx(float(diff.std() / math.sqrt(len(diff))), rel=1e-3, abs=1e-6)


def test_shapley_sampled_subnetworks_absent_minus_present(setup):
    model, windows = setup
    blocks = [f"layers.{i}.{p}" for i in range(LAYERS) for p in ("attn", "mlp")]
    samples, seed = 5, 3
    halves = draw_halves(len(blocks), samples, seed)
    assert all(len(h) == len(blocks) // 2 for h in halves)
    diffs = torch.zeros(samples, len(blocks), dtype=torch.float64)
    for s, half in enumerate(halves):
        first = {blocks[i] for i in half}
        loss_without_first = float(window_losses(model, windows, zero=first).mean())
        loss_without_rest = float(window_losses(model, windows, zero=set(blocks) - first).mean())
        for i, block in enumerate(blocks):
            absent, present = ((loss_without_first, loss_without_rest) if block in first
                               else (loss_without_rest, loss_without_first))
            diffs[s, i] = absent - present
    scores = run_metric("shapley", model, windows, blocks, estimator="sampled", samples=samples, seed=seed)
    for i, block in enumerate(blocks):
        assert scores[block].value == pytest.approx(float(diffs[:, i].mean()), abs=1e-5)
        se = float(diffs[:, i].std() / math.sqrt(samples))
        assert scores[block].std_error == pytest.approx(se, rel=1e-3, abs=1e-6)


def test_shapley_sampled_estimate_does_not_depend_on_what_was_resumed(setup):
    model, windows = setup
    blocks = [f"layers.{i}" for i in range(LAYERS)]
    full = run_metric("shapley", model, windows, blocks, samples=3)
    scorer = METRICS["shapley"].configure(samples=3).scorer(model, windows, ScoringOptions(2))
    reported = []
    partial = scorer.score(set(), blocks, {b: full[b] for b in blocks[:2]}, reported.append)
    assert [s.block for s in reported] == blocks[2:]
    assert {b: s.value for b, s in partial.items()} == pytest.approx({b: s.value for b, s in full.items()})


@pytest.mark.parametrize("granularity", ["layer", "attn", "mlp"])
def test_taylor_is_summed_abs_weight_times_gradient_of_the_mean_loss(granularity):
    model, windows = tiny_model("qwen2", layers=3), tiny_windows(samples=3, seq_len=16)
    model.zero_grad()
    loss = model(windows, labels=windows).loss  # mean NLL over every prediction of every window
    loss.backward()
    parts = {"layer": ("",), "attn": ("self_attn.", "input_layernorm."), "mlp": ("mlp.", "post_attention_layernorm.")}
    blocks = [f"layers.{i}" + ("" if granularity == "layer" else f".{granularity}") for i in range(3)]
    expected = {}
    for i, block in enumerate(blocks):
        total = 0.0
        for name, p in model.model.layers[i].named_parameters():
            if any(name.startswith(prefix) for prefix in parts[granularity]):
                total += float((p.detach().double() * p.grad.double()).abs().sum())
        expected[block] = total
    model.zero_grad(set_to_none=True)
    scores = run_metric("taylor", model, windows, blocks, batch_windows=2)
    for block in blocks:
        assert scores[block].value == pytest.approx(expected[block], rel=1e-4)
    # The scorer leaves no gradients behind and restores requires_grad.
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_metrics_declare_their_scale_granularities_and_needs():
    declared = {name: (m.remove, m.measures, m.needs_grad) for name, m in METRICS.items()}
    assert declared == {
        "perplexity": ("lowest", "removal", False),
        "block_influence": ("lowest", "block", False),
        "similarity": ("highest", "block", False),
        "angular_distance": ("lowest", "segment", False),
        "relative_l1": ("lowest", "block", False),
        "relative_l2": ("lowest", "block", False),
        "cosine": ("lowest", "block", False),
        "shapley": ("lowest", "block", False),
        "taylor": ("lowest", "block", True),
    }
    assert METRICS["block_influence"].granularities == {"layer"}
    assert METRICS["angular_distance"].granularities == {"layer"}
    assert METRICS["similarity"].granularities == {"attn", "mlp", "sublayer"}
