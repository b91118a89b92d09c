"""What `bias` and `low_rank` share: fit each removed block's adapter in closed form, then optionally refine."""

from __future__ import annotations

import torch
from torch import nn

from tasks.export import load_checkpoint
from tasks.recover.data import calibration_batches
from tasks.recover.least_squares import Fit, fit_adapters, fit_adapters_in_pruned
from tasks.recover.registry import RecoveryContext, RecoveryError, RecoveryRun
from tasks.recover.settings import BiasRecovery, LowRankRecovery
from tasks.recover.training import TrainSettings, train
from tasks.surgery import removed_units
from tasks.surgery.adapted import get_adapter, install_adapters


def recover_with_adapters(model: nn.Module, settings: BiasRecovery | LowRankRecovery, rank: int,
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
