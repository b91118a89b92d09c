"""`recover.method: bias`: every removed block becomes the mean of the output it added (Siddiqui et al. 2024)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.recover.adapter_fit import AdapterRecovery, check_adapters_fit, recover_with_adapters
from tasks.recover.registry import RecoveryMethod, register_recovery


class BiasRecovery(AdapterRecovery):
    """Each removed block becomes a learned additive bias on the residual stream (Siddiqui et al. 2024)."""

    method: Literal["bias"] = Field(description="Recovery method (pick another form to change it).")


@register_recovery
class BiasMethod(RecoveryMethod):
    name = "bias"
    settings = BiasRecovery

    def check(self, settings, env):
        check_adapters_fit(self.name, env)

    def run(self, model, settings, ctx, fingerprint):
        return recover_with_adapters(model, settings, 0, ctx, fingerprint)
