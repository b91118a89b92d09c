"""The recovery registry: `recover.method` -> the method that heals a pruned model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import nn

from tasks.errors import UserError
from tasks.registry import Plugin, Registry
from tasks.settings import Settings


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
    trust_remote_code: bool = False  # the spec's model.trust_remote_code, for the tokenizer's folder


@dataclass
class RecoveryRun:
    model: nn.Module  # the recovered model, in pruneflow's in-memory form, ready to export
    losses: list[float] = field(default_factory=list)  # training loss per optimizer step
    fit: dict[str, float] = field(default_factory=dict)  # per removed unit: share of its output the adapter recovers
    trainable_params: int = 0
    resumed_from_step: int = 0
    # Dynamic batch loading: every update of the domain weights (step, weights, losses, reference).
    domains: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class RecoveryCheck:
    """What a method's preflight check may look at, before any model is loaded or file written."""

    prune_format: str  # `prune.format`, "auto" included
    positions: int | None  # the model's max_position_embeddings, where it has one
    # enough_tokens(source, needed, setting) raises a SourceError unless `source` gives `needed` tokens of
    # training text; its message names `setting` as what to shorten.
    enough_tokens: Callable[[str, int, str], None]


class RecoveryMethod(Plugin):
    """One recovery method: its name (`recover.method`), its settings section and what it checks and does."""

    name: ClassVar[str]
    # The `recover` section of this method: a Settings class whose `method` field is Literal[name].
    settings: ClassVar[type[Settings]]

    def check(self, settings: Settings, env: RecoveryCheck) -> None:
        """Refuse settings this model, prune format or data cannot serve (RecoveryError); default: none."""

    def run(self, model: nn.Module, settings: Settings, ctx: RecoveryContext, fingerprint: str) -> RecoveryRun:
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
