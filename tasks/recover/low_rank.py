"""`recover.method: low_rank`: every removed block becomes a rank-r linear map of its input plus a bias."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.recover.adapter_fit import AdapterRecovery, check_adapters_fit, recover_with_adapters
from tasks.recover.registry import RecoveryMethod, register_recovery


class LowRankRecovery(AdapterRecovery):
    """Each removed block becomes a low-rank linear map of its input plus a bias (Siddiqui et al. 2024)."""

    method: Literal["low_rank"] = Field(description="Recovery method (pick another form to change it).")
    rank: int = Field(8, ge=1, le=65_536, description="Rank of each adapter's linear map.")


@register_recovery
class LowRankMethod(RecoveryMethod):
    name = "low_rank"
    settings = LowRankRecovery

    def check(self, settings, env):
        check_adapters_fit(self.name, env)

    def run(self, model, settings, ctx, fingerprint):
        return recover_with_adapters(model, settings, settings.rank, ctx, fingerprint)
