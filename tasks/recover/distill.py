"""`recover.method: distill`: the pruned model learns the dense model's next-token distributions (Minitron).

Each step's objective is alpha · T² · KL(teacher_T ‖ student_T) + (1 − alpha) · cross-entropy, where
·_T is the softmax of the logits divided by the temperature T, averaged over every position of the
batch. The T² factor keeps the gradients of the KL term on the same scale whatever T is (Hinton et
al.), so changing T does not also change the effective learning rate. The teacher is loaded once,
frozen; its logits exist for one batch at a time.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tasks.recover.registry import RecoveryMethod, RecoveryRun, register_recovery
from tasks.recover.training import StepsTraining, check_training, load_teacher, train


class DistillRecovery(StepsTraining):
    """Full-parameter training of the pruned model toward the dense model's logits (NVIDIA Minitron)."""

    method: Literal["distill"] = Field(description="Recovery method (pick another form to change it).")
    lr: float = Field(2e-5, gt=0.0, le=1.0, description="Peak learning rate (linear warm-up, then linear decay).")
    temperature: float = Field(
        1.0, gt=0.0, le=100.0, description="Softmax temperature of both distributions (the loss is scaled by T²)."
    )
    alpha: float = Field(
        1.0, gt=0.0, le=1.0,
        description="Weight of the KL term; 1 - alpha weighs the language-model cross-entropy "
        "(for cross-entropy alone use continued_pretraining).",
    )


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) of the softened next-token distributions, the mean over positions."""
    vocab = student_logits.shape[-1]
    # float32 whatever the model dtype: bf16 log-probabilities lose the small differences the KL measures.
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


class Distiller:
    """The training objective: the frozen teacher's logits for this batch only, then the mixed loss."""

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float):
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def __call__(self, student: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids, use_cache=False).logits
        mixed = self.alpha < 1.0
        out = student(input_ids=input_ids, labels=input_ids if mixed else None, use_cache=False)
        loss = self.alpha * distill_loss(out.logits, teacher_logits, self.temperature)
        return loss + (1.0 - self.alpha) * out.loss if mixed else loss


@torch.no_grad()
def kl_to_teacher(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, temperature: float = 1.0,
                  batch_windows: int = 4) -> float:
    """Mean per-position T² · KL(teacher ‖ student) over `windows`, a few windows at a time."""
    total, positions = 0.0, 0
    device = next(student.parameters()).device
    for start in range(0, windows.shape[0], batch_windows):
        ids = windows[start : start + batch_windows].to(device)
        loss = distill_loss(student(input_ids=ids, use_cache=False).logits,
                            teacher(input_ids=ids, use_cache=False).logits, temperature)
        total += float(loss) * ids.numel()
        positions += ids.numel()
    return total / positions


@register_recovery
class DistillMethod(RecoveryMethod):
    name = "distill"
    settings = DistillRecovery

    def check(self, settings, env):
        check_training(settings, [settings.dataset], env)

    def run(self, model, settings, ctx, fingerprint):
        teacher = load_teacher(ctx.dense_path, model)
        model.requires_grad_(True)
        log = train(model, settings.batches(ctx.tokenizer_path, ctx.trust_remote_code), settings.schedule("distill"),
                    ctx.state_dir, fingerprint, ctx.log, ctx.on_step,
                    loss_of=Distiller(teacher, settings.temperature, settings.alpha))
        model.requires_grad_(False)
        del teacher
        return RecoveryRun(model, losses=log.losses, trainable_params=log.trainable_params,
                           resumed_from_step=log.resumed_from_step)
