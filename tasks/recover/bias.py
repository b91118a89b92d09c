"""`recover.method: bias`: every removed block becomes the mean of the output it added (Siddiqui et al. 2024)."""

from __future__ import annotations

from tasks.recover.adapter_fit import recover_with_adapters
from tasks.recover.registry import RecoveryMethod, register_recovery


@register_recovery
class BiasMethod(RecoveryMethod):
    name = "bias"

    def run(self, model, settings, ctx, fingerprint):
        return recover_with_adapters(model, settings, 0, ctx, fingerprint)
