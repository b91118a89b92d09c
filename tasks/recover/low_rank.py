"""`recover.method: low_rank`: every removed block becomes a rank-r linear map of its input plus a bias."""

from __future__ import annotations

from tasks.recover.adapter_fit import recover_with_adapters
from tasks.recover.registry import RecoveryMethod, register_recovery


@register_recovery
class LowRankMethod(RecoveryMethod):
    name = "low_rank"

    def run(self, model, settings, ctx, fingerprint):
        return recover_with_adapters(model, settings, settings.rank, ctx, fingerprint)
