"""`width.metric: activation` (NVIDIA Minitron): how strongly each unit's output is used on calibration text.

MLP channel c: the mean |input of down_proj| at c over a window's tokens. Head h: the mean over tokens of
the L2 norm of the head's slice of o_proj's input (the head's output before the projection). Hidden channel: the mean |output| at that channel of every norm
on the residual stream. Per window, then aggregated over windows by the L2 norm (Minitron's best batch
aggregation); a hidden channel's norms are summed.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.surgery.width import width_layout
from tasks.width.importance import (UnitScores, WidthMetric, batches, head_dim, present_layers, register_width_metric,
                                   residual_norms)


@register_width_metric
class ActivationImportance(WidthMetric):
    name = "activation"
    description = "mean |activation| per channel / head output norm per head (Minitron), L2 over windows"

    def scores(self, model: nn.Module, windows: torch.Tensor, batch_windows: int, settings=None) -> UnitScores:
        layout, size = width_layout(model), head_dim(model)
        squares: dict[tuple[str, int], torch.Tensor] = {}

        def record(kind: str, lid: int, per_window: torch.Tensor) -> None:
            total = per_window.double().pow(2).sum(dim=0)
            squares[(kind, lid)] = squares.get((kind, lid), 0) + total

        def on_down(lid: int):
            return lambda _m, args: record("channels", lid, args[0].abs().mean(dim=1))

        def on_o(lid: int):
            def hook(_m, args):
                x = args[0]
                per_head = x.view(*x.shape[:2], -1, size).norm(dim=-1)  # [batch, tokens, heads]
                record("heads", lid, per_head.mean(dim=1))
            return hook

        def on_norm(n: int):
            return lambda _m, _args, out: record("hidden", n, out.abs().mean(dim=1))

        handles = [norm.register_forward_hook(on_norm(n)) for n, norm in enumerate(residual_norms(model))]
        for layer in present_layers(model):
            if layer.mlp is not None:
                handles.append(getattr(layer.mlp, layout.down).register_forward_pre_hook(on_down(layer.layer_id)))
            if layer.attn is not None:
                handles.append(getattr(layer.attn, layout.o).register_forward_pre_hook(on_o(layer.layer_id)))
        try:
            with torch.no_grad():
                for batch in batches(windows, batch_windows):
                    model(batch.to(model.device))
        finally:
            for handle in handles:
                handle.remove()
        result = UnitScores()
        for (kind, lid), total in squares.items():
            if kind != "hidden":
                getattr(result, kind)[lid] = total.sqrt().float().cpu()
        # A hidden channel: its norms' output magnitudes, each aggregated by L2 over windows, summed over norms.
        result.hidden = sum(t.sqrt() for (kind, _), t in squares.items() if kind == "hidden").float().cpu()
        return result
