"""`recover.method: lora`: LoRA fine-tuning with PEFT, merged into the weights (Shortened LLaMA's recipe)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tasks.recover.registry import RecoveryError, RecoveryMethod, RecoveryRun, register_recovery
from tasks.registry import Extra
from tasks.recover.training import StepsTraining, check_training, train


def _peft():
    try:
        import peft
    except ImportError as err:
        raise RecoveryError(
            "recover.method 'lora' needs PEFT: pip install 'pruneflow[recover]' (or pip install peft)"
        ) from err
    return peft


class LoraRecovery(StepsTraining):
    """LoRA fine-tuning of the pruned model with PEFT, merged into the weights (Shortened LLaMA, scaled down)."""

    method: Literal["lora"] = Field(description="Recovery method (pick another form to change it).")
    rank: int = Field(8, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0.0, description="LoRA scaling numerator (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: tuple[str, ...] = Field(
        ("all-linear",),
        min_length=1,
        description="Module names LoRA adapts (PEFT's target_modules); all-linear: every linear layer but the head.",
    )


@register_recovery
class LoraMethod(RecoveryMethod):
    name = "lora"
    settings = LoraRecovery
    extra = Extra(("peft",), "pip install 'pruneflow[recover]' (or pip install peft)")

    def check(self, settings, env):
        check_training(settings, [settings.dataset], env)

    def run(self, model, settings, ctx, fingerprint):
        peft = _peft()
        torch.manual_seed(settings.seed)
        targets = "all-linear" if settings.target_modules == ("all-linear",) else list(settings.target_modules)
        config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                 target_modules=targets, bias="none", task_type="CAUSAL_LM")
        try:
            wrapped = peft.get_peft_model(model, config)
        except ValueError as err:
            raise RecoveryError(f"recover.target_modules {list(settings.target_modules)}: {err}") from err
        log = train(wrapped, settings.batches(ctx.tokenizer_path, ctx.trust_remote_code), settings.schedule("lora"),
                    ctx.state_dir, fingerprint, ctx.log, ctx.on_step)
        merged = wrapped.merge_and_unload()
        merged.requires_grad_(False)
        return RecoveryRun(merged, losses=log.losses, trainable_params=log.trainable_params,
                           resumed_from_step=log.resumed_from_step)
