"""The `recover` section: one settings class per recovery method, chosen by `method`."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from tasks.settings import Settings


class NoRecovery(Settings):
    method: Literal["none"] = "none"


class _AdapterRecovery(Settings):
    """Adapters fitted in closed form on the dense model's calibration activations, optionally refined."""

    ridge: float = Field(
        1e-4, ge=0.0, le=1.0,
        description="Ridge term of the least-squares fit, relative to the mean input variance (0: plain least squares).",
    )
    fit: Literal["dense", "pruned"] = Field(
        "dense",
        description=(
            "dense: each adapter maps the block's input to the output it added, in the dense model (Siddiqui et al.); "
            "pruned: fitted in model order on the pruned model's own stream toward the dense stream after the block."
        ),
    )
    refine_steps: int = Field(
        0, ge=0, le=1_000_000,
        description="Optional gradient refinement: steps of Adam on the language-model loss of calibration windows.",
    )
    refine_lr: float = Field(1e-3, gt=0.0, le=1.0, description="Learning rate of the refinement.")
    batch_windows: int = Field(4, ge=1, le=4096, description="Calibration windows per refinement step.")
    seed: int = Field(0, ge=0, description="Seed of the refinement's batch order.")


class BiasRecovery(_AdapterRecovery):
    """Each removed block becomes a learned additive bias on the residual stream (Siddiqui et al. 2024)."""

    method: Literal["bias"]


class LowRankRecovery(_AdapterRecovery):
    """Each removed block becomes a low-rank linear map of its input plus a bias (Siddiqui et al. 2024)."""

    method: Literal["low_rank"]
    rank: int = Field(8, ge=1, le=65_536, description="Rank of each adapter's linear map.")


class _TrainingRecovery(Settings):
    lr: float = Field(2e-4, gt=0.0, le=1.0, description="Peak learning rate (linear warm-up, then linear decay).")
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="Steps of linear learning-rate warm-up.")
    seq_len: int = Field(256, ge=8, le=131_072, description="Tokens per training window.")
    batch_size: int = Field(4, ge=1, le=4096, description="Windows per optimizer step.")
    seed: int = Field(0, ge=0, description="Seed of initialisation and of the windows each step draws.")
    checkpoint_every: int = Field(
        50, ge=1, le=1_000_000, description="Steps between resumable training checkpoints in the output folder."
    )


class LoraRecovery(_TrainingRecovery):
    """LoRA fine-tuning of the pruned model with PEFT, merged into the weights (Shortened LLaMA, scaled down)."""

    method: Literal["lora"]
    dataset: str = Field(
        "builtin:wiki-vital-en",
        min_length=1,
        description="Training text (builtin corpora train on their calibration part, never the evaluation split).",
    )
    steps: int = Field(100, ge=1, le=10_000_000, description="Optimizer steps.")
    rank: int = Field(8, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0.0, description="LoRA scaling numerator (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: tuple[str, ...] = Field(
        ("all-linear",),
        min_length=1,
        description="Module names LoRA adapts (PEFT's target_modules); all-linear: every linear layer but the head.",
    )


class WeightedSource(Settings):
    source: str = Field(min_length=1, description="Training text: builtin corpus, local file or hub dataset.")
    weight: float = Field(1.0, gt=0.0, description="Mixing weight (relative to the other sources').")


class ContinuedPretrainingRecovery(_TrainingRecovery):
    """Full-parameter training for a token budget (Shortened LLaMA v2, Sheared LLaMA), optionally mixing domains."""

    method: Literal["continued_pretraining"]
    tokens: int = Field(65_536, ge=8, le=10**13, description="Training token budget (steps = tokens / (batch x seq_len)).")
    lr: float = Field(2e-5, gt=0.0, le=1.0, description="Peak learning rate (linear warm-up, then linear decay).")
    datasets: tuple[WeightedSource, ...] = Field(
        (WeightedSource(source="builtin:wiki-vital-en"),),
        min_length=1,
        description="Training text sources and their mixing weights (each window is drawn from one source).",
    )

    def mixture(self) -> dict[str, float]:
        """Source -> share of the training windows (weights of a repeated source add up)."""
        total = sum(d.weight for d in self.datasets)
        shares: dict[str, float] = {}
        for d in self.datasets:
            shares[d.source] = shares.get(d.source, 0.0) + d.weight / total
        return shares


RecoverSpec = Annotated[
    Union[NoRecovery, BiasRecovery, LowRankRecovery, LoraRecovery, ContinuedPretrainingRecovery],
    Field(discriminator="method"),
]
