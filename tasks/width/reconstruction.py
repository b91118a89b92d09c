"""Layer-wise reconstruction of one projection after some of its input units are removed (OSSCAR's algebra).

The projection W0 [out, in] reads units that are blocks of its input columns (an MLP channel: one column of
down_proj; a head: head_dim columns of o_proj). On calibration inputs X, with H = XᵀX damped by
λ = damp · mean(diag H) and G = H·W0ᵀ, the best weights on a kept column set S are W_S = H_SS⁻¹·G_S and the
objective tr(W H Wᵀ) − 2·tr(W G) falls to −tr(G_Sᵀ H_SS⁻¹ G_S). Everything here is float64: the
downdates of H⁻¹ lose precision in float32 long before a layer is done.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Problem:
    """One projection's statistics: `hessian` XᵀX of its (possibly already pruned) inputs, `cross` XᵀY of
    those inputs with the dense model's outputs Y of this projection, and `target` ‖Y‖²."""

    w0: torch.Tensor  # [out, in]
    hessian: torch.Tensor  # [in, in]
    cross: torch.Tensor  # [in, out]
    target: float
    damp: float

    def damped(self) -> torch.Tensor:
        lam = self.damp * float(self.hessian.diagonal().mean())
        return self.hessian + lam * torch.eye(self.hessian.shape[0], dtype=self.hessian.dtype)

    def error(self, w: torch.Tensor) -> float:
        """‖X·Wᵀ − Y‖² / ‖Y‖²: how far the projection's output with `w` is from the dense model's."""
        fit = float(((w @ self.hessian) * w).sum()) - 2 * float((w * self.cross.T).sum()) + self.target
        return max(fit, 0.0) / self.target if self.target > 0 else 0.0


class Reconstruction:
    """The greedy elimination's state: weights and H⁻¹ over all columns, zero on removed ones."""

    def __init__(self, problem: Problem):
        self.hd = problem.damped()
        self.g = self.hd @ problem.w0.T  # [in, out]: the layer reproduces its own output
        self.w0 = problem.w0
        self.kept = torch.ones(self.hd.shape[0], dtype=torch.bool)
        self.w = problem.w0.clone()
        self.hinv = torch.cholesky_inverse(torch.linalg.cholesky(self.hd))

    def costs(self, units: torch.Tensor) -> torch.Tensor:
        """Per unit (rows of column indices, [n, d]): the objective's rise when it alone is removed and the
        other kept columns are updated, tr(W_u [H⁻¹]_uu⁻¹ W_uᵀ)."""
        if units.shape[1] == 1:  # one column each: a division (a batched solve of 1x1 systems is ~100x slower)
            cols = units[:, 0]
            return self.w[:, cols].pow(2).sum(dim=0) / self.hinv[cols, cols]
        blocks = torch.linalg.inv(self.hinv[units[:, :, None], units[:, None, :]])  # [n, d, d], d small
        wu = self.w[:, units].permute(1, 2, 0)  # [n, d, out]
        return torch.einsum("nio,nij,njo->n", wu, blocks, wu)

    def remove(self, columns: torch.Tensor) -> None:
        """Remove `columns` at once, updating the kept weights and downdating H⁻¹ (the OBS step)."""
        step = torch.linalg.solve(self.hinv[columns][:, columns], self.hinv[columns, :])  # [r, in]
        self.w -= self.w[:, columns] @ step
        self.hinv -= self.hinv[:, columns] @ step
        self.w[:, columns] = 0
        self.hinv[columns, :] = 0
        self.hinv[:, columns] = 0
        self.kept[columns] = False

    def refit(self, kept: torch.Tensor) -> float:
        """Set the support to `kept` with its exact least-squares weights and H⁻¹; the objective there."""
        cols = kept.nonzero().flatten()
        chol = torch.linalg.cholesky(self.hd[cols][:, cols])
        ws = torch.cholesky_solve(self.g[cols], chol)  # [s, out]
        self.kept = kept.clone()
        self.w = torch.zeros_like(self.w0)
        self.w[:, cols] = ws.T
        self.hinv = torch.zeros_like(self.hd)
        self.hinv[cols[:, None], cols[None, :]] = torch.cholesky_inverse(chol)
        return -float((self.g[cols] * ws).sum())

    def objective(self) -> float:
        return float(((self.w @ self.hd) * self.w).sum()) - 2 * float((self.w * self.g.T).sum())


def eliminate(state: Reconstruction, units: torch.Tensor, remove: int, per_step: int,
              buckets: torch.Tensor | None = None, keep_per_bucket: int = 0) -> torch.Tensor:
    """Greedily remove `remove` of `units` ([n, d] column blocks), `per_step` at a time, each time the cheapest;
    with `buckets` (a bucket id per unit), no bucket drops below `keep_per_bucket` units. Returns the kept
    mask over units. Ties go to the lower unit index."""
    alive = torch.ones(units.shape[0], dtype=torch.bool)
    left = {int(b): int((buckets == b).sum()) for b in buckets.unique()} if buckets is not None else {}
    removed = 0
    while removed < remove:
        idx = alive.nonzero().flatten()
        costs = state.costs(units[idx])
        chosen: list[int] = []
        for i in sorted(range(idx.numel()), key=lambda i: (float(costs[i]), int(idx[i]))):
            unit = int(idx[i])
            if buckets is not None:
                b = int(buckets[unit])
                if left[b] <= keep_per_bucket:
                    continue
                left[b] -= 1
            chosen.append(unit)
            if len(chosen) == min(per_step, remove - removed):
                break
        state.remove(units[chosen].flatten())
        alive[chosen] = False
        removed += len(chosen)
    return alive


def local_search(state: Reconstruction, units: torch.Tensor, alive: torch.Tensor, rounds: int,
                 size: int) -> tuple[torch.Tensor, int]:
    """Swap rounds: drop the `size` kept units of least cost, add back the `size` others whose return gains
    most (the Schur complement of the kept columns), keep the swap if the objective falls, else halve `size`.
    Leaves `state` at the exact weights of the support returned; returns it and the swaps made."""
    current = state.refit(_columns(units, alive, state.kept.numel()))
    made = 0
    for _ in range(rounds):
        size = min(size, int(alive.sum()), int((~alive).sum()))
        if size < 1:
            break
        idx = alive.nonzero().flatten()
        dropped = idx[state.costs(units[idx]).argsort(stable=True)[:size]]
        trial = alive.clone()
        trial[dropped] = False
        added = _best_additions(state, units, trial, size)
        if set(added.tolist()) == set(dropped.tolist()):
            size //= 2
            continue
        trial[added] = True
        before = (state.kept.clone(), state.w.clone(), state.hinv.clone())
        value = state.refit(_columns(units, trial, state.kept.numel()))
        if value < current - 1e-12 * abs(current):
            alive, current, made = trial, value, made + 1
        else:
            state.kept, state.w, state.hinv = before
            size //= 2
    return alive, made


def _columns(units: torch.Tensor, alive: torch.Tensor, width: int) -> torch.Tensor:
    """The kept-column mask of the kept units; columns that belong to no unit stay kept."""
    kept = torch.ones(width, dtype=torch.bool)
    kept[units[~alive].flatten()] = False
    return kept


def _best_additions(state: Reconstruction, units: torch.Tensor, alive: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` units outside `alive` whose addition lowers the objective most, given the kept columns:
    gain = tr(rᵀ S⁻¹ r) with r = G_u − H_uS H_SS⁻¹ G_S and S = H_uu − H_uS H_SS⁻¹ H_Su."""
    support = _columns(units, alive, state.kept.numel()).nonzero().flatten()
    candidates = (~alive).nonzero().flatten()
    cols = units[candidates]  # [p, d]
    flat = cols.flatten()
    chol = torch.linalg.cholesky(state.hd[support][:, support])
    h_sp = state.hd[support][:, flat]  # [s, p*d]
    solved = torch.cholesky_solve(torch.cat([h_sp, state.g[support]], dim=1), chol)
    m, ws = solved[:, :flat.numel()], solved[:, flat.numel():]
    p, d = cols.shape
    residual = (state.g[flat] - h_sp.T @ ws).view(p, d, -1)
    schur = state.hd[cols[:, :, None], cols[:, None, :]] - (h_sp.T.view(p, d, -1) @ m.T.view(p, d, -1).transpose(1, 2))
    if d == 1:
        gains = residual.pow(2).sum(dim=(1, 2)) / schur[:, 0, 0]
    else:
        gains = torch.einsum("pio,pij,pjo->p", residual, torch.linalg.inv(schur), residual)
    return candidates[gains.argsort(descending=True, stable=True)[:size]]
