"""Recovery adapters on pruneflow's in-memory model: install them, and make the family's own forward use them.

The model keeps its adapters in `model.pruneflow_adapters` (so they save and load with the weights) and
lists them in `config.pruneflow["adapters"]` (removed unit -> rank). Forward hooks place them in the
family's own forward by the rule of `residual_adapters.placement`; `tasks.residual.ResidualRunner` runs
them as units of its own, so both paths compute the same function.
"""

from __future__ import annotations

from torch import nn

from tasks.surgery.architecture import architecture_of
from tasks.surgery.edit import layer_ids, removed_units
from tasks.surgery.residual_adapters import (
    ADAPTERS_ATTR,
    ResidualAdapter,
    adapter_key,
    build_adapters,
    hook_adapters,
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


def wire_hooks(model: nn.Module) -> None:
    """(Re)register the forward hooks that apply the model's adapters inside the family's own forward."""
    for handle in getattr(model, _HANDLES_ATTR, []):
        handle.remove()
    adapters = adapters_of(model)
    ranks = adapter_ranks(model)
    handles = []
    if adapters is not None and ranks:
        family = architecture_of(model)
        handles = hook_adapters(family.decoder_layers(model), lambda layer, part: getattr(layer, family.half(part).slot),
                                adapters, placement(layer_ids(model), list(ranks)))
    object.__setattr__(model, _HANDLES_ATTR, handles)
