"""`model.memory_budget_gb`: whether a model runs resident or streamed, decided before anything is read."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tasks.errors import UserError

GB = 1e9
# `auto` leaves room for activations, states and the process itself.
AUTO_SHARE = 0.75


class BudgetError(UserError):
    pass


def available_bytes(device: str) -> int:
    """Memory free for weights on `device` now: the device's free memory, or the host's available memory."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def budget_bytes(setting: float | str, device: str) -> int:
    if setting == "auto":
        return int(available_bytes(device) * AUTO_SHARE)
    return int(float(setting) * GB)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter (tied ones once) in the model's dtype."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@dataclass(frozen=True)
class Residency:
    """The decision for one model: `streams` and why, with the numbers a message or an estimate needs."""

    budget_bytes: int
    weight_bytes: int
    setting: float | str

    @property
    def streams(self) -> bool:
        return self.weight_bytes > self.budget_bytes

    def describe(self) -> str:
        how = "streamed layer by layer" if self.streams else "resident"
        return f"{how}: weights {gb(self.weight_bytes)} GB, model.memory_budget_gb {self.setting} ({gb(self.budget_bytes)} GB)"


def check_pieces(sizes: dict[str, tuple[str, int]], together: list[tuple[str, ...]], budget: int, setting) -> None:
    """Refuse a budget below what must be resident at once: the largest piece, or pieces a step holds together."""
    needs = [(" with ".join(sizes[n][0] for n in group), sum(sizes[n][1] for n in group))
             for group in [*((n,) for n in sizes), *together] if all(n in sizes for n in group)]
    label, largest = max(needs, key=lambda need: need[1])
    if budget < largest:
        raise BudgetError(
            f"model.memory_budget_gb: {setting} ({gb(budget)} GB) is smaller than the largest piece that "
            f"must be on the device at once, {label}: {gb(largest)} GB; set it to at least "
            f"{_round_up_gb(largest)}, or 'auto'")


def gb(nbytes: float) -> str:
    """GB to three significant digits (0.000123, 0.113, 141)."""
    return f"{nbytes / GB:.3g}"


def _round_up_gb(nbytes: int) -> str:
    """GB to three significant digits, rounded up so that the figure suggested is enough."""
    step = 10 ** (math.floor(math.log10(nbytes / GB)) - 2)
    return f"{math.ceil(nbytes / GB / step) * step:.3g}"
