"""Recovery after pruning (`recover.method`): one module per method, each registered with one line.

bias / low_rank: closed-form adapters in place of removed blocks (Siddiqui et al. 2024); lora: PEFT LoRA,
merged on save (Shortened LLaMA); continued_pretraining: full-parameter training on a token budget,
optionally mixing sources (Shortened LLaMA v2, Sheared LLaMA); distill: full-parameter training toward
the dense model's logits (Minitron).
"""

from tasks.recover import bias, continued_pretraining, distill, lora, low_rank  # noqa: F401  (register the methods)
from tasks.recover.registry import (
    RECOVERY_METHODS,
    RecoveryCheck,
    RecoveryContext,
    RecoveryError,
    RecoveryMethod,
    RecoveryRun,
    get_recovery,
    recovery_names,
    register_recovery,
)

__all__ = [
    "RECOVERY_METHODS",
    "RecoveryCheck",
    "RecoveryContext",
    "RecoveryError",
    "RecoveryMethod",
    "RecoveryRun",
    "get_recovery",
    "recovery_names",
    "register_recovery",
]
