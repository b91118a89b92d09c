"""Recovery adapters on pruneflow's in-memory model: install them, and make the family's own forward use them.

The model keeps its adapters in `model.pruneflow_adapters` (so they save and load with the weights) and
lists them in `config.pruneflow["adapters"]` (removed unit -> rank). Forward hooks place them in the
family's own forward by the rule of `residual_adapters.placement`; `tasks.residual.ResidualRunner` runs
them as units of its own, so both paths compute the same function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tasks.surgery.architecture import architecture_of
from tasks.surgery.edit import layer_ids, removed_units
from tasks.surgery.residual_adapters import (
    ADAPTERS_ATTR,
    ResidualAdapter,
    adapter_key,
    apply_all,
    build_adapters,
    placement,
)

_HANDLES_ATTR = "_pruneflow_adapter_hooks"


def adapter_ranks(model: nn.Module) -> dict[str, int]:
    """Removed unit -> rank of its adapter (0: bias only); empty when the model has none."""
    record = getattr(model.config, "pruneflow", None) or {}
    return {u: int(r) for u, r in (record.get("adapters") or {}).items()}


def adapters_of(model: nn.Module) -> nn.ModuleDict | None:
    return getattr(model, ADAPTERS_ATTR, None)


def get_adapter(model: nn.Module, unit: str) -> ResidualAdapter:
    return adapters_of(model)[adapter_key(unit)]


def install_adapters(model: nn.Module, ranks: dict[str, int]) -> nn.ModuleDict:
    """Give removed units zero-initialised adapters of the given ranks (replacing any earlier ones)."""
    not_removed = sorted(set(ranks) - removed_units(model))
    if not_removed:
        raise ValueError(f"adapters stand in for removed blocks only; these are not removed: {not_removed}")
    if not layer_ids(model):
        raise ValueError("adapters need at least one kept layer to act around; every layer was removed")
    param = next(model.parameters())
    adapters = build_adapters(model.config.hidden_size, ranks).to(device=param.device, dtype=param.dtype)
    setattr(model, ADAPTERS_ATTR, adapters)
    record = dict(getattr(model.config, "pruneflow", None) or {})
    record["adapters"] = {u: int(r) for u, r in sorted(ranks.items())}
    model.config.pruneflow = record
    wire_hooks(model)
    return adapters


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


def wire_hooks(model: nn.Module) -> None:
    """(Re)register the forward hooks that apply the model's adapters inside the family's own forward."""
    for handle in getattr(model, _HANDLES_ATTR, []):
        handle.remove()
    adapters = adapters_of(model)
    ranks = adapter_ranks(model)
    handles = []
    if adapters is not None and ranks:
        family = architecture_of(model)
        layers = family.decoder_layers(model)
        plan = placement(layer_ids(model), list(ranks))
        for position, units in plan.before.items():
            handles.append(layers[position].register_forward_pre_hook(_BeforeHook(adapters, units), with_kwargs=True))
        for part, slots in (("attn", plan.attn), ("mlp", plan.mlp)):
            for position, unit in slots.items():
                stand_in = getattr(layers[position], family.half(part).slot)
                handles.append(stand_in.register_forward_hook(_SlotHook(adapters, unit), with_kwargs=True))
        if plan.after:
            handles.append(layers[len(layers) - 1].register_forward_hook(_AfterHook(adapters, plan.after), with_kwargs=True))
    object.__setattr__(model, _HANDLES_ATTR, handles)
