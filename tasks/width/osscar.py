"""`width.strategy: osscar` (Meng et al., ICML 2024; AMD Quark's OSSCAR): per layer, remove the MLP channels
(and attention heads) whose loss the layer's other weights can best make up for, then refit those weights.

For each pruned unit in model order, on the calibration inputs of its output projection (down_proj for MLP
channels, o_proj for heads): greedy elimination, `update_iter` groups at a time; a local search of swaps;
an exact refit of the kept columns (see `tasks.width.reconstruction`). True sequential (the default): a
unit's inputs come from the model whose earlier units are already pruned and refit, while its target stays
its own output on those inputs (G = H·W0ᵀ). Attention under grouped-query attention: whole KV groups first
(down to num_key_value_heads), then query heads inside the kept groups, the same number in each; the local
search swaps MLP channels and KV groups, not the query heads of a group.

Per unit the relative error of its output against the dense model's (‖X·Wᵀ − Y_dense‖² / ‖Y_dense‖²) at
each stage: `before` (the drift that earlier pruning brought in), `greedy`, `swaps`, `refit`, and `cut`
(the final kept columns as they were, which is what the refit turned off writes).
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Iterator

import torch
from pydantic import Field
from torch import nn

from tasks.residual import ResidualRunner, Unit
from tasks.settings import Settings
from tasks.surgery.width import LayerWidth, WidthError, WidthPlan, dense_widths, output_projection
from tasks.width.importance import UnitScores
from tasks.width.plan import (Calibration, PlanOutcome, WidthShape, refuse_unprunable_heads,
                              register_width_strategy, resolve_shape, resolved_heads)
from tasks.width.reconstruction import Problem, Reconstruction, eliminate, local_search


class OsscarSettings(Settings):
    """`width.osscar`: Quark's OSSCARConfig, and the switches that show what each step brings."""

    damp_percent: float = Field(0.01, ge=0.0, lt=1.0, description="H is damped by this share of its mean diagonal.")
    update_iter: int = Field(4, ge=1, description="Groups removed at once between two updates of the weights and "
                             "H⁻¹ (1: one at a time, the exact greedy).")
    swap_rounds: int = Field(8, ge=0, description="Local-search rounds per unit (0: the greedy choice stays).")
    swap_size: int = Field(16, ge=1, description="Groups exchanged in the first swap; halved after one that fails.")
    refit: bool = Field(True, description="Refit the kept columns exactly (false: they keep their dense values).")
    sequential: bool = Field(True, description="Each layer's inputs come from the already pruned earlier layers "
                             "(false: every layer is pruned on the dense model's inputs).")
    round_to: int = Field(128, ge=1, description="Kept MLP widths are rounded up to a multiple of this (never above "
                          "the model's).")


def kept_channels(asked: int | None, round_to: int, dense: int) -> int:
    if asked is None:
        return dense
    return min(dense, math.ceil(asked / round_to) * round_to)


@register_width_strategy("osscar", OsscarSettings, scores_units=False, prunes_hidden=False,
                         description="layer-wise reconstruction: greedy elimination, swaps, refit (AMD Quark)")
def osscar_plan(model: nn.Module, scores: UnitScores | None, shape: WidthShape, calibration: Calibration,
                **settings) -> PlanOutcome:
    options = OsscarSettings(**settings)
    dense = dense_widths(model)
    shape = resolve_shape(shape, dense)
    if shape.hidden_size not in (None, dense["hidden"]):
        raise WidthError("width.shape.hidden_size: osscar reconstructs heads and MLP channels, not the hidden "
                         "size; leave hidden_size out or use strategy uniform")  # the spec refuses it first
    heads, kv = resolved_heads(shape, dense)
    target = {"channels": kept_channels(shape.intermediate_size, options.round_to, dense["channels"]),
              "heads": heads, "kv_heads": kv}
    refuse_unprunable_heads(model, heads, kv)
    return _Pass(model, calibration, options, dense, target).run()


class _Pass:
    """One pass through the model, unit by unit, pruning as it goes."""

    def __init__(self, model: nn.Module, calibration: Calibration, options: OsscarSettings,
                 dense: dict[str, int], target: dict[str, int]):
        self.options, self.dense, self.target = options, dense, target
        self.dense_runner = ResidualRunner(model)
        # The model being pruned, masked in place (removed columns zero) so it computes what the sliced one will.
        self.work = copy.deepcopy(model) if options.sequential else model
        self.work_runner = ResidualRunner(self.work) if options.sequential else self.dense_runner
        self.calibration = calibration
        self.outcome = PlanOutcome(WidthPlan(), scores=UnitScores())
        self.layers: dict[int, dict[str, tuple[int, ...]]] = {}

    def _prunes(self, unit: Unit) -> bool:
        if unit.adapter:
            return False
        if unit.part == "mlp":
            return self.target["channels"] < self.dense["channels"]
        return (self.target["heads"], self.target["kv_heads"]) != (self.dense["heads"], self.dense["kv_heads"])

    def run(self) -> PlanOutcome:
        with torch.inference_mode():
            dense_states = [self.dense_runner.embed(b) for b in self._batches()]
            contexts = [self.dense_runner.context(h) for h in dense_states]
            work_states = [h.clone() for h in dense_states] if self.options.sequential else dense_states
        todo = [u for u in self.dense_runner.units if self._prunes(u)]
        for unit in self.dense_runner.units:
            if self._prunes(unit):
                problem, dense_states = self._collect(unit, dense_states, work_states, contexts)
                self._prune(unit, problem)
                if self.calibration.on_unit is not None:
                    self.calibration.on_unit(todo.index(unit) + 1, len(todo))
            else:
                dense_states = self._advance(self.dense_runner, unit, dense_states, contexts)
            if self.options.sequential:
                work_states = self._advance(self.work_runner, unit, work_states, contexts)
            else:
                work_states = dense_states
        self.outcome.plan = WidthPlan(layers={lid: LayerWidth(**kept) for lid, kept in self.layers.items()})
        return self.outcome

    def _batches(self) -> Iterator[torch.Tensor]:
        yield from self.calibration.windows.split(self.calibration.batch_windows)

    @staticmethod
    def _advance(runner: ResidualRunner, unit: Unit, states: list[torch.Tensor], contexts) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [runner.apply(unit, h, ctx) for h, ctx in zip(states, contexts)]

    def _collect(self, unit: Unit, dense_states, work_states, contexts) -> tuple[Problem, list[torch.Tensor]]:
        """H, XᵀY_dense and ‖Y_dense‖² of the unit's output projection; the dense stream moves past the unit."""
        dense_proj = output_projection(self.dense_runner.model, unit.id)
        w0 = dense_proj.weight.detach().double().cpu()
        stats = {"hessian": torch.zeros(w0.shape[1], w0.shape[1], dtype=torch.float64),
                 "cross": torch.zeros(w0.shape[1], w0.shape[0], dtype=torch.float64), "target": 0.0}
        seen: dict[str, torch.Tensor] = {}
        hooks = [dense_proj.register_forward_pre_hook(_keep(seen, "dense"))]
        if self.options.sequential:
            hooks.append(output_projection(self.work, unit.id).register_forward_pre_hook(_keep(seen, "work")))
        moved = []
        try:
            with torch.inference_mode():
                for h_dense, h_work, ctx in zip(dense_states, work_states, contexts):
                    moved.append(self.dense_runner.apply(unit, h_dense, ctx))
                    if self.options.sequential:
                        self.work_runner.apply(unit, h_work, ctx)
                    x_dense = seen.pop("dense")
                    x_work = seen.pop("work", x_dense)
                    y = x_dense @ dense_proj.weight.T.float()
                    stats["hessian"] += (x_work.T @ x_work).double().cpu()
                    stats["cross"] += (x_work.T @ y).double().cpu()
                    stats["target"] += float(y.double().pow(2).sum())
        finally:
            for hook in hooks:
                hook.remove()
        return Problem(w0, stats["hessian"], stats["cross"], stats["target"], self.options.damp_percent), moved

    def _prune(self, unit: Unit, problem: Problem) -> None:
        lid = int(unit.id.split(".")[1])
        state = Reconstruction(problem)
        errors = {"before": problem.error(problem.w0)}
        if unit.part == "mlp":
            units = torch.arange(self.dense["channels"])[:, None]
            self.outcome.scores.channels[lid] = state.costs(units).float()
            alive = self._choose(state, problem, units, self.dense["channels"] - self.target["channels"], errors)
            kept = {"channels": tuple(alive.nonzero().flatten().tolist())}
        else:
            alive_groups, alive_heads = self._choose_heads(state, problem, lid, errors)
            kept = {"kv_heads": tuple(alive_groups.nonzero().flatten().tolist()),
                    "heads": tuple(alive_heads.nonzero().flatten().tolist())}
        columns = state.kept
        cut = problem.w0 * columns
        errors["cut"] = problem.error(cut)
        if self.options.refit:
            state.refit(columns)
            errors["refit"] = problem.error(state.w)
        written = state.w if self.options.refit else cut
        self.outcome.errors[unit.id] = errors
        self.outcome.weights[unit.id] = written[:, columns].float().contiguous()
        self.layers.setdefault(lid, {}).update(kept)
        if self.options.sequential:
            with torch.no_grad():
                output_projection(self.work, unit.id).weight.copy_(written.float())

    def _choose(self, state: Reconstruction, problem: Problem, units: torch.Tensor, remove: int,
                errors: dict[str, float], swaps: bool = True) -> torch.Tensor:
        alive = eliminate(state, units, remove, self.options.update_iter)
        errors["greedy"] = problem.error(state.w)
        if swaps and self.options.swap_rounds > 0:
            alive, _ = local_search(state, units, alive, self.options.swap_rounds, self.options.swap_size)
            errors["swaps"] = problem.error(state.w)
        return alive

    def _choose_heads(self, state: Reconstruction, problem: Problem, lid: int, errors: dict[str, float]):
        """KV groups first, then query heads inside the kept groups (the same number in each)."""
        size, heads, kv = self.dense["head_dim"], self.dense["heads"], self.dense["kv_heads"]
        group = heads // kv
        head_cols = torch.arange(heads * size).view(heads, size)
        self.outcome.scores.heads[lid] = state.costs(head_cols).float()
        alive_groups = torch.ones(kv, dtype=torch.bool)
        inner = self.target["heads"] // self.target["kv_heads"] < group
        if self.target["kv_heads"] < kv:
            alive_groups = self._choose(state, problem, head_cols.view(kv, group * size),
                                        kv - self.target["kv_heads"], errors, swaps=not inner)
        alive_heads = alive_groups.repeat_interleave(group)
        if inner:
            candidates = alive_heads.nonzero().flatten()
            kept_inner = eliminate(state, head_cols[candidates], candidates.numel() - self.target["heads"],
                                   self.options.update_iter, buckets=candidates // group,
                                   keep_per_bucket=self.target["heads"] // self.target["kv_heads"])
            alive_heads[candidates[~kept_inner]] = False
            errors["greedy"] = problem.error(state.w)
        return alive_groups, alive_heads


def _keep(seen: dict[str, torch.Tensor], key: str) -> Callable:
    def hook(_module, args):
        x = args[0]
        seen[key] = x.reshape(-1, x.shape[-1]).float()
    return hook
