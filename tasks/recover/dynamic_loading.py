"""Dynamic batch loading (Sheared LLaMA, Xia et al. 2024, after DoReMi): during continued pretraining, the
share of each domain's windows follows how far its loss is above a reference.

Every `every` steps the model's loss on each domain's held-apart windows is measured, and the domain
weights move as α ← softmax(log α + η · max(ℓ − ℓ_ref, 0)) (the paper clips at zero: a domain already
at its reference gets no push), then α ← (1 − c) · α + c / k towards uniform. The reference losses are
given, or measured on the dense model on the same windows before training. The weights and losses of
every update are kept, saved with the trainer's checkpoints and resumed with them.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from tasks.recover.data import TrainingStreams
from tasks.settings import Settings


class DomainLoss(Settings):
    source: str = Field(min_length=1, description="A source of recover.datasets.")
    loss: float = Field(gt=0.0, description="Its reference loss (nats per token).")


class DynamicLoading(Settings):
    """`recover.dynamic`: how the domain weights follow the domains' losses."""

    every: int = Field(10, ge=1, le=1_000_000, description="Steps between two updates of the domain weights.")
    eta: float = Field(1.0, gt=0.0, le=100.0, description="Step size of the update (η).")
    smoothing: float = Field(0.05, ge=0.0, lt=1.0, description="Share of uniform mixed into the weights (c).")
    eval_windows: int = Field(4, ge=1, le=4096, description="Held-apart windows per domain the loss is measured on.")
    reference_losses: tuple[DomainLoss, ...] | None = Field(
        None, description="Per domain (its source as in recover.datasets): the loss to reach; default: the "
        "dense model's on the same windows.")

    def references(self) -> dict[str, float] | None:
        return None if self.reference_losses is None else {r.source: r.loss for r in self.reference_losses}


def domain_losses(model: nn.Module, streams: TrainingStreams, batch: int = 1) -> dict[str, float]:
    """Mean next-token loss of `model` on each domain's held-apart windows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {}
    with torch.no_grad():
        for source in streams.sources:
            windows = streams.held[source]
            total = sum(float(model(input_ids=w.to(device), labels=w.to(device), use_cache=False).loss) * w.shape[0]
                        for w in windows.split(batch))
            out[source] = total / windows.shape[0]
    model.train(was_training)
    return out


def updated(weights: torch.Tensor, losses: torch.Tensor, reference: torch.Tensor, eta: float,
            smoothing: float) -> torch.Tensor:
    excess = (losses - reference).clamp(min=0.0)
    moved = torch.softmax(weights.log() + eta * excess, dim=0)
    return (1 - smoothing) * moved + smoothing / weights.numel()


class DomainWeights:
    """The trainer's step hook: current weights, their history, resumable."""

    def __init__(self, streams: TrainingStreams, settings: DynamicLoading, reference: dict[str, float]):
        self.streams, self.settings = streams, settings
        self.reference = torch.tensor([reference[s] for s in streams.sources], dtype=torch.float64)
        self.weights = streams.weights / streams.weights.sum()
        self.history: list[dict] = [{"step": 0, "weights": self._named(self.weights), "losses": {}}]

    def _named(self, values: torch.Tensor) -> dict[str, float]:
        return {s: float(v) for s, v in zip(self.streams.sources, values)}

    def after_step(self, done: int, model: nn.Module) -> None:
        if done % self.settings.every:
            return
        losses = domain_losses(model, self.streams)
        values = torch.tensor([losses[s] for s in self.streams.sources], dtype=torch.float64)
        self.weights = updated(self.weights, values, self.reference, self.settings.eta, self.settings.smoothing)
        self.history.append({"step": done, "weights": self._named(self.weights), "losses": losses})

    def state_dict(self) -> dict:
        return {"weights": self.weights.tolist(), "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.weights = torch.tensor(state["weights"], dtype=torch.float64)
        self.history = list(state["history"])

    def trace(self) -> list[dict]:
        """Every update: its step, the weights after it and the losses it saw; with the references."""
        return [{**h, "reference": self._named(self.reference)} for h in self.history]
