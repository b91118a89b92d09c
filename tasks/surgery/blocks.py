"""Block ids (contract): `layers.N`, `layers.N.attn`, `layers.N.mlp`, N an index of the ORIGINAL model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal

Part = Literal["layer", "attn", "mlp"]
_BLOCK_RE = re.compile(r"^layers\.(\d+)(?:\.(attn|mlp))?$")


@dataclass(frozen=True, order=True)
class Block:
    layer: int
    part: Part

    @property
    def id(self) -> str:
        return f"layers.{self.layer}" if self.part == "layer" else f"layers.{self.layer}.{self.part}"

    def units(self) -> tuple[str, ...]:
        """The residual units (sub-blocks) this block covers."""
        if self.part == "layer":
            return (f"layers.{self.layer}.attn", f"layers.{self.layer}.mlp")
        return (self.id,)


def parse_block(block_id: str) -> Block:
    match = _BLOCK_RE.match(block_id)
    if not match:
        raise ValueError(f"bad block id '{block_id}': expected layers.N, layers.N.attn or layers.N.mlp")
    return Block(int(match.group(1)), match.group(2) or "layer")


def units_of(block_ids: Iterable[str]) -> set[str]:
    return {unit for block_id in block_ids for unit in parse_block(block_id).units()}


def candidate_blocks(layer_ids: list[int], granularity: str, removed_units: set[str]) -> list[str]:
    """Blocks still present at this granularity, in model order."""
    out = []
    for layer in layer_ids:
        attn, mlp = f"layers.{layer}.attn", f"layers.{layer}.mlp"
        if granularity == "layer":
            if attn not in removed_units and mlp not in removed_units:
                out.append(f"layers.{layer}")
            continue
        if granularity in ("attn", "sublayer") and attn not in removed_units:
            out.append(attn)
        if granularity in ("mlp", "sublayer") and mlp not in removed_units:
            out.append(mlp)
    return out
