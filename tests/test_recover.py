"""Recovery: closed-form adapters, LoRA and continued pretraining on tiny models, and resumable training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipelines.spec import PipelineSpec
from tasks.windows import save_windows
from tasks.export import load_checkpoint
from tasks.recover.least_squares import fit_adapters
from tasks.recover_stage import recover_stage
from tasks.recover.training import TrainSettings, train
from tasks.residual import ResidualRunner, perplexity
from tasks.surgery import remove_blocks
from tasks.surgery.adapted import get_adapter, install_adapters
from tests.tiny import tiny_checkpoint, tiny_corpus, tiny_model, tiny_windows


class KnownAffine(nn.Module):
    """A block whose output is exactly x @ A + c, so a rank(A) adapter can reproduce it."""

    def __init__(self, hidden: int, rank: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(hidden, rank, generator=g) @ torch.randn(rank, hidden, generator=g) * 0.05
        self.c = torch.randn(hidden, generator=g)

    def forward(self, x):
        return x @ self.a + self.c


def _dense_with_linear_mlp(rank: int):
    model = tiny_model("llama", layers=4)
    layer = model.model.layers[1]
    layer.post_attention_layernorm = nn.Identity()  # the block then reads the residual stream itself
    layer.mlp = KnownAffine(64, rank, seed=5)
    return model


@pytest.mark.parametrize("rank", [0, 2])
def test_least_squares_adapter_reproduces_a_known_linear_block(rank):
    dense = _dense_with_linear_mlp(rank)
    if rank == 0:
        dense.model.layers[1].mlp.a.zero_()  # a constant block: the bias alone is exact
    windows = tiny_windows(8, 32)
    fits = fit_adapters(dense, ["layers.1.mlp"], windows, rank=rank, ridge=0.0, batch_windows=4)
    assert fits["layers.1.mlp"].explained == pytest.approx(1.0, abs=1e-6)

    pruned = remove_blocks(copy.deepcopy(dense), ["layers.1.mlp"])
    install_adapters(pruned, {"layers.1.mlp": rank})
    adapter = get_adapter(pruned, "layers.1.mlp")
    with torch.no_grad():
        adapter.bias.copy_(fits["layers.1.mlp"].bias)
        if rank:
            adapter.down.weight.copy_(fits["layers.1.mlp"].down)
            adapter.up.weight.copy_(fits["layers.1.mlp"].up)
        ids = tiny_windows(2, 16, seed=9)
        reference, recovered = dense(ids).logits, pruned(ids).logits
        bare = remove_blocks(copy.deepcopy(dense), ["layers.1.mlp"])(ids).logits
    assert (recovered - reference).abs().max() < 1e-3
    assert (bare - reference).abs().max() > 0.1  # without the adapter the block is really missed


def test_low_rank_fit_is_the_best_rank_r_map():
    """Rank 1 on a rank-2 block explains less than rank 2, more than the bias, never more than all."""
    dense = _dense_with_linear_mlp(2)
    windows = tiny_windows(8, 32)
    explained = [fit_adapters(dense, ["layers.1.mlp"], windows, r, 0.0, 4)["layers.1.mlp"].explained for r in (0, 1, 2)]
    assert explained[0] < explained[1] < explained[2] <= 1.0 + 1e-9


def test_lora_merge_equals_unmerged_logits():
    peft = pytest.importorskip("peft")
    model = remove_blocks(tiny_model("llama", layers=4), ["layers.1.attn", "layers.2"])
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)  # B starts at zero; make the adapters count
        ids = tiny_windows(2, 16)
        unmerged = wrapped(ids).logits
        merged_model = wrapped.merge_and_unload()
        merged = merged_model(ids).logits
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    assert (merged - unmerged).abs().max() < 1e-4
    assert (unmerged - remove_blocks(tiny_model("llama", layers=4), ["layers.1.attn", "layers.2"])(ids).logits).abs().max() > 1e-2


def _setup(tmp_path, recover: dict, blocks: list[str]):
    dense_dir = tiny_checkpoint(tmp_path / "dense", layers=4)
    corpus = tiny_corpus(tmp_path / "corpus.txt", articles=80)
    spec = PipelineSpec.model_validate({
        "name": "recover-test", "model": {"source": str(dense_dir)}, "search": {"target": {"blocks": 1}},
        "output_dir": str(tmp_path / "out"), "recover": recover, "score": {"batch_windows": 4},
    })
    pruned = remove_blocks(load_checkpoint(dense_dir), blocks)
    from tasks.prune import write_checkpoint

    ref = write_checkpoint(pruned, str(dense_dir), tmp_path / "out" / "checkpoint-pruned", "auto")
    windows = tiny_windows(8, 32, seed=3)
    calibration = save_windows(windows, tmp_path / "calibration.safetensors", "calibration")
    return spec, str(dense_dir), ref, calibration, windows, corpus


RECOVERIES = {
    "bias": {"method": "bias"},
    "low_rank": {"method": "low_rank", "rank": 4, "refine_steps": 10, "refine_lr": 0.01},
    "low_rank_fit_pruned": {"method": "low_rank", "rank": 4, "fit": "pruned"},
    "lora": {"method": "lora", "steps": 12, "rank": 4, "lr": 0.01, "seq_len": 32, "batch_size": 4, "dataset": "CORPUS"},
    "continued_pretraining": {"method": "continued_pretraining", "tokens": 12 * 4 * 32, "lr": 3e-3, "seq_len": 32,
                              "batch_size": 4, "datasets": [{"source": "CORPUS"}]},
}


@pytest.mark.parametrize("name", RECOVERIES)
def test_recovered_model_has_lower_loss_than_pruned(tmp_path, name):
    corpus_path = str(tmp_path / "corpus.txt")
    recover = {k: (corpus_path if v == "CORPUS" else v) for k, v in RECOVERIES[name].items()}
    if "datasets" in recover:
        recover["datasets"] = [{"source": corpus_path}]
    blocks = ["layers.1.mlp", "layers.2"]
    spec, dense_dir, pruned_ref, calibration, windows, _ = _setup(tmp_path, recover, blocks)
    if name in ("lora", "continued_pretraining"):
        # Training methods learn the text they train on; measure on that text's own windows.
        from tasks.recover.data import TrainingStreams

        windows = TrainingStreams(pruned_ref.path, {corpus_path: 1.0}, 32, 4096).batch(999, 8, seed=7)
    out = recover_stage(pruned_ref.path, dense_dir, calibration, spec.recover, spec.model, spec.score.batch_windows,
                        spec.prune.format, tmp_path / "out", key="k" * 64, log=lambda m: None)
    pruned_ppl = perplexity(load_checkpoint(pruned_ref.path), windows)
    recovered_model = load_checkpoint(out.checkpoint.path)
    recovered_ppl = perplexity(recovered_model, windows)
    assert recovered_ppl < pruned_ppl * 0.98, (name, pruned_ppl, recovered_ppl)
    if name in ("bias", "low_rank", "low_rank_fit_pruned"):
        assert out.format == "remote_code" and set(out.fit) == {"layers.1.mlp", "layers.2.attn", "layers.2.mlp"}
        assert all(0.0 <= v <= 1.0 + 1e-9 for v in out.fit.values())
    if name in ("low_rank", "lora", "continued_pretraining"):
        assert len(out.losses) == (10 if name == "low_rank" else 12) and out.trainable_params > 0
        assert sum(out.losses[-3:]) < sum(out.losses[:3])
    # The resumable training state serves only an interrupted run: none is left once the checkpoint exists.
    assert not (tmp_path / "out" / "recover-state").exists()


def test_training_resumes_where_it_stopped(tmp_path):
    model = tiny_model("llama", layers=2)
    model.requires_grad_(True)
    windows = tiny_windows(16, 16)
    batches = lambda step: windows[(2 * step) % 16 : (2 * step) % 16 + 2]  # noqa: E731
    settings = TrainSettings(steps=6, lr=1e-3, warmup_steps=2, seed=0, checkpoint_every=2, label="t")
    seen = []
    reference = train(copy.deepcopy(model), batches, settings, tmp_path / "a", "fp", log=lambda m: None,
                      on_step=lambda done, total, loss: seen.append((done, total, loss)))
    assert seen == [(i + 1, 6, loss) for i, loss in enumerate(reference.losses)]

    def crashing(step):
        if step == 5:
            raise KeyboardInterrupt  # an interruption after the step-4 checkpoint
        return batches(step)

    interrupted = copy.deepcopy(model)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, crashing, settings, tmp_path / "b", "fp", log=lambda m: None)
    resumed = train(copy.deepcopy(model), batches, settings, tmp_path / "b", "fp", log=lambda m: None)
    assert resumed.resumed_from_step == 4
    assert resumed.losses == pytest.approx(reference.losses, rel=1e-5)
    # A different fingerprint (another configuration) never picks up that state.
    assert train(copy.deepcopy(model), batches, settings, tmp_path / "b", "other", log=lambda m: None).resumed_from_step == 0


def test_a_deep_copy_runs_its_own_adapters():
    model = remove_blocks(tiny_model("llama", layers=4), ["layers.0", "layers.2.mlp", "layers.3"])
    install_adapters(model, {"layers.0.attn": 2, "layers.2.mlp": 2, "layers.3.mlp": 0})
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for param in get_adapter(twin, "layers.2.mlp").parameters():
            param.add_(0.5)
        ids = tiny_windows(2, 16)
        original, changed = model(ids).logits, twin(ids).logits
        # The original still computes what its (untouched) adapters say: zero-initialised ones add nothing.
        bare = remove_blocks(tiny_model("llama", layers=4), ["layers.0", "layers.2.mlp", "layers.3"])(ids).logits
    assert (original - bare).abs().max() < 1e-5
    assert (changed - original).abs().max() > 1e-2


def test_sequential_fit_also_reproduces_a_known_linear_block():
    from tasks.recover.least_squares import fit_adapters_in_pruned

    dense = _dense_with_linear_mlp(2)
    pruned = remove_blocks(copy.deepcopy(dense), ["layers.1.mlp", "layers.3.attn"])
    install_adapters(pruned, {"layers.1.mlp": 2, "layers.3.attn": 2})

    def install(unit, fit):
        adapter = get_adapter(pruned, unit)
        with torch.no_grad():
            adapter.bias.copy_(fit.bias)
            adapter.down.weight.copy_(fit.down)
            adapter.up.weight.copy_(fit.up)

    fits = fit_adapters_in_pruned(dense, pruned, ["layers.1.mlp", "layers.3.attn"], tiny_windows(8, 32), 2, 0.0, 4,
                                  install)
    assert fits["layers.1.mlp"].explained == pytest.approx(1.0, abs=1e-6)  # nothing before it drifted
    assert fits["layers.3.attn"].explained < 1.0  # attention is not linear in its input
    runner_dense, runner_pruned = ResidualRunner(dense), ResidualRunner(pruned)
    ids = tiny_windows(2, 16, seed=9)
    with torch.no_grad():
        h_dense = runner_dense.embed(ids)
        h_pruned = runner_pruned.embed(ids)
        ctx_d, ctx_p = runner_dense.context(h_dense), runner_pruned.context(h_pruned)
        for unit in runner_dense.units[:4]:  # through layers.1.mlp
            h_dense = runner_dense.apply(unit, h_dense, ctx_d)
        for unit in runner_pruned.units[:4]:  # layers.0.attn/mlp, layers.1.attn, the adapter of layers.1.mlp
            h_pruned = runner_pruned.apply(unit, h_pruned, ctx_p)
    assert (h_pruned - h_dense).abs().max() < 1e-3
