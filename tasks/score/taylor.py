"""First-order Taylor importance (Shortened LLaMA's Taylor criterion, Kim et al., 2024): the loss change
a first-order expansion predicts when a block's weights are zeroed, |w * dL/dw| summed over every
parameter of the block. L is the mean NLL over all calibration predictions; gradients of every window
are accumulated before taking the absolute value, as the paper's code does. The least important goes
first. Shortened LLaMA's "Taylor+" also keeps the first four and last two layers: `search.protect_first`
and `search.protect_last`.
"""

from __future__ import annotations


import torch
from torch import nn

from tasks.residual import ResidualRunner, Unit
from tasks.score.base import CandidateScore, Metric, OnScore, ScoringOptions, register_metric, score_all_at_once
from tasks.score.prefix_reuse import WorkCounter
from tasks.surgery import units_of


class TaylorScorer:
    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_windows: int):
        self.model = model
        self.runner = ResidualRunner(model)
        self.batches = [b.contiguous() for b in windows.split(batch_windows)]
        self.n_predictions = windows.shape[0] * (windows.shape[1] - 1)
        self.work = WorkCounter()

    def unit_parameters(self, unit: Unit) -> list[nn.Parameter]:
        adapter = self.runner.adapter
        names = adapter.attn_names if unit.part == "attn" else adapter.mlp_names
        layer = self.runner.layers[unit.position]
        return [p for name in names for p in getattr(layer, name).parameters()]

    def score(
        self, removed: set[str], candidates: list[str], known: dict[str, CandidateScore], on_score: OnScore
    ) -> dict[str, CandidateScore]:
        return score_all_at_once(candidates, known, on_score, self.n_predictions,
                                 lambda todo: self._importance_of(removed, todo))

    def _importance_of(self, removed: set[str], todo: list[str]) -> dict[str, float]:
        active = self.runner.active(removed)
        by_id = {u.id: u for u in active}
        params = {block: [p for u in sorted(units_of([block])) if u in by_id for p in self.unit_parameters(by_id[u])]
                  for block in todo}
        return self._importance(active, params)

    def _importance(self, active: list[Unit], params: dict[str, list[nn.Parameter]]) -> dict[str, float]:
        wanted = {id(p) for ps in params.values() for p in ps}
        everything = list(self.model.parameters())
        saved = [(p, p.requires_grad, p.grad) for p in everything]
        try:
            # Gradients only where they are read: the embeddings and the head need none.
            for p in everything:
                p.requires_grad_(id(p) in wanted)
                p.grad = None
            with torch.enable_grad():
                for batch in self.batches:
                    hidden = self.runner.embed(batch)
                    ctx = self.runner.context(hidden)
                    hidden = self.runner.run(hidden, ctx, active)
                    loss = self.runner.window_nll(hidden, batch).sum() / self.n_predictions
                    loss.backward()
                    self.work.unit_windows += 2 * len(active) * batch.shape[0]  # forward and backward
                    self.work.head_windows += batch.shape[0]
            return {
                block: float(sum((p.detach().double() * p.grad.double()).abs().sum() for p in ps if p.grad is not None))
                for block, ps in params.items()
            }
        finally:
            for p, requires_grad, grad in saved:
                p.requires_grad_(requires_grad)
                p.grad = grad


@register_metric
class Taylor(Metric):
    name = "taylor"
    remove = "lowest"
    needs_grad = True
    measures = "block"

    def scorer(self, model: nn.Module, windows: torch.Tensor, options: ScoringOptions) -> TaylorScorer:
        return TaylorScorer(model, windows, options.batch_windows)
