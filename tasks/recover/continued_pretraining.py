"""`recover.method: continued_pretraining`: every weight trains for a token budget, optionally mixing sources.

Shortened LLaMA (v2) and Sheared LLaMA heal pruned models this way; the mixing weights give each source
its share of the training windows, fixed, or moved during training by the domains' losses
(`recover.dynamic`: Sheared LLaMA's dynamic batch loading, `tasks/recover/dynamic_loading.py`).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from tasks.recover.data import TrainingStreams
from tasks.recover.dynamic_loading import DomainWeights, DynamicLoading, domain_losses
from tasks.recover.registry import RecoveryMethod, RecoveryRun, register_recovery
from tasks.recover.training import TrainingRecovery, TrainSettings, check_training, load_teacher, train
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

    dynamic: DynamicLoading | None = Field(
        None, description="Dynamic batch loading: the domain weights follow the domains' losses (two or more "
        "datasets); left out: the weights stay as given.")

    @model_validator(mode="after")
    def _domains_to_balance(self) -> "ContinuedPretrainingRecovery":
        if self.dynamic is None:
            return self
        if len(self.mixture()) < 2:
            raise ValueError("recover.dynamic balances domains: give two or more distinct recover.datasets")
        given = self.dynamic.references()
        if given is not None and (set(given) != set(self.mixture()) or len(given) != len(self.dynamic.reference_losses)):
            raise ValueError(f"recover.dynamic.reference_losses names {sorted(given)}; it needs exactly the "
                             f"sources of recover.datasets: {sorted(self.mixture())}")
        return self

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
        if settings.dynamic is not None:
            for source in settings.mixture():  # held-apart windows first, then at least one to train on
                env.enough_tokens(source, (settings.dynamic.eval_windows + 1) * settings.seq_len + 1,
                                  "recover.dynamic.eval_windows")

    def run(self, model, settings, ctx, fingerprint):
        steps = math.ceil(settings.tokens / (settings.batch_size * settings.seq_len))
        dynamic = settings.dynamic
        streams = TrainingStreams(ctx.tokenizer_path, settings.mixture(), settings.seq_len, settings.tokens,
                                  ctx.trust_remote_code, held_apart=0 if dynamic is None else dynamic.eval_windows)
        hook = None
        if dynamic is not None:
            hook = DomainWeights(streams, dynamic, dynamic.references() or _dense_losses(model, ctx, streams))
        model.requires_grad_(True)
        log = train(
            model, lambda step: streams.batch(step, settings.batch_size, settings.seed,
                                              None if hook is None else hook.weights),
            TrainSettings(steps, settings.lr, settings.warmup_steps, settings.seed, settings.checkpoint_every,
                          "continued pretraining"),
            ctx.state_dir, fingerprint, ctx.log, ctx.on_step, hook=hook,
        )
        model.requires_grad_(False)
        return RecoveryRun(model, losses=log.losses, trainable_params=log.trainable_params,
                           resumed_from_step=log.resumed_from_step, domains=[] if hook is None else hook.trace())


def _dense_losses(model, ctx, streams: TrainingStreams) -> dict[str, float]:
    """The reference: the dense model's loss on each domain's held-apart windows (in the student's dtype
    and device)."""
    return domain_losses(load_teacher(ctx.dense_path, model), streams)
