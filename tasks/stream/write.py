"""Saving a streamed model: each piece brought in, its tensors written to a shard, and let go.

The model's own parameter names are written, so layers renumbered by removed blocks are saved under
their new indices and removed halves (parameter-free stand-ins) contribute nothing. Peak memory is the
budget plus one shard being assembled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tasks.stream.residency import StreamedWeights

# Pieces are gathered into shards of at most this size, or of the largest piece where that is larger
# (a shard is assembled, then serialised, in memory: peak is the budget plus about two of them).
SHARD_BYTES = 500_000_000
INDEX = "model.safetensors.index.json"


def write_streamed(model: nn.Module, weights: StreamedWeights, out_dir: Path) -> None:
    """Safetensors shards (with an index when there are several) and the config, as save_pretrained writes.
    Each shard is written as soon as it is full, so no more than one is held."""
    out_dir.mkdir(parents=True, exist_ok=True)
    limit = max(SHARD_BYTES, max(piece.nbytes for piece in weights.pieces.values()))
    shards: list[tuple[Path, list[str], int]] = []
    current: dict[str, torch.Tensor] = {}
    for piece, names in _names_by_piece(model, weights):
        with weights.hold(piece):
            tensors = {name: _tensor(model, name) for name in names}
        if current and sum(t.nbytes for t in (*current.values(), *tensors.values())) > limit:
            shards.append(_flush(current, out_dir, len(shards)))
            current = {}
        current.update(tensors)
    current.update(_buffers(model))
    if current or not shards:
        shards.append(_flush(current, out_dir, len(shards)))
    _name_shards(shards, out_dir)
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)


def _flush(tensors: dict[str, torch.Tensor], out_dir: Path, number: int) -> tuple[Path, list[str], int]:
    """One shard written under a temporary name (its final name needs the count of shards)."""
    path = out_dir / f".shard-{number:05d}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, list(tensors), sum(t.nbytes for t in tensors.values())


def _name_shards(shards: list[tuple[Path, list[str], int]], out_dir: Path) -> None:
    if len(shards) == 1:
        shards[0][0].rename(out_dir / "model.safetensors")
        return
    weight_map = {}
    for number, (path, names, _) in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        path.rename(out_dir / file)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(size for _, _, size in shards)
    (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                            indent=2, sort_keys=True) + "\n")


def _names_by_piece(model: nn.Module, weights: StreamedWeights) -> list[tuple[str, list[str]]]:
    """The model's parameter names (tied ones once), grouped by the piece that holds them, in model order."""
    piece_at = {(id(module), attr): piece.name for piece in weights.pieces.values()
                for places in piece.places.values() for module, attr in places}
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        path, _, attr = name.rpartition(".")
        groups.setdefault(piece_at[(id(model.get_submodule(path)), attr)], []).append(name)
    return list(groups.items())


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_parameter(name).detach().to("cpu").contiguous()


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Persistent buffers (state that is not a parameter): always resident, written with the last shard."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()
            if name not in params}
