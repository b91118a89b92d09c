"""Width surgery: a plan of the attention heads, KV groups and MLP channels each layer keeps, applied physically.

A plan names units of the ORIGINAL model by index: query heads and KV heads (a KV head with the query heads
that read it is a *group*) of `layers.N.attn`, and intermediate channels of `layers.N.mlp`. Applying it
slices q/k/v rows and o columns per head, gate/up rows and down columns per channel, so the layer computes
exactly what the dense layer computes with the other units' outputs set to zero (`mask_width` does that
without slicing; tests compare the two). A layer the plan does not name keeps its full width.

Grouped-query attention constrains a layer's heads: every kept query head reads a kept KV head, and every
kept KV head keeps the same number of query heads (the attention kernels repeat each KV head that often).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from tasks.errors import UserError
from tasks.settings import Settings
from tasks.surgery.architecture import ArchitectureAdapter, WidthLayout, architecture_of, model_types_where
from tasks.surgery.edit import layer_ids, removed_units
from tasks.surgery.removed import is_removed


class WidthError(UserError):
    pass


class LayerWidth(Settings):
    """What one layer keeps, as sorted indices into the dense layer's units; None keeps them all."""

    heads: tuple[int, ...] | None = Field(None, description="Kept query heads.")
    kv_heads: tuple[int, ...] | None = Field(None, description="Kept key/value heads (KV groups).")
    channels: tuple[int, ...] | None = Field(None, description="Kept MLP intermediate channels.")

    @model_validator(mode="after")
    def _sorted_unique(self) -> "LayerWidth":
        for name in ("heads", "kv_heads", "channels"):
            _check_indices(name, getattr(self, name))
        return self


def _check_indices(name: str, kept: tuple[int, ...] | None) -> None:
    if kept is not None and (not kept or list(kept) != sorted(set(kept)) or kept[0] < 0):
        raise ValueError(f"{name} must be a non-empty list of distinct indices in increasing order, not {kept}")


class WidthPlan(Settings):
    """Kept units per original layer id, and the hidden (embedding) channels every layer keeps."""

    layers: dict[int, LayerWidth] = Field(default_factory=dict)
    hidden: tuple[int, ...] | None = Field(None, description="Kept hidden channels (the residual stream's).")

    @model_validator(mode="after")
    def _sorted_unique(self) -> "WidthPlan":
        _check_indices("hidden", self.hidden)
        return self

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def from_json(cls, text: str) -> "WidthPlan":
        return cls.model_validate_json(text)


def _attn_shape(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, config.num_key_value_heads, head_dim


def config_widths(config) -> dict[str, int]:
    """The widths a config states: query heads, KV heads, head size and MLP channels."""
    heads, kv_heads, head_dim = _attn_shape(config)
    return {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "channels": config.intermediate_size,
            "hidden": config.hidden_size}


def dense_widths(model: nn.Module) -> dict[str, int]:
    """The widths a plan indexes into (a model not yet width-pruned has them in every layer)."""
    return config_widths(model.config)


def width_layout(model: nn.Module) -> WidthLayout:
    """The family's width layout, or a refusal naming the families that have one."""
    adapter = architecture_of(model)
    if adapter.width is None:
        able = model_types_where(lambda a: a.width is not None)
        raise WidthError(f"width: model_type '{model.config.model_type}' cannot be pruned in width (fused projections "
                         f"or experts); families with heads and channels: {', '.join(able)}")
    return adapter.width


def check_plan(model: nn.Module, plan: WidthPlan) -> None:
    """Refuse a plan this model cannot take, naming the layer and the rule, before anything changes."""
    layout = width_layout(model)
    if recorded_plan(model):
        raise WidthError("width: this model is already width-pruned; plan from the dense model")
    dense = dense_widths(model)
    present = set(layer_ids(model))
    group = dense["heads"] // dense["kv_heads"]
    if plan.hidden is not None:
        if not layout.hidden:
            raise WidthError(f"width plan: model_type '{model.config.model_type}' scales by a constant of its "
                             "hidden size, so its hidden channels cannot be pruned; prune heads and channels only")
        if plan.hidden[-1] >= dense["hidden"]:
            raise WidthError(f"width plan: hidden index {plan.hidden[-1]} is beyond the model's {dense['hidden']}")
    for lid, layer in plan.layers.items():
        where = f"width plan, layer {lid}"
        if lid not in present:
            raise WidthError(f"{where}: the model has no layer {lid} (kept layers: {sorted(present)})")
        for name in ("heads", "kv_heads", "channels"):
            kept = getattr(layer, name)
            if kept is not None and kept[-1] >= dense[name]:
                raise WidthError(f"{where}: {name} index {kept[-1]} is beyond the model's {dense[name]} {name}")
        if (layer.heads is not None or layer.kv_heads is not None) and not layout.heads:
            raise WidthError(f"{where}: model_type '{model.config.model_type}' normalises queries and keys over all "
                             "heads, so its heads cannot be pruned exactly; prune MLP channels only")
        heads = layer.heads or tuple(range(dense["heads"]))
        kv_heads = layer.kv_heads or tuple(range(dense["kv_heads"]))
        per_group = {kv: sum(1 for h in heads if h // group == kv) for kv in kv_heads}
        orphans = [h for h in heads if h // group not in per_group]
        if orphans:
            raise WidthError(f"{where}: query heads {orphans} read KV heads the plan removes; keep their KV head "
                             f"or drop them (query head h reads KV head h // {group})")
        if len(set(per_group.values())) != 1 or 0 in per_group.values():
            raise WidthError(f"{where}: every kept KV head must keep the same number (at least one) of its query "
                             f"heads, not {per_group} (a KV group may not be split unevenly)")


def apply_width(model: nn.Module, plan: WidthPlan) -> nn.Module:
    """Slice every layer the plan names, in place; records the plan in `config.pruneflow['plan']` and,
    when every present half has the same width, writes those widths into the config."""
    check_plan(model, plan)
    adapter, layout, dense = architecture_of(model), width_layout(model), dense_widths(model)
    for lid, layer in zip(layer_ids(model), adapter.decoder_layers(model)):
        kept = plan.layers.get(lid)
        if kept is None:
            continue
        attn, mlp = getattr(layer, adapter.attn.slot), getattr(layer, adapter.mlp.slot)
        if (kept.heads or kept.kv_heads) and not is_removed(attn):
            _slice_attention(attn, layout, kept, dense)
        if kept.channels and not is_removed(mlp):
            _slice_mlp(mlp, layout, kept.channels)
    if plan.hidden is not None:
        _slice_hidden(model, adapter, layout, plan.hidden)
    _record_plan(model, adapter, plan, dense)
    return model


def output_projection(model: nn.Module, unit: str) -> nn.Linear:
    """The projection that writes unit `layers.N.attn` / `layers.N.mlp` (original id N) to the residual
    stream: the one whose columns are the unit's heads or channels."""
    adapter, layout = architecture_of(model), width_layout(model)
    _, lid, part = unit.split(".")
    ids = layer_ids(model)
    if part not in ("attn", "mlp") or int(lid) not in ids:
        raise WidthError(f"width weights: no present unit '{unit}' (present layers: {ids})")
    layer = adapter.decoder_layers(model)[ids.index(int(lid))]
    module = getattr(layer, adapter.half(part).slot)
    if is_removed(module):
        raise WidthError(f"width weights: unit '{unit}' was removed by the depth search")
    return getattr(module, layout.stream_io(part)[1])


def set_output_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Write a width strategy's weights into the pruned model: a unit id (`layers.N.mlp`) replaces that
    unit's output projection (a reconstruction of its kept units), any other key the model's parameter or
    buffer of that name (a strategy that trained the model). Every name and shape is checked first."""
    state = model.state_dict()
    targets = {}
    for key in weights:
        if key.startswith("layers.") and key.count(".") == 2:
            targets[key] = output_projection(model, key).weight
        elif key in state:
            targets[key] = state[key]
        else:
            raise WidthError(f"width weights: the pruned model has no unit or parameter '{key}'; the weights "
                             "belong to another plan")
    for key, tensor in targets.items():
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise WidthError(f"width weights: '{key}' has shape {tuple(weights[key].shape)}, the pruned model's "
                             f"{tuple(tensor.shape)}; the weights belong to another plan")
    with torch.no_grad():
        for key, tensor in targets.items():
            tensor.copy_(weights[key].to(tensor.dtype))
    return model


def _slice_norm(norm: nn.Module, index: torch.Tensor) -> None:
    norm.weight = nn.Parameter(norm.weight.data.index_select(0, index).contiguous())
    if getattr(norm, "bias", None) is not None:
        norm.bias = nn.Parameter(norm.bias.data.index_select(0, index).contiguous())
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (index.numel(),)


def _slice_hidden(model: nn.Module, adapter: ArchitectureAdapter, layout: WidthLayout, hidden: tuple[int, ...]) -> None:
    """The residual stream keeps `hidden`: embedding and output columns, every norm on it, the input
    columns of what reads it and the output rows of what writes it. A norm then divides by the kept
    channels only (so this is no masking of the dense model; Minitron heals after it)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    index = torch.tensor(hidden, device=embed.weight.device)
    tied = head is not None and head.weight is embed.weight
    embed.weight = nn.Parameter(embed.weight.data.index_select(1, index).contiguous())
    embed.embedding_dim = index.numel()
    if tied:
        head.weight = embed.weight
    elif head is not None:
        _columns(head, index)
    for layer in adapter.decoder_layers(model):
        for part in ("attn", "mlp"):
            reads, writes = layout.stream_io(part)
            half = adapter.half(part)
            module = getattr(layer, half.slot)
            if is_removed(module):
                continue
            for name in half.norms:
                _slice_norm(getattr(layer, name), index)
            for name in reads:
                _columns(getattr(module, name), index)
            _rows(getattr(module, writes), index)
            if isinstance(getattr(module, "hidden_size", None), int):
                module.hidden_size = index.numel()
    _slice_norm(model.get_submodule(layout.final_norm), index)


def _rows(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data.index_select(0, index).contiguous())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data.index_select(0, index).contiguous())
    linear.out_features = index.numel()


def _columns(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data.index_select(1, index).contiguous())
    linear.in_features = index.numel()


def _head_rows(heads: tuple[int, ...], head_dim: int, device: torch.device) -> torch.Tensor:
    return (torch.tensor(heads, device=device)[:, None] * head_dim + torch.arange(head_dim, device=device)).flatten()


def _slice_attention(attn: nn.Module, layout: WidthLayout, kept: LayerWidth, dense: dict[str, int]) -> None:
    head_dim = dense["head_dim"]
    heads = kept.heads or tuple(range(dense["heads"]))
    kv_heads = kept.kv_heads or tuple(range(dense["kv_heads"]))
    device = getattr(attn, layout.q).weight.device
    q_rows, kv_rows = _head_rows(heads, head_dim, device), _head_rows(kv_heads, head_dim, device)
    _rows(getattr(attn, layout.q), q_rows)
    _rows(getattr(attn, layout.k), kv_rows)
    _rows(getattr(attn, layout.v), kv_rows)
    _columns(getattr(attn, layout.o), q_rows)
    # The family's forward reshapes with -1 heads; only the repeat count of each KV head is stored.
    attn.num_key_value_groups = len(heads) // len(kv_heads)
    for name, value in (("num_heads", len(heads)), ("num_key_value_heads", len(kv_heads))):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value)


def _slice_mlp(mlp: nn.Module, layout: WidthLayout, channels: tuple[int, ...]) -> None:
    index = torch.tensor(channels, device=getattr(mlp, layout.down).weight.device)
    _rows(getattr(mlp, layout.gate), index)
    _rows(getattr(mlp, layout.up), index)
    _columns(getattr(mlp, layout.down), index)
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = len(channels)


def layer_shapes(model: nn.Module) -> dict[int, dict[str, int]]:
    """Per present layer (original id): query heads, KV heads and MLP channels it now has (0: half removed)."""
    adapter, layout = architecture_of(model), width_layout(model)
    head_dim = _attn_shape(model.config)[2]
    shapes = {}
    for lid, layer in zip(layer_ids(model), adapter.decoder_layers(model)):
        attn, mlp = getattr(layer, adapter.attn.slot), getattr(layer, adapter.mlp.slot)
        q = 0 if is_removed(attn) else getattr(attn, layout.q).out_features // head_dim
        kv = 0 if is_removed(attn) else getattr(attn, layout.k).out_features // head_dim
        channels = 0 if is_removed(mlp) else getattr(mlp, layout.down).in_features
        shapes[lid] = {"heads": q, "kv_heads": kv, "channels": channels}
    return shapes


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """Per present layer: its widths now, the halves it lost and its parameters (for `show` and reports)."""
    adapter = architecture_of(model)
    gone = removed_units(model)
    rows = []
    for (lid, shape), layer in zip(layer_shapes(model).items(), adapter.decoder_layers(model)):
        halves = [part for part in ("attn", "mlp") if f"layers.{lid}.{part}" in gone]
        rows.append({"layer": lid, **shape, "removed": halves, "params": sum(p.numel() for p in layer.parameters())})
    return rows


def _record_of(model: nn.Module) -> dict[str, Any]:
    return getattr(model.config, "pruneflow", None) or {}


def recorded_plan(model: nn.Module) -> dict[str, Any] | None:
    """The width plan a model carries (`config.pruneflow.plan`, as JSON data), or None: not width-pruned."""
    return _record_of(model).get("plan") or None


def _record_plan(model: nn.Module, adapter: ArchitectureAdapter, plan: WidthPlan, dense: dict[str, int]) -> None:
    config = model.config
    record = dict(_record_of(model))
    record.setdefault("layer_ids", layer_ids(model))
    record.setdefault("removed", [])
    record["plan"] = plan.model_dump(mode="json", exclude_none=True)
    # The sizes the plan's indices refer to: a reader rebuilds this shape before slicing it.
    record["dense"] = {"num_attention_heads": dense["heads"], "num_key_value_heads": dense["kv_heads"],
                       "intermediate_size": dense["channels"], "head_dim": dense["head_dim"],
                       "hidden_size": dense["hidden"]}
    config.pruneflow = record
    config.head_dim = dense["head_dim"]  # no longer hidden_size // heads once heads or hidden channels go
    if plan.hidden is not None:  # one width for every layer: the config always says it
        config.hidden_size = len(plan.hidden)
    shapes = layer_shapes(model).values()
    uniform = {key: {s[key] for s in shapes if s[key]} for key in ("heads", "kv_heads", "channels")}
    if all(len(values) <= 1 for values in uniform.values()):
        for key, field in (("heads", "num_attention_heads"), ("kv_heads", "num_key_value_heads"),
                           ("channels", "intermediate_size")):
            if uniform[key]:
                setattr(config, field, uniform[key].pop())


def is_uniform(model: nn.Module) -> bool:
    """Whether every present half has the widths the config states (a standard architecture expresses it)."""
    config = model.config
    _, _, head_dim = _attn_shape(config)
    for shape in layer_shapes(model).values():
        if shape["heads"] and (shape["heads"], shape["kv_heads"]) != (config.num_attention_heads,
                                                                     config.num_key_value_heads):
            return False
        if shape["channels"] and shape["channels"] != config.intermediate_size:
            return False
    return True


def mask_width(model: nn.Module, plan: WidthPlan) -> nn.Module:
    """Zero the output of every unit the plan removes, keeping shapes (the reference that slicing must equal).
    Hidden channels have no such reference: the norms divide by every channel."""
    check_plan(model, plan)
    if plan.hidden is not None:
        raise WidthError("mask_width: hidden channels cannot be masked (the norms divide by every channel)")
    adapter, layout, dense = architecture_of(model), width_layout(model), dense_widths(model)
    head_dim = dense["head_dim"]
    with torch.no_grad():
        for lid, layer in zip(layer_ids(model), adapter.decoder_layers(model)):
            kept = plan.layers.get(lid)
            if kept is None:
                continue
            if kept.heads or kept.kv_heads:
                heads = set(kept.heads or range(dense["heads"]))
                o = getattr(getattr(layer, adapter.attn.slot), layout.o)
                for h in set(range(dense["heads"])) - heads:
                    o.weight[:, h * head_dim:(h + 1) * head_dim] = 0
            if kept.channels:
                down = getattr(getattr(layer, adapter.mlp.slot), layout.down)
                gone = sorted(set(range(dense["channels"])) - set(kept.channels))
                down.weight[:, gone] = 0
    return model
