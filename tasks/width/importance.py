"""Width importance: a score for every attention head and MLP channel of the present layers (higher: keep).

A width metric is a class registered with `@register_width_metric`; `width.metric` names it. Scores are
per original layer id, as the plan indexes them, so a model that lost blocks first is scored on what is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import torch
from torch import nn

from tasks.errors import UserError
from tasks.registry import Plugin, Registry
from tasks.surgery import architecture_of, layer_ids
from tasks.surgery.removed import is_removed
from tasks.surgery.width import dense_widths, width_layout


class WidthMetricError(UserError):
    pass


@dataclass
class UnitScores:
    """Per original layer id: one score per query head, one per MLP channel (only present halves)."""

    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    channels: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None  # one score per hidden (embedding) channel

    def rows(self, group: int) -> Iterator[tuple[str, float]]:
        """(unit id, score) for the catalog: heads, KV groups (the sum of their heads) and channels."""
        for lid, scores in sorted(self.heads.items()):
            yield from ((f"layers.{lid}.attn.head.{h}", float(v)) for h, v in enumerate(scores))
            for g, total in enumerate(scores.view(-1, group).sum(dim=1)):
                yield f"layers.{lid}.attn.group.{g}", float(total)
        for lid, scores in sorted(self.channels.items()):
            yield from ((f"layers.{lid}.mlp.channel.{c}", float(v)) for c, v in enumerate(scores))
        if self.hidden is not None:
            yield from ((f"hidden.channel.{c}", float(v)) for c, v in enumerate(self.hidden))


class WidthMetric(Plugin):
    """Scores units of one model on calibration windows (higher: keep)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def scores(self, model: nn.Module, windows: torch.Tensor, batch_windows: int, settings=None) -> UnitScores:
        """`settings`: the metric's own section (`width.<name>`, its `settings` class), when it has one."""
        raise NotImplementedError


WIDTH_METRICS: Registry[WidthMetric] = Registry("width metric", unknown=WidthMetricError)


def register_width_metric(cls: type[WidthMetric]) -> type[WidthMetric]:
    WIDTH_METRICS.add(cls.name, cls())
    return cls


@dataclass(frozen=True)
class PresentLayer:
    """One present layer's width-bearing modules (None where the half was removed)."""

    layer_id: int
    attn: nn.Module | None
    mlp: nn.Module | None


def residual_norms(model: nn.Module) -> list[nn.Module]:
    """Every norm on the residual stream that a present half reads or writes through, and the final norm."""
    adapter = architecture_of(model)
    norms = []
    for layer in adapter.decoder_layers(model):
        for part in ("attn", "mlp"):
            half = adapter.half(part)
            if not is_removed(getattr(layer, half.slot)):
                norms += [getattr(layer, name) for name in half.norms]
    return norms + [model.get_submodule(width_layout(model).final_norm)]


def present_layers(model: nn.Module) -> list[PresentLayer]:
    adapter = architecture_of(model)
    width_layout(model)  # refuses a family without heads and channels, naming those that have them
    out = []
    for lid, layer in zip(layer_ids(model), adapter.decoder_layers(model)):
        attn, mlp = getattr(layer, adapter.attn.slot), getattr(layer, adapter.mlp.slot)
        out.append(PresentLayer(lid, None if is_removed(attn) else attn, None if is_removed(mlp) else mlp))
    return out


def head_dim(model: nn.Module) -> int:
    return dense_widths(model)["head_dim"]


def batches(windows: torch.Tensor, batch_windows: int) -> Iterator[torch.Tensor]:
    for start in range(0, windows.shape[0], batch_windows):
        yield windows[start:start + batch_windows]


def width_metric_settings() -> dict[str, type]:
    """The width metrics that take settings, and their section classes (`width.<metric>`)."""
    return {name: metric.settings for name, metric in WIDTH_METRICS.items() if metric.settings is not None}
