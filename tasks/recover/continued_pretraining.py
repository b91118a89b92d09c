"""`recover.method: continued_pretraining`: every weight trains for a token budget, optionally mixing sources.

Shortened LLaMA (v2) and Sheared LLaMA heal pruned models this way; the mixing weights give each source
its share of the training windows.
"""

from __future__ import annotations

import math

from tasks.recover.data import TrainingStreams
from tasks.recover.registry import RecoveryMethod, RecoveryRun, register_recovery
from tasks.recover.training import TrainSettings, train


@register_recovery
class ContinuedPretrainingMethod(RecoveryMethod):
    name = "continued_pretraining"

    def run(self, model, settings, ctx, fingerprint):
        steps = math.ceil(settings.tokens / (settings.batch_size * settings.seq_len))
        streams = TrainingStreams(ctx.tokenizer_path, settings.mixture(), settings.seq_len, settings.tokens)
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
