"""The training loop every recovery method shares: seeded, with a progress bar, resumable.

Every `checkpoint_every` steps (and at the end) the trainable parameters, the optimizer and scheduler
state and the losses so far are written atomically to `state_dir/trainer.pt`. A run that finds a state
with its own fingerprint there continues from that step; batches depend only on (seed, step) and the
dropout generator is re-seeded per step, so a resumed run ends where an uninterrupted one would.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from tasks.export import load_checkpoint
from tasks.recover.data import TrainingStreams
from tasks.recover.registry import RecoveryCheck, RecoveryError
from tasks.settings import Settings

STATE_FILE = "trainer.pt"


class TrainingRecovery(Settings):
    """What every training method shares: schedule, windows, seed and resumable checkpoints."""

    lr: float = Field(2e-4, gt=0.0, le=1.0, description="Peak learning rate (linear warm-up, then linear decay).")
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Steps of linear learning-rate warm-up.")
    seq_len: int = Field(256, ge=8, le=131_072, description="Tokens per training window.")
    batch_size: int = Field(4, ge=1, le=4096, description="Windows per optimizer step.")
    seed: int = Field(0, ge=0, description="Seed of initialisation and of the windows each step draws.")
    checkpoint_every: int = Field(
        50, ge=1, le=1_000_000, description="Steps between resumable training checkpoints in the output folder."
    )


class StepsTraining(TrainingRecovery):
    """A training method on one text source for a number of optimizer steps (lora, distill)."""

    dataset: str = Field(
        "builtin:wiki-vital-en",
        min_length=1,
        description="Training text (builtin corpora train on their calibration part, never the evaluation split).",
    )
    steps: int = Field(100, ge=1, le=10_000_000, description="Optimizer steps.")

    def batches(self, tokenizer_path: str, trust_remote_code: bool = False) -> Callable[[int], torch.Tensor]:
        """Step -> its windows of `dataset`, drawn from just the text the steps need."""
        streams = TrainingStreams(tokenizer_path, {self.dataset: 1.0}, self.seq_len,
                                  self.steps * self.batch_size * self.seq_len, trust_remote_code)
        return lambda step: streams.batch(step, self.batch_size, self.seed)

    def schedule(self, label: str) -> TrainSettings:
        return TrainSettings(self.steps, self.lr, self.warmup_steps, self.seed, self.checkpoint_every, label)


def check_training(settings: TrainingRecovery, sources: list[str], env: RecoveryCheck) -> None:
    """Training windows fit the model's positions, and every source has at least one window of text."""
    if env.positions is not None and settings.seq_len > env.positions:
        raise RecoveryError(
            f"recover.seq_len {settings.seq_len} exceeds the model's {env.positions} positions "
            "(max_position_embeddings); use a shorter recover.seq_len"
        )
    for source in sources:
        env.enough_tokens(source, settings.seq_len + 1, "recover.seq_len")


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    lr: float
    warmup_steps: int
    seed: int
    checkpoint_every: int
    label: str  # progress-bar and log label


@dataclass
class TrainLog:
    losses: list[float]
    resumed_from_step: int
    trainable_params: int
    seconds: float


class StepHook(Protocol):
    """Something that follows training and is resumed with it (dynamic batch loading's domain weights)."""

    def after_step(self, done: int, model: nn.Module) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def load_teacher(dense_path: str, student: nn.Module) -> nn.Module:
    """The dense model, frozen, in the student's dtype and on its device."""
    param = next(student.parameters())
    teacher = load_checkpoint(dense_path, dtype=str(param.dtype).removeprefix("torch."), device=str(param.device))
    teacher.requires_grad_(False)
    return teacher.eval()


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


def _schedule(settings: TrainSettings) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        remaining = settings.steps - settings.warmup_steps
        return max(0.0, 1.0 - (step - settings.warmup_steps) / max(1, remaining))

    return factor


def train(model: nn.Module, batch_for_step: Callable[[int], torch.Tensor], settings: TrainSettings,
          state_dir: Path, fingerprint: str, log: Callable[[str], None] = print,
          on_step: Callable[[int, int, float], None] | None = None,
          loss_of: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lm_loss,
          hook: StepHook | None = None,
          groups: Callable[[dict[str, nn.Parameter]], list[dict]] | None = None) -> TrainLog:
    """Train the parameters of `model` that require grad; returns the loss of every step.

    `on_step(done, total, loss)` follows every step (the flow shows it as a Prefect progress artifact);
    `loss_of(model, input_ids)` is the objective (default: the language-model loss); `hook.after_step`
    runs after every optimizer step, and its state is saved and resumed with the trainer's; `groups(params)`
    splits the trained parameters into optimizer groups with their own learning rates."""
    started = time.perf_counter()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{settings.label}: nothing to train (no parameter requires grad)")
    optimizer = torch.optim.AdamW(list(params.values()) if groups is None else groups(params), lr=settings.lr,
                                  weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings))
    start, losses = _resume(state_dir, fingerprint, params, optimizer, scheduler, hook)
    if start:
        log(f"{settings.label}: resuming at step {start} of {settings.steps} from {state_dir / STATE_FILE}")
    device = next(iter(params.values())).device
    every = max(1, settings.steps // 10)
    model.train()
    # A caller that follows the steps draws its own bar (the flow's, shared with the Prefect UI).
    bar = tqdm(total=settings.steps, initial=start, desc=settings.label, unit="step", dynamic_ncols=True,
               disable=on_step is not None)
    try:
        for step in range(start, settings.steps):
            torch.manual_seed(settings.seed * 1_000_003 + step)  # dropout draws, reproducible per step
            loss = loss_of(model, batch_for_step(step).to(device))
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{settings.label}: loss is {loss.item()} at step {step}; lower the lr")
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.item()))
            if hook is not None:
                hook.after_step(step + 1, model)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            done = step + 1
            if on_step is not None:
                on_step(done, settings.steps, losses[-1])
            if done % every == 0 or done == settings.steps:
                log(f"{settings.label}: step {done}/{settings.steps} loss {losses[-1]:.4f}")
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                _save(state_dir, fingerprint, done, losses, params, optimizer, scheduler, hook)
    finally:
        bar.close()
        model.eval()
    trainable = sum(p.numel() for p in params.values())
    return TrainLog(losses, start, trainable, time.perf_counter() - started)


def _save(state_dir: Path, fingerprint: str, step: int, losses: list[float], params: dict[str, nn.Parameter],
          optimizer, scheduler, hook: StepHook | None = None) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{STATE_FILE}.tmp{os.getpid()}"
    torch.save({
        "fingerprint": fingerprint, "step": step, "losses": losses,
        "params": {n: p.detach().cpu() for n, p in params.items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "hook": None if hook is None else hook.state_dict(),
    }, tmp)
    os.replace(tmp, state_dir / STATE_FILE)


def _resume(state_dir: Path, fingerprint: str, params: dict[str, nn.Parameter], optimizer,
            scheduler, hook: StepHook | None = None) -> tuple[int, list[float]]:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return 0, []
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint or set(state["params"]) != set(params):
        return 0, []  # another configuration's state: this run starts over (and will overwrite it)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state["params"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if hook is not None and state.get("hook") is not None:
        hook.load_state_dict(state["hook"])
    return int(state["step"]), list(state["losses"])
