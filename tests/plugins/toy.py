"""A plugin as a user would write one, outside pruneflow's own modules: one metric, one strategy, one
recovery method, one export format and one evaluator, each one class or function and one registration
(`PRUNEFLOW_PLUGINS=tests.plugins.toy`)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tasks.evaluation import Evaluation, Evaluator, register_evaluator
from tasks.export.hf import HfFormat
from tasks.export.registry import register_format
from tasks.registry import Extra
from tasks.recover import RecoveryError, RecoveryMethod, RecoveryRun, register_recovery
from tasks.score import register_metric
from tasks.score.states import BlockStateMetric
from tasks.search import register_strategy
from tasks.settings import Settings


@register_metric
class ToySquaredUpdate(BlockStateMetric):
    """Mean squared size of a block's update: the smallest goes first."""

    name = "toy_squared_update"
    remove = "lowest"

    def statistic(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return (outputs - inputs).pow(2).mean(dim=-1)


@register_metric
class ToyNeedsAnExtra(ToySquaredUpdate):
    """The same metric, but it declares an optional extra that is not installed anywhere."""

    name = "toy_needs_an_extra"
    extra = Extra(("pruneflow_toy_absent_module",), "pip install 'pruneflow-toy[absent]'")


@register_strategy("toy_most_important_first")
def most_important_first(ctx):
    """Scores once and removes the blocks the metric ranks most important (a test of the plumbing)."""
    candidates = ctx.candidates([])
    scores = ctx.score_step(0, [], candidates)
    plan = []
    for block in reversed(ctx.ranked(scores, candidates)):
        if ctx.target_met([b for b, _ in plan]):
            break
        plan.append((block, scores[block].value))
    return ctx.commit_plan(plan, [scores])


class ToyScaleRecovery(Settings):
    method: Literal["toy_scale_head"]
    scale: float = Field(1.0, gt=0.0, le=10.0, description="Factor applied to the output head's weights.")
    min_positions: int = Field(0, ge=0, description="Refuse models with fewer positions than this.")


@register_recovery
class ToyScaleHead(RecoveryMethod):
    name = "toy_scale_head"
    settings = ToyScaleRecovery

    def check(self, settings, env):
        if env.positions is not None and env.positions < settings.min_positions:
            raise RecoveryError(f"recover.min_positions {settings.min_positions}: the model has {env.positions}")

    def run(self, model, settings, ctx, fingerprint):
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(settings.scale)
        return RecoveryRun(model=model)


@register_format
class ToyHfWithNote(HfFormat):
    """The `hf` layout plus a note naming the removed blocks; claims only the checkpoints it wrote."""

    name = "toy_hf_note"

    def write(self, model, out_dir):
        super().write(model, out_dir)
        (out_dir / "TOY_NOTE.txt").write_text("removed layers: " + ", ".join(self.removed(out_dir)) + "\n")

    @staticmethod
    def removed(out_dir) -> list[str]:
        import json

        record = json.loads((out_dir / "config.json").read_text())["pruneflow"]
        return record["removed"]

    def claims(self, config):
        return config.get("pruneflow", {}).get("format") == self.name


@register_evaluator
class ToyLayersKept(Evaluator):
    """How many decoder layers the evaluated model still runs, as a size row."""

    name = "toy_layers_kept"

    def evaluate(self, given):
        return [Evaluation(given.stage, "size", "-", "toy_layers_kept", float(len(given.model.model.layers)))]
