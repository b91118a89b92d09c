"""Closed-form adapter fits: each removed block's input -> the output it used to add, by least squares.

Statistics are sums in float64 of x, y, x xᵀ and x yᵀ over calibration tokens. With `fit: dense`
(Siddiqui et al.) x is the residual stream the unit read in the dense model and y the delta it added,
all from one dense pass. With `fit: pruned` the adapters are fitted one after another, in model order,
on the pruned model's own stream: x is what reaches the adapter there (earlier adapters in place) and y
is what takes it to the dense model's stream after the unit, so each adapter also corrects the drift
that earlier removals left. A bias is the mean delta. A rank-r adapter is reduced-rank regression: the (ridge) least-squares
map W, restricted to the r directions of its fitted outputs with the most variance (W Vr Vrᵀ, Vr the
top eigenvectors of Wᵀ Σxx W), which is the exact rank-r least-squares solution when the ridge is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tasks.residual import ResidualRunner
from tasks.surgery.residual_adapters import unit_order


@dataclass
class UnitStats:
    n: int
    sum_x: torch.Tensor
    sum_y: torch.Tensor
    xx: torch.Tensor
    xy: torch.Tensor
    yy: float

    @classmethod
    def empty(cls, hidden: int) -> "UnitStats":
        z = dict(dtype=torch.float64)
        return cls(0, torch.zeros(hidden, **z), torch.zeros(hidden, **z), torch.zeros(hidden, hidden, **z),
                   torch.zeros(hidden, hidden, **z), 0.0)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double().cpu()
        y = y.reshape(-1, y.shape[-1]).double().cpu()
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_y += y.sum(0)
        self.xx += x.T @ x
        self.xy += x.T @ y
        self.yy += float((y * y).sum())

    def centered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mx, my = self.sum_x / self.n, self.sum_y / self.n
        return mx, my, self.xx / self.n - torch.outer(mx, mx), self.xy / self.n - torch.outer(mx, my)


@torch.inference_mode()
def collect_stats(dense: nn.Module, units: list[str], windows: torch.Tensor, batch_windows: int) -> dict[str, UnitStats]:
    """Input and added output of each unit in `units`, accumulated over the dense model's calibration pass."""
    runner = ResidualRunner(dense)
    wanted = set(units)
    unknown = sorted(wanted - {u.id for u in runner.units})
    if unknown:
        raise ValueError(f"the dense model has no units {unknown} to fit adapters for")
    stats = {u: UnitStats.empty(dense.config.hidden_size) for u in units}
    for batch in windows.split(batch_windows):
        hidden = runner.embed(batch)
        ctx = runner.context(hidden)
        layer_input = {}
        for unit in runner.units:
            layer_input.setdefault(unit.position, hidden)
            out = runner.apply(unit, hidden, ctx)
            if unit.id in wanted:
                # A parallel layer's MLP reads the layer input, so that is its x.
                x = layer_input[unit.position] if unit.parallel and unit.part == "mlp" else hidden
                stats[unit.id].add(x, out - hidden)
            hidden = out
    return stats


@dataclass
class Fit:
    bias: torch.Tensor
    down: torch.Tensor | None  # [rank, hidden]: nn.Linear weight of the down projection
    up: torch.Tensor | None  # [hidden, rank]
    # Share of the delta's energy (sum of squares, about zero) the fit explains on the data it was fitted on.
    explained: float


def fit_unit(stats: UnitStats, rank: int, ridge: float) -> Fit:
    mx, my, cxx, cxy = stats.centered()
    total = stats.yy / stats.n
    if rank == 0:
        return Fit(my, None, None, _explained(float(my @ my), total))
    hidden = cxx.shape[0]
    if ridge > 0:
        scale = float(torch.trace(cxx)) / hidden
        weight = torch.linalg.solve(cxx + ridge * scale * torch.eye(hidden, dtype=cxx.dtype), cxy)
    else:
        weight = torch.linalg.pinv(cxx, hermitian=True) @ cxy
    fitted_cov = weight.T @ cxx @ weight
    _, vectors = torch.linalg.eigh(fitted_cov)
    top = vectors[:, -rank:]  # eigh sorts eigenvalues ascending
    down = (weight @ top).T
    low_rank = weight @ top @ top.T
    bias = my - mx @ low_rank
    # The bias matches the means, so the error is all in the centred part: E||yc - xc W||².
    error = total - float(my @ my) - 2 * float(torch.trace(low_rank.T @ cxy)) + float(torch.trace(low_rank.T @ cxx @ low_rank))
    return Fit(bias, down.contiguous(), top.contiguous(), _explained(total - error, total))


def _explained(captured: float, total: float) -> float:
    """Share of E||y||² (the delta's energy about zero, which removing the block loses) the fit recovers."""
    return captured / total if total > 0 else 1.0


def fit_adapters(dense: nn.Module, units: list[str], windows: torch.Tensor, rank: int, ridge: float,
                 batch_windows: int) -> dict[str, Fit]:
    stats = collect_stats(dense, units, windows, batch_windows)
    return {unit: fit_unit(s, rank, ridge) for unit, s in stats.items()}


@torch.inference_mode()
def dense_states_after(dense: nn.Module, units: list[str], windows: torch.Tensor, batch_windows: int) -> dict[str, list[torch.Tensor]]:
    """The dense model's residual stream right after each unit, per micro-batch (kept on the CPU)."""
    runner = ResidualRunner(dense)
    wanted = set(units)
    out: dict[str, list[torch.Tensor]] = {u: [] for u in units}
    for batch in windows.split(batch_windows):
        hidden = runner.embed(batch)
        ctx = runner.context(hidden)
        for unit in runner.units:
            hidden = runner.apply(unit, hidden, ctx)
            if unit.id in wanted:
                out[unit.id].append(hidden.float().cpu())
    return out


@torch.inference_mode()
def _stats_in_pruned(pruned: nn.Module, unit_id: str, targets: list[torch.Tensor], windows: torch.Tensor,
                     batch_windows: int) -> UnitStats:
    runner = ResidualRunner(pruned)
    stats = UnitStats.empty(pruned.config.hidden_size)
    for batch, target in zip(windows.split(batch_windows), targets):
        hidden = runner.embed(batch)
        ctx = runner.context(hidden)
        layer_input = {}
        for unit in runner.units:
            layer_input.setdefault(unit.position, hidden)
            if unit.adapter and unit.id == unit_id:
                x = layer_input[unit.position] if unit.parallel and unit.part == "mlp" else hidden
                stats.add(x, target.to(hidden.device) - hidden)
                break
            hidden = runner.apply(unit, hidden, ctx)
    return stats


def fit_adapters_in_pruned(dense: nn.Module, pruned: nn.Module, units: list[str], windows: torch.Tensor, rank: int,
                           ridge: float, batch_windows: int, install: Callable[[str, Fit], None]) -> dict[str, Fit]:
    """Sequential fit (`fit: pruned`); `pruned` must carry (zero) adapters for `units`, which `install`
    sets one by one, so each fit sees the adapters before it."""
    targets = dense_states_after(dense, units, windows, batch_windows)
    fits = {}
    for unit in sorted(units, key=unit_order):
        fits[unit] = fit_unit(_stats_in_pruned(pruned, unit, targets[unit], windows, batch_windows), rank, ridge)
        install(unit, fits[unit])
    return fits
