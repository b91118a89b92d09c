"""`recover.method: continued_pretraining`: every weight trains for a token budget, optionally mixing sources.

Shortened LLaMA (v2) and Sheared LLaMA heal pruned models this way; the mixing weights give each source
its share of the training windows.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from tasks.recover.data import TrainingStreams
from tasks.recover.registry import RecoveryMethod, RecoveryRun, register_recovery
from tasks.recover.training import TrainingRecovery, TrainSettings, check_training, train
from tasks.sources.mixture import WeightedSource


class ContinuedPretrainingRecovery(TrainingRecovery):
    """Full-parameter training for a token budget (Shortened LLaMA v2, Sheared LLaMA), optionally mixing domains."""

    method: Literal["continued_pretraining"] = Field(description="Recovery method (pick another form to change it).")
    tokens: int = Field(65_536, ge=8, le=10**13, description="Training token budget (steps = tokens / (batch x seq_len)).")
    lr: float = Field(2e-5, gt=0.0, le=1.0, description="Peak learning rate (linear warm-up, then linear decay).")
    datasets: tuple[WeightedSource, ...] = Field(
        (WeightedSource(source="builtin:wiki-vital-en"),),
        min_length=1,
        description="Training text sources and their mixing weights (each window is drawn from one source).",
    )

    def mixture(self) -> dict[str, float]:
        """Source -> share of the training windows (weights of a repeated source add up)."""
        total = sum(d.weight for d in self.datasets)
        shares: dict[str, float] = {}
        for d in self.datasets:
            shares[d.source] = shares.get(d.source, 0.0) + d.weight / total
        return shares


@register_recovery
class ContinuedPretrainingMethod(RecoveryMethod):
    name = "continued_pretraining"
    settings = ContinuedPretrainingRecovery

    def check(self, settings, env):
        check_training(settings, list(settings.mixture()), env)

    def run(self, model, settings, ctx, fingerprint):
        steps = math.ceil(settings.tokens / (settings.batch_size * settings.seq_len))
        streams = TrainingStreams(ctx.tokenizer_path, settings.mixture(), settings.seq_len, settings.tokens,
                                  ctx.trust_remote_code)
        model.requires_grad_(True)
        log = train(
            model, lambda step: streams.batch(step, settings.batch_size, settings.seed),
            TrainSettings(steps, settings.lr, settings.warmup_steps, settings.seed, settings.checkpoint_every,
                          "continued pretraining"),
            ctx.state_dir, fingerprint, ctx.log, ctx.on_step,
        )
        model.requires_grad_(False)
        return RecoveryRun(model, losses=log.losses, trainable_params=log.trainable_params,
                           resumed_from_step=log.resumed_from_step)
