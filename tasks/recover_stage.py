"""Stage `recover`: heal the pruned checkpoint with `recover.method` and export `checkpoint-recovered`."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tasks.windows import load_windows
from tasks.export import checkpoint_format
from tasks.load import ModelSpec, open_model
from tasks.prune import write_checkpoint
from tasks.recover.registry import RecoveryContext, get_recovery
from tasks.settings import Settings
from tasks.refs import ArtifactRef, Progress

CHECKPOINT = "checkpoint-recovered"


@dataclass(frozen=True)
class Recovered:
    method: str
    checkpoint: ArtifactRef
    format: str
    seconds: float
    losses: tuple[float, ...] = ()
    fit: dict[str, float] = field(default_factory=dict)
    trainable_params: int = 0
    resumed_from_step: int = 0
    domains: tuple[dict, ...] = ()  # dynamic batch loading's updates of the domain weights


def recover_stage(pruned_path: str, dense_path: str, calibration: ArtifactRef, recover: Settings,
                  model_spec: ModelSpec, batch_windows: int, prune_format: str, out_dir: Path, key: str,
                  log: Callable[[str], None] = print,
                  on_step: Callable[[int, int, float], None] | None = None,
                  progress: Progress | None = None) -> Recovered:
    """`on_step(done, total, loss)` follows training; `progress` writing the checkpoint."""
    started = time.perf_counter()
    method = get_recovery(recover.method)
    model = open_model(pruned_path, model_spec, "recover")
    ctx = RecoveryContext(
        dense_path=dense_path, calibration=load_windows(calibration), tokenizer_path=pruned_path,
        state_dir=out_dir / "recover-state" / key[:16], batch_windows=batch_windows, log=log,
        on_step=on_step, trust_remote_code=model_spec.trust_remote_code,
    )
    run = method.run(model, recover, ctx, key)
    ref = write_checkpoint(run.model, pruned_path, out_dir / CHECKPOINT, prune_format,
                           model_spec.trust_remote_code, progress)
    _drop_training_state(ctx.state_dir)
    return Recovered(
        method=recover.method, checkpoint=ref, format=checkpoint_format(ref.path),
        seconds=time.perf_counter() - started, losses=tuple(run.losses), fit=dict(run.fit),
        trainable_params=run.trainable_params, resumed_from_step=run.resumed_from_step, domains=tuple(run.domains),
    )


def _drop_training_state(state_dir: Path) -> None:
    """The resumable training state only serves a run interrupted before its checkpoint was written."""
    if state_dir.is_dir():
        shutil.rmtree(state_dir)
    if state_dir.parent.is_dir() and not any(state_dir.parent.iterdir()):
        state_dir.parent.rmdir()
