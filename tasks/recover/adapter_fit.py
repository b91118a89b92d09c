"""What `bias` and `low_rank` share: fit each removed block's adapter in closed form, then optionally refine."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tasks.export import get_format, load_checkpoint
from tasks.recover.data import calibration_batches
from tasks.recover.least_squares import Fit, fit_adapters, fit_adapters_in_pruned
from tasks.recover.registry import RecoveryCheck, RecoveryContext, RecoveryError, RecoveryRun
from tasks.recover.training import TrainSettings, train
from tasks.settings import Settings
from tasks.surgery import removed_units
from tasks.surgery.adapted import get_adapter, install_adapters


class AdapterRecovery(Settings):
    """Adapters fitted in closed form on the dense model's calibration activations, optionally refined."""

    ridge: float = Field(
        1e-4, ge=0.0, le=1.0,
        description="Ridge term of the least-squares fit, relative to the mean input variance (0: plain least squares).",
    )
    fit: Literal["dense", "pruned"] = Field(
        "dense",
        description=(
            "dense: each adapter maps the block's input to the output it added, in the dense model (Siddiqui et al.); "
            "pruned: fitted in model order on the pruned model's own stream toward the dense stream after the block."
        ),
    )
    refine_steps: int = Field(
        0, ge=0, le=1_000_000,
        description="Optional gradient refinement: steps of Adam on the language-model loss of calibration windows.",
    )
    refine_lr: float = Field(1e-3, gt=0.0, le=1.0, description="Learning rate of the refinement.")
    batch_windows: int = Field(4, ge=1, le=4096, description="Calibration windows per refinement step.")
    seed: int = Field(0, ge=0, description="Seed of the refinement's batch order.")


def check_adapters_fit(method: str, env: RecoveryCheck) -> None:
    """Adapters sit where blocks were removed: the checkpoint format must have a place for them."""
    if env.prune_format != "auto" and not get_format(env.prune_format).carries_adapters:
        raise RecoveryError(
            f"recover.method '{method}' puts adapters where blocks were removed, which prune.format "
            f"'{env.prune_format}' cannot carry; use prune.format auto, remote_code or pruneflow"
        )


def recover_with_adapters(model: nn.Module, settings: AdapterRecovery, rank: int,
                          ctx: RecoveryContext, fingerprint: str) -> RecoveryRun:
    units = sorted(removed_units(model))
    if not units:
        raise RecoveryError(f"recover.method '{settings.method}' needs removed blocks; the model has none")
    device = next(model.parameters()).device
    dense = load_checkpoint(ctx.dense_path, dtype="float32", device=str(device))
    install_adapters(model, {u: rank for u in units})

    def install(unit: str, fit: Fit) -> None:
        adapter = get_adapter(model, unit)
        with torch.no_grad():
            adapter.bias.copy_(fit.bias)
            if rank:
                adapter.down.weight.copy_(fit.down)
                adapter.up.weight.copy_(fit.up)

    if settings.fit == "dense":
        fits = fit_adapters(dense, units, ctx.calibration, rank, settings.ridge, ctx.batch_windows)
        for unit, fit in fits.items():
            install(unit, fit)
    else:
        fits = fit_adapters_in_pruned(dense, model, units, ctx.calibration, rank, settings.ridge, ctx.batch_windows,
                                      install)
    del dense
    ctx.log(f"{settings.method}: fitted {len(units)} adapters ({settings.fit}); share of each target recovered: "
            + ", ".join(f"{u} {fits[u].explained:.3f}" for u in units))
    run = RecoveryRun(model, fit={u: fits[u].explained for u in units})
    if settings.refine_steps:
        model.requires_grad_(False)
        for unit in units:
            get_adapter(model, unit).requires_grad_(True)
        log = train(
            model, calibration_batches(ctx.calibration, settings.batch_windows, settings.seed),
            TrainSettings(settings.refine_steps, settings.refine_lr, 0, settings.seed, max(1, settings.refine_steps),
                          f"{settings.method} refine"),
            ctx.state_dir, fingerprint, ctx.log, ctx.on_step,
        )
        model.requires_grad_(False)
        run.losses, run.resumed_from_step = log.losses, log.resumed_from_step
    run.trainable_params = sum(p.numel() for u in units for p in get_adapter(model, u).parameters())
    return run
