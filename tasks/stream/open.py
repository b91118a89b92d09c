"""Opening a checkpoint streamed: its skeleton, its pieces, and the budget they must fit."""

from __future__ import annotations

from pathlib import Path

from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from tasks.errors import UserError
from tasks.export.common import DTYPES, base_values, empty_recorded_model
from tasks.export.registry import read_config
from tasks.export.trust import model_config
from tasks.stream.budget import Residency, budget_bytes, check_pieces, weight_bytes
from tasks.stream.residency import EMBED, HEAD, StreamedWeights, attach
from tasks.stream.shards import ShardIndex, stored_elements
from tasks.surgery import architecture_for

class NotStreamed(UserError):
    pass


def skeleton_for_run(path: str | Path, dtype: str) -> nn.Module:
    """The model pruneflow would load from `path`, with its parameters on the meta device and its buffers
    (rotary tables) real: what a streamed run computes with, and what a budget is weighed against. A
    checkpoint pruneflow wrote with its record gets the pruned shape its format's loader builds (kept
    layers, stand-ins for removed halves, the width plan's sizes)."""
    config = read_config(Path(path))
    record = config.get("pruneflow") or {}
    with init_empty_weights(include_buffers=False):
        if "base_model_type" in record:
            model = empty_recorded_model(record, base_values(config), dtype)
        else:
            config = model_config(Path(path), False)
            model = AutoModelForCausalLM.from_config(
                config, dtype=DTYPES[dtype], attn_implementation=architecture_for(config.model_type).attn_implementation)
    model.tie_weights()  # from_config ties only real weights; the loader ties the checkpoint's in any case
    return model.eval()


def residency(path: str | Path, dtype: str, device: str, setting: float | str) -> Residency:
    """Resident or streamed, from the checkpoint's own tensors (shard headers only) in the run's dtype."""
    elements = stored_elements(Path(path))
    nbytes = (weight_bytes(skeleton_for_run(path, dtype)) if elements is None
              else elements * DTYPES[dtype].itemsize)
    return Residency(budget_bytes(setting, device), nbytes, setting)


def open_streamed(path: str | Path, dtype: str, device: str, plan: Residency, stage: str) -> nn.Module:
    """A skeleton of the checkpoint at `path` whose pieces come from its shards while they are held."""
    problem = _unstreamable(Path(path))
    if problem:
        raise NotStreamed(f"{stage}: {problem}")
    model = skeleton_for_run(path, dtype)
    weights = _weights(model, Path(path), device, plan)
    attach(model, weights)
    return model


def check_budget(path: str | Path, dtype: str, device: str, plan: Residency) -> None:
    """Refuse, before anything runs, a budget that cannot hold what a streamed pass needs at once."""
    _weights(skeleton_for_run(path, dtype), Path(path), device, plan)


def _weights(model: nn.Module, path: Path, device: str, plan: Residency) -> StreamedWeights:
    layers = architecture_for(model.config.model_type).decoder_layers(model)
    index = ShardIndex(path)
    weights = StreamedWeights(model, layers, index, device, plan.budget_bytes)
    missing = sorted(n for p in weights.pieces.values() for n in p.places if n not in index)
    if missing:
        raise NotStreamed(f"{path} lacks tensors the model needs under the names it uses "
                          f"({', '.join(missing[:3])}...), so it cannot be streamed; load it whole "
                          "(a larger model.memory_budget_gb)")
    sizes = {name: (piece.label, piece.nbytes) for name, piece in weights.pieces.items()}
    # The output head runs with the embedding's piece (the final norm is there).
    check_pieces(sizes, [(EMBED, HEAD)], plan.budget_bytes, plan.setting)
    return weights


def _unstreamable(path: Path) -> str | None:
    """Why this checkpoint cannot be streamed yet: recovery adapters live outside the decoder layers'
    pieces."""
    record = read_config(path).get("pruneflow") or {}
    if record.get("adapters"):
        return (f"{path} carries recovery adapters ({', '.join(sorted(record['adapters']))}), which streaming "
                "does not read yet; load it whole (a larger model.memory_budget_gb)")
    return None
