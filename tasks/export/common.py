"""Pieces every format shares: the kept-layer layout, weights on disk, and reading back into pruneflow's model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from tasks.export.registry import ExportError, ExportFormat, read_config
from safetensors import safe_open
from safetensors.torch import save_file

from tasks.stream.residency import streamed
from tasks.stream.write import write_streamed
from tasks.surgery import architecture_for, layer_ids, remove_blocks, removed_units
from tasks.surgery.adapted import adapter_ranks, install_adapters
from tasks.surgery.residual_adapters import ADAPTERS_ATTR
from tasks.surgery.width import WidthPlan, apply_width, is_uniform, recorded_plan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Keys of a written config.json that describe the file format rather than the base architecture.
FORMAT_KEYS = ("auto_map", "architectures", "model_type", "transformers_version", "block_configs", "pruneflow")


@dataclass(frozen=True)
class KeptLayer:
    layer_id: int  # index in the ORIGINAL model
    attention: bool
    mlp: bool


def kept_layers(model: nn.Module) -> list[KeptLayer]:
    gone = removed_units(model)
    return [
        KeptLayer(lid, f"layers.{lid}.attn" not in gone, f"layers.{lid}.mlp" not in gone)
        for lid in layer_ids(model)
    ]


def has_lone_halves(model: nn.Module) -> bool:
    return any(not (layer.attention and layer.mlp) for layer in kept_layers(model))


def adapters_problem(model: nn.Module, fmt: str) -> str | None:
    """Why format `fmt` (a standard architecture) cannot carry the model's recovery adapters, or None."""
    units = sorted(adapter_ranks(model))
    if not units:
        return None
    return (
        f"format '{fmt}' has no place for the recovery adapters of {units}; "
        "use format 'auto', 'remote_code' or 'pruneflow'"
    )


# Prefix of the model_type of checkpoints that transformers must not read as the base architecture.
PRUNED_MODEL_TYPE_PREFIX = "pruneflow_"


def pruneflow_record(model: nn.Module, fmt: str) -> dict:
    """What the written config says about the pruning, in original block ids."""
    record = {
        "format": fmt,
        "base_model_type": model.config.model_type,
        "layer_ids": list(layer_ids(model)),
        "removed": sorted(removed_units(model)),
    }
    if adapter_ranks(model):
        record["adapters"] = adapter_ranks(model)
    if recorded_plan(model):
        record["plan"], record["dense"] = recorded_plan(model), model.config.pruneflow["dense"]
    return record


def width_problem(model: nn.Module, fmt: ExportFormat) -> str | None:
    """Why `fmt`, which writes `fmt.widths` ("none" | "uniform" | "per_layer") plans, cannot hold this model's
    width plan; None when the model has no plan or the format holds it."""
    if not recorded_plan(model) or fmt.widths == "per_layer":
        return None
    if fmt.widths == "uniform" and is_uniform(model) and not has_lone_halves(model):
        return None
    return (f"format '{fmt.name}' cannot hold this width plan: "
            + ("it writes no pruned widths" if fmt.widths == "none" else
               "a standard architecture needs the same widths in every layer and only whole layers removed")
            + "; width plans export as 'hf' (or 'auto') when uniform, with score.granularity 'layer' for depth")


def write_weights(model: nn.Module, out_dir: Path) -> dict:
    """Safetensors weights under the model's own parameter names; returns the config as a dict to edit.

    Removed halves are parameter-free stand-ins, so they contribute no tensors. A streamed model is
    written piece by piece from its checkpoint's shards (tasks.stream.write), never whole in memory."""
    weights = streamed(model)
    if weights is not None:
        write_streamed(model, weights, out_dir)
        return json.loads((out_dir / "config.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    _restore_adapter_names(model, out_dir)
    return json.loads((out_dir / "config.json").read_text())


def _restore_adapter_names(model: nn.Module, out_dir: Path) -> None:
    """Writes the recovery adapters under their own names. save_pretrained renames keys by the family's
    weight conversions, whose patterns are regular expressions with unescaped dots: Mixtral's `.mlp.` also
    matches `layers_0_mlp.` in an adapter's name, which then no reader finds."""
    prefix = ADAPTERS_ATTR + "."
    adapters = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith(prefix)}
    if not adapters:
        return
    index_file = out_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    shards = ["model.safetensors"]
    if index is not None:
        shards = sorted({f for k, f in index["weight_map"].items() if k.startswith(prefix)}) or [
            sorted(set(index["weight_map"].values()))[-1]]
    for position, name in enumerate(shards):
        with safe_open(str(out_dir / name), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith(prefix)}
        save_file({**tensors, **(adapters if position == 0 else {})}, str(out_dir / name), metadata=metadata)
    if index is not None:
        weight_map = {k: f for k, f in index["weight_map"].items() if not k.startswith(prefix)}
        index["weight_map"] = {**weight_map, **{k: shards[0] for k in adapters}}
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_config(out_dir: Path, config: dict) -> None:
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def base_values(config: dict) -> dict:
    values = {k: v for k, v in config.items() if k not in FORMAT_KEYS}
    if "rope_parameters" in values:
        # Legacy copies written for older readers; rope_parameters is the source of truth.
        values.pop("rope_theta", None)
        values.pop("rope_scaling", None)
    return values


def load_as_pruned(path: Path, base_model_type: str, values: dict, kept_ids: list[int], removed: list[str],
                   dtype: str, device: str, adapters: dict[str, int] | None = None) -> nn.Module:
    """Load a checkpoint whose weights carry the base architecture's names into pruneflow's representation.

    The base model is built with the kept layers only (`values` is its config), its weights loaded, then
    the removed halves are replaced by pruneflow's stand-ins, as `remove_blocks` leaves an in-memory model."""
    kept = set(kept_ids)
    whole = [u for u in removed if int(u.split(".")[1]) not in kept]
    halves = [u for u in removed if int(u.split(".")[1]) in kept]
    config = AutoConfig.for_model(base_model_type, **values)
    if config.num_hidden_layers != len(kept_ids):
        raise ExportError(f"{path}: config has {config.num_hidden_layers} layers, its record names {len(kept_ids)}")
    config.pruneflow = {"layer_ids": list(kept_ids), "removed": sorted(whole)}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the removed halves are reported missing; checked below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=DTYPES[dtype], output_loading_info=True, trust_remote_code=False,
            attn_implementation=getattr(architecture_for(base_model_type), "attn_implementation", "sdpa"),
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    remove_blocks(model, halves)
    present = set(model.state_dict())
    missing = sorted(k for k in info.get("missing_keys", []) if k in present)
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if not k.startswith(ADAPTERS_ATTR + "."))
    if adapters:
        _load_adapters(model, Path(path), adapters, DTYPES[dtype])
    if missing or unexpected:
        raise ExportError(
            f"{path}: weights do not match the blocks its config keeps "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.to(device).eval()


def _load_adapters(model: nn.Module, path: Path, ranks: dict[str, int], dtype: torch.dtype) -> None:
    """Recovery adapters are not part of the base architecture, so transformers skips their weights."""
    modules = install_adapters(model, ranks)
    prefix = ADAPTERS_ATTR + "."
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({k[len(prefix):]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)})
    result = modules.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"{path}: adapter weights do not match config.pruneflow.adapters "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )


def load_recorded(path: Path, dtype: str, device: str) -> nn.Module:
    """Read a checkpoint whose config.json carries pruneflow's full record (base model type, kept layers)."""
    config = read_config(path)
    record = config.get("pruneflow") or {}
    missing = [k for k in ("base_model_type", "layer_ids", "removed") if k not in record]
    if missing:
        raise ExportError(f"{path}/config.json: pruneflow record lacks {missing}")
    if record.get("plan"):
        return load_width_pruned(Path(path), record, base_values(config), dtype, device)
    return load_as_pruned(
        Path(path), record["base_model_type"], base_values(config), record["layer_ids"], record["removed"],
        dtype, device, record.get("adapters"),
    )


def empty_recorded_model(record: dict, values: dict, dtype: str) -> nn.Module:
    """pruneflow's model of a recorded checkpoint, shaped as the prune stage left it, weights not loaded: the
    dense shape of the kept layers (the plan's sizes, where the record has a plan), the removed blocks and
    the plan's units cut from it."""
    kept, removed = record["layer_ids"], record["removed"]
    config = AutoConfig.for_model(record["base_model_type"], **{**values, **(record.get("dense") or {})})
    config.pruneflow = {"layer_ids": list(kept), "removed": sorted(u for u in removed if int(u.split(".")[1]) not in kept)}
    model = AutoModelForCausalLM.from_config(
        config, dtype=DTYPES[dtype],
        attn_implementation=getattr(architecture_for(record["base_model_type"]), "attn_implementation", "sdpa"))
    remove_blocks(model, [u for u in removed if int(u.split(".")[1]) in kept])
    if record.get("plan"):
        apply_width(model, WidthPlan.model_validate(record["plan"]))
    return model


def load_width_pruned(path: Path, record: dict, values: dict, dtype: str, device: str) -> nn.Module:
    """A checkpoint with a width plan: the dense shape of the kept layers is built, the removed blocks and
    the plan's units cut from it as the prune stage cut them, then the checkpoint's weights fill it."""
    model = empty_recorded_model(record, values, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys() if not k.startswith(ADAPTERS_ATTR + ".")})
    result = model.load_state_dict(tensors, strict=False)
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in tensors if k in state}
    missing = [k for k in result.missing_keys if state[k].data_ptr() not in loaded]  # tied ones were loaded
    if missing or result.unexpected_keys:
        raise ExportError(f"{path}: weights do not match the plan its config records "
                          f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})")
    if record.get("adapters"):
        _load_adapters(model, path, record["adapters"], DTYPES[dtype])
    return model.to(device).eval()


def recorded_format(config: dict) -> str | None:
    return (config.get("pruneflow") or {}).get("format")
