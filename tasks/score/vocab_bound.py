"""A lower bound on a window's next-token NLL that costs a fraction of the output head.

NLL_t = logsumexp_v z_v - z_target >= logsumexp over (S + target) of z_v - z_target for any subset S of
the vocabulary, since leaving terms out of a sum of exponentials only lowers it. When S holds the tokens
that carry most of the current model's probability mass, the bound sits a few percent under the exact
NLL at |S| / vocabulary of the head's matmul. A search candidate whose bound already exceeds the best
exact total cannot win, so it never needs the full head; the ones that might win get it, so the chosen
block is the one exact NLL sums pick.
"""

from __future__ import annotations

import torch
from torch import nn

# S is the fewest rows that hold this share of the current model's predicted probability mass, summed
# over the calibration positions; the bound then sits about -log(share) nats per token under the exact
# NLL (0.05 here). On SmolLM2-135M that is 4,267 of 49,152 rows, so a bound costs ~9% of the head.
MASS_SHARE = 0.95
# Past this share of the vocabulary a bound costs too much of an exact head to be worth it: predictions
# are too flat (random models, early checkpoints), and the scorer stops on exact partial sums instead.
MOST_ROWS = 0.25
# Float32 rounding can put a computed bound a few ulps above the computed exact NLL. The bound is
# lowered by this share of the magnitudes it was computed from, orders above that rounding, so that it
# stays below the exact value as the naive search would compute it.
RELATIVE_MARGIN = 1e-5


def subset_rows(mass: torch.Tensor, share: float = MASS_SHARE, most: float = MOST_ROWS) -> torch.Tensor | None:
    """The fewest vocabulary rows holding `share` of `mass`, sorted by id; None when that takes more than
    `most` of the vocabulary."""
    order = mass.argsort(descending=True)
    cumulative = mass[order].double().cumsum(0)
    count = int((cumulative < share * cumulative[-1]).sum()) + 1
    if count > most * mass.numel():
        return None
    return order[:count].sort().values


class VocabBound:
    """Per-window lower bounds on summed next-token NLL from the vocabulary rows `rows`."""

    def __init__(self, adapter, model: nn.Module, rows: torch.Tensor):
        self.adapter = adapter
        self.model = model
        head = adapter.lm_head(model)
        self.weight = head.weight
        self.bias = getattr(head, "bias", None)
        rows = rows.to(self.weight.device)
        self.subset_weight = self.weight[rows].contiguous()
        self.subset_bias = self.bias[rows].contiguous() if self.bias is not None else None
        self.member = torch.zeros(self.weight.shape[0], dtype=torch.bool, device=self.weight.device)
        self.member[rows] = True

    def window_bounds(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Lower bounds (float64, shape [batch]) on what `ResidualRunner.window_nll` returns."""
        targets = input_ids.to(hidden.device)[:, 1:]
        sums = []
        for row in range(hidden.shape[0]):
            features = self.adapter.head_input(self.model, hidden[row, :-1])
            raw_subset = features @ self.subset_weight.T
            if self.subset_bias is not None:
                raw_subset = raw_subset + self.subset_bias
            subset = self.adapter.shape_logits(self.model, raw_subset)
            target_weight = self.weight[targets[row]]
            raw_target = (features * target_weight).sum(-1)
            if self.bias is not None:
                raw_target = raw_target + self.bias[targets[row]]
            target = self.adapter.shape_logits(self.model, raw_target).float()
            lse = torch.logsumexp(subset.float(), dim=-1)
            # A target outside S joins the sum; one inside it is counted once.
            lse = torch.where(self.member[targets[row]], lse, torch.logaddexp(lse, target))
            bound = (lse - target).double().sum()
            margin = RELATIVE_MARGIN * (lse.abs() + target.abs()).double().sum()
            sums.append(bound - margin)
        return torch.stack(sums)
