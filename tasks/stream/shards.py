"""A checkpoint's tensors read one at a time from its memory-mapped safetensors shards.

Nothing is read until a tensor is asked for, and only that tensor's bytes are then read, so a layer's
weights cost one read of that layer however large the model is. `bytes_read` counts what was read.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from tasks.errors import UserError


class NotMappable(UserError):
    pass


INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ShardIndex:
    """Tensor name -> shard file of one checkpoint folder.

    A shard is mapped only while tensors are read from it: pages of a mapping count in the process's
    resident memory until it is closed, so a mapping kept open would grow to the whole checkpoint."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files = _weight_map(self.folder)
        self._lock = threading.Lock()
        self.bytes_read = 0

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: dict[str, torch.dtype], device: torch.device | str) -> dict[str, torch.Tensor]:
        """The named tensors, each in its dtype on `device`, reading each shard once."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with safe_open(str(self.folder / file), framework="pt", device="cpu") as handle:
                for name in file_names:
                    tensor = handle.get_tensor(name)
                    with self._lock:
                        self.bytes_read += tensor.numel() * tensor.element_size()
                    out[name] = tensor.to(device=device, dtype=names[name])
        return out


def stored_elements(folder: Path) -> int | None:
    """How many weight elements the folder's safetensors shards hold (read from their headers alone), or
    None when it has no safetensors weights."""
    try:
        files = set(_weight_map(Path(folder)).values())
    except NotMappable:
        return None
    total = 0
    for file in files:
        with safe_open(str(Path(folder) / file), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def _weight_map(folder: Path) -> dict[str, str]:
    if (folder / INDEX).is_file():
        return dict(json.loads((folder / INDEX).read_text())["weight_map"])
    if (folder / SINGLE).is_file():
        with safe_open(str(folder / SINGLE), framework="pt", device="cpu") as handle:
            return {name: SINGLE for name in handle.keys()}
    found = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in {".bin", ".pt", ".gguf"})
    raise NotMappable(
        f"model.memory_budget_gb: streaming reads weights from safetensors shards ({SINGLE} or {INDEX}), "
        f"and {folder} has none (found: {', '.join(found) or 'no weight files'}); convert it once with "
        "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, safe_serialization=True)` on a "
        "machine that holds it, or raise model.memory_budget_gb above the model's size to load it whole")
