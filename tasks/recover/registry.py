"""The recovery registry: `recover.method` -> the method that heals a pruned model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from tasks.errors import UserError
from tasks.registry import Registry


class RecoveryError(UserError):
    pass


@dataclass
class RecoveryContext:
    """What a method may use besides the pruned model itself."""

    dense_path: str  # the unpruned model (adapter fits read its activations)
    calibration: torch.Tensor  # calibration windows of the run
    tokenizer_path: str
    state_dir: Path  # resumable training state lives here
    batch_windows: int
    log: Callable[[str], None] = print
    on_step: Callable[[int, int, float], None] | None = None  # training progress: (done, total, loss)


@dataclass
class RecoveryRun:
    model: nn.Module  # the recovered model, in pruneflow's in-memory form, ready to export
    losses: list[float] = field(default_factory=list)  # training loss per optimizer step
    fit: dict[str, float] = field(default_factory=dict)  # per removed unit: share of its output the adapter recovers
    trainable_params: int = 0
    resumed_from_step: int = 0


class RecoveryMethod:
    name: ClassVar[str]

    def run(self, model: nn.Module, settings: BaseModel, ctx: RecoveryContext, fingerprint: str) -> RecoveryRun:
        """Heal `model` in place or return a new one; `fingerprint` tags resumable training state."""
        raise NotImplementedError


RECOVERY_METHODS: Registry[RecoveryMethod] = Registry("recovery method", unknown=RecoveryError)


def register_recovery(cls: type[RecoveryMethod]) -> type[RecoveryMethod]:
    RECOVERY_METHODS.add(cls.name, cls())
    return cls


def recovery_names() -> list[str]:
    return RECOVERY_METHODS.names()


def get_recovery(name: str) -> RecoveryMethod:
    return RECOVERY_METHODS.lookup(name)
