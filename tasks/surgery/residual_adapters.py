"""Recovery adapters that stand in for removed blocks: x -> x + up(down(x)) + bias on the residual stream.

A removed unit (`layers.N.attn` / `layers.N.mlp`, original ids) may get an adapter ("A deeper look at
depth pruning of LLMs", Siddiqui et al. 2024): a learned bias (rank 0) or a low-rank linear map. It
acts exactly where the unit used to add its output: it reads the residual stream entering the unit and
adds its own output to it.

This module needs only torch: pruneflow imports it, and self-contained checkpoints carry a copy of it
next to their modeling code, so both place adapters by the same rule (`placement`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

# Module name under which a model holds its adapters: weights are `pruneflow_adapters.<key>.*`.
ADAPTERS_ATTR = "pruneflow_adapters"


def adapter_key(unit: str) -> str:
    """ModuleDict key of a unit's adapter (module names may not contain dots)."""
    return unit.replace(".", "_")


def unit_order(unit: str) -> tuple[int, int]:
    _, layer, part = unit.split(".")
    return int(layer), 0 if part == "attn" else 1


class ResidualAdapter(nn.Module):
    """Adds `bias + up(down(x))` (rank 0: the bias alone) to the residual stream `x`."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.rank = rank
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.down = nn.Linear(hidden_size, rank, bias=False) if rank > 0 else None
        self.up = nn.Linear(rank, hidden_size, bias=False) if rank > 0 else None
        if self.up is not None:
            nn.init.zeros_(self.up.weight)  # a fresh adapter adds nothing until it is fitted or loaded

    def delta(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.down is None:
            return self.bias.to(hidden.dtype).expand_as(hidden)
        return self.up(self.down(hidden)) + self.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.delta(hidden)


def build_adapters(hidden_size: int, ranks: dict[str, int]) -> nn.ModuleDict:
    """Empty adapters (zero bias) for `ranks`: removed unit -> rank; weights are loaded or fitted after."""
    ordered = sorted(ranks, key=unit_order)
    return nn.ModuleDict({adapter_key(u): ResidualAdapter(hidden_size, int(ranks[u])) for u in ordered})


@dataclass
class Placement:
    """Where each adapter acts, by kept-layer position: before the layer, in its attention or MLP slot,
    or after the last layer (adapters of whole layers removed at the end)."""

    before: dict[int, list[str]] = field(default_factory=dict)
    attn: dict[int, str] = field(default_factory=dict)
    mlp: dict[int, str] = field(default_factory=dict)
    after: list[str] = field(default_factory=list)


def placement(layer_ids: list[int], units: list[str]) -> Placement:
    """Place adapters of removed units: a lone removed half of a kept layer acts in that half's slot; a
    whole removed layer's adapters act before the next kept layer (after the last one at the end)."""
    position_of = {lid: p for p, lid in enumerate(layer_ids)}
    out = Placement()
    for unit in sorted(units, key=unit_order):
        layer, part = unit_order(unit)
        if layer in position_of:
            (out.attn if part == 0 else out.mlp)[position_of[layer]] = unit
            continue
        later = [p for p, lid in enumerate(layer_ids) if lid > layer]
        if later:
            out.before.setdefault(later[0], []).append(unit)
        else:
            out.after.append(unit)
    return out


def apply_all(adapters: nn.ModuleDict, units: list[str], hidden: torch.Tensor) -> torch.Tensor:
    for unit in units:
        hidden = adapters[adapter_key(unit)](hidden)
    return hidden


def _hidden_arg(args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool]:
    if args:
        return args[0], True
    return kwargs["hidden_states"], False


# Hooks are objects holding the adapters, not closures: `copy.deepcopy(model)` then gives the copy
# hooks that use the copy's own adapters.
class _BeforeHook:
    def __init__(self, adapters: nn.ModuleDict, units: list[str]):
        self.adapters, self.units = adapters, units

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden, positional = _hidden_arg(args, kwargs)
        hidden = apply_all(self.adapters, self.units, hidden)
        if positional:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


class _SlotHook:
    """The stand-in's norms are identities, so the hidden state it receives is the residual stream itself."""

    def __init__(self, adapters: nn.ModuleDict, unit: str):
        self.adapters, self.unit = adapters, unit

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden, _ = _hidden_arg(args, kwargs)
        delta = self.adapters[adapter_key(self.unit)].delta(hidden)
        return (delta, *output[1:]) if isinstance(output, tuple) else delta


class _AfterHook:
    def __init__(self, adapters: nn.ModuleDict, units: list[str]):
        self.adapters, self.units = adapters, units

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if isinstance(output, tuple):
            return (apply_all(self.adapters, self.units, output[0]), *output[1:])
        return apply_all(self.adapters, self.units, output)


def hook_adapters(layers: nn.ModuleList, stand_in: Callable[[nn.Module, str], nn.Module], adapters: nn.ModuleDict,
                  plan: Placement) -> list:
    """Make a family's own forward apply the adapters, where removed halves are parameter-free stand-ins
    (`stand_in(layer, part)`) whose norms are identities; returns the hook handles."""
    handles = []
    for position, units in plan.before.items():
        handles.append(layers[position].register_forward_pre_hook(_BeforeHook(adapters, units), with_kwargs=True))
    for part, slots in (("attn", plan.attn), ("mlp", plan.mlp)):
        for position, unit in slots.items():
            handles.append(stand_in(layers[position], part).register_forward_hook(_SlotHook(adapters, unit),
                                                                                  with_kwargs=True))
    if plan.after:
        handles.append(layers[len(layers) - 1].register_forward_hook(_AfterHook(adapters, plan.after), with_kwargs=True))
    return handles
