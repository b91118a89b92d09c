"""Physical edits: delete blocks from a model, count parameters, save and load pruned checkpoints.

A pruned model records its history in `config.pruneflow`: `layer_ids` (the original index of every
kept layer) and `removed` (every removed unit, as original block ids). Whole layers are deleted from
the layer list; a lone attention or MLP half is replaced by a parameter-free stand-in together with
the norms that belong to it (the adapter's `HalfLayout`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tasks.surgery.architecture import HalfLayout, architecture_for, architecture_of
from tasks.surgery.blocks import units_of
from tasks.surgery.removed import RemovedAttention, RemovedMLP, is_removed

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _record(model: nn.Module) -> dict:
    record = getattr(model.config, "pruneflow", None) or {}
    n_layers = len(architecture_of(model).decoder_layers(model))
    return {
        "layer_ids": list(record.get("layer_ids", range(n_layers))),
        "removed": list(record.get("removed", [])),
    }


def layer_ids(model: nn.Module) -> list[int]:
    """Original index of every layer the model still has, in order."""
    return _record(model)["layer_ids"]


def removed_units(model: nn.Module) -> set[str]:
    return set(_record(model)["removed"])


def _param_count(module: nn.Module, seen: set[int]) -> int:
    total = 0
    for param in module.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def total_params(model: nn.Module) -> int:
    """All parameters, tied ones counted once (embeddings included, as BlockPruner counts)."""
    return _param_count(model, set())


def block_param_counts(model: nn.Module) -> dict[str, int]:
    """Parameters of every present unit (`layers.N.attn` / `layers.N.mlp`, original ids), norms included."""
    adapter = architecture_of(model)
    counts: dict[str, int] = {}
    seen: set[int] = set()
    gone = removed_units(model)
    for layer_id, layer in zip(layer_ids(model), adapter.decoder_layers(model)):
        for part in ("attn", "mlp"):
            unit = f"layers.{layer_id}.{part}"
            if unit not in gone:
                counts[unit] = sum(_param_count(getattr(layer, name), seen) for name in adapter.half(part).attributes)
    return counts


def _stub_unit(layer: nn.Module, part: str, half: HalfLayout, position: int) -> None:
    for name in (*half.norms, *half.inner):
        setattr(layer, name, nn.Identity())
    setattr(layer, half.slot, RemovedAttention(position) if part == "attn" else RemovedMLP())


def remove_blocks(model: nn.Module, block_ids: list[str]) -> nn.Module:
    """Delete blocks in place: layers that lose both halves leave the layer list; lone halves are stubbed."""
    adapter = architecture_of(model)
    record = _record(model)
    gone = set(record["removed"]) | units_of(block_ids)
    layers = adapter.decoder_layers(model)
    kept_positions = [
        p for p, lid in enumerate(record["layer_ids"])
        if not {f"layers.{lid}.attn", f"layers.{lid}.mlp"} <= gone
    ]
    adapter.check_layer_deletion(model, kept_positions)
    new_layers = nn.ModuleList([layers[p] for p in kept_positions])
    new_ids = [record["layer_ids"][p] for p in kept_positions]
    layers_parent = _parent_of(model, layers)
    setattr(layers_parent[0], layers_parent[1], new_layers)
    model.config.num_hidden_layers = len(new_layers)
    adapter.on_layers_deleted(model, kept_positions)
    for position, (lid, layer) in enumerate(zip(new_ids, new_layers)):
        for part in ("attn", "mlp"):
            half = adapter.half(part)
            if f"layers.{lid}.{part}" in gone and not is_removed(getattr(layer, half.slot)):
                _stub_unit(layer, part, half, position)
    # Other entries (a width plan) stay.
    model.config.pruneflow = {**(getattr(model.config, "pruneflow", None) or {}), "layer_ids": new_ids,
                              "removed": sorted(gone)}
    return model


def _parent_of(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child is target:
                return module, child_name
    raise RuntimeError("decoder layer list not found in model")


def stubbed_units(model: nn.Module) -> list[str]:
    """Removed halves of layers that are still present (these need the stand-ins when loading)."""
    present = set(layer_ids(model))
    return [u for u in sorted(removed_units(model)) if int(u.split(".")[1]) in present]


def save_model(model: nn.Module, tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu") -> nn.Module:
    """Load any checkpoint pruneflow reads or writes, re-creating the stand-ins of removed halves."""
    # Never the folder's own code: its architecture is one of the adapters' standard transformers classes.
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    record = getattr(config, "pruneflow", None) or {}
    stub_layers = {int(u.split(".")[1]) for u in record.get("removed", [])} & set(record.get("layer_ids", []))
    kwargs = dict(dtype=_DTYPES[dtype], trust_remote_code=False, attn_implementation=architecture_for(config.model_type).attn_implementation)
    if not stub_layers:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        return model.to(device).eval()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    _restub(model)
    _check_missing(model, info.get("missing_keys", []))
    return model.to(device).eval()


def _restub(model: nn.Module) -> None:
    adapter = architecture_of(model)
    gone = removed_units(model)
    for position, (lid, layer) in enumerate(zip(layer_ids(model), adapter.decoder_layers(model))):
        for part in ("attn", "mlp"):
            if f"layers.{lid}.{part}" in gone:
                _stub_unit(layer, part, adapter.half(part), position)


def _check_missing(model: nn.Module, missing: list[str] | set[str]) -> None:
    present = set(model.state_dict())
    really_missing = sorted(k for k in missing if k in present)
    if really_missing:
        raise ValueError(f"checkpoint lacks weights of kept blocks: {really_missing[:5]}")
