"""Export formats and their registry: each format writes a pruned model and reads its own checkpoints back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from torch import nn

from tasks.errors import UserError
from tasks.registry import Plugin, Registry


class ExportError(UserError):
    pass


class ExportFormat(Plugin):
    """One checkpoint layout. `write` gets the in-memory pruned model (tasks.surgery's representation);
    `load` returns that same representation, whatever the files look like."""

    name: ClassVar[str]
    # Whether its checkpoints carry pruneflow's modeling code (loaded with trust_remote_code), and whether
    # transformers loads them at all (else only pruneflow reads them).
    carries_code: ClassVar[bool] = False
    servable: ClassVar[bool] = True
    # Whether it keeps recovery adapters that stand where blocks were removed.
    carries_adapters: ClassVar[bool] = False
    # Which width plans it writes: "none", "uniform" (the same widths in every layer) or "per_layer".
    widths: ClassVar[str] = "none"
    # True when `write` saves weights through `common.write_weights`, which writes a streamed model
    # (tasks.stream) piece by piece; a format that reads the whole state dict cannot take one.
    streams: ClassVar[bool] = False

    def problem(self, model: nn.Module) -> str | None:
        """Why this format cannot express `model`, or None when it can."""
        return None

    def source_problem(self, config, tokenizer) -> str | None:
        """Why this format cannot hold a pruned model of this source (its transformers config and tokenizer),
        checked before a run starts; None when it can, or when only the pruned model can tell."""
        return None

    def width_target_problem(self, shape: dict[str, int], strategy: str, dense: dict[str, int]) -> str | None:
        """Why this format cannot hold the plans a width target makes (checked before a run starts), or None.
        `shape`: the sizes asked (model config names), `dense`: the model's (heads, kv_heads, channels)."""
        if self.widths == "none":
            return f"prune.format '{self.name}' writes no width plans; use prune.format auto or hf"
        return None

    def write(self, model: nn.Module, out_dir: Path) -> None:
        """Weights, config.json and any code files (the caller adds tokenizer and generation config)."""
        raise NotImplementedError

    def code_files(self, config: dict) -> dict[str, str]:
        """File name -> text of the modeling code a checkpoint with this config.json carries (none here)."""
        return {}

    def claims(self, config: dict) -> bool:
        """Whether a checkpoint with this config.json is in this format."""
        raise NotImplementedError

    def load(self, path: Path, dtype: str, device: str) -> nn.Module:
        raise NotImplementedError


_FORMATS: Registry[ExportFormat] = Registry("export format", unknown=ExportError)
# Checked last when reading: it accepts any checkpoint transformers itself can load.
_FALLBACK = "hf"


def register_format(cls: type[ExportFormat]) -> type[ExportFormat]:
    _FORMATS.add(cls.name, cls())
    return cls


def format_names() -> list[str]:
    return _FORMATS.names()


def get_format(name: str) -> ExportFormat:
    return _FORMATS.lookup(name)


def read_config(path: Path) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{path} is not a checkpoint folder: it has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{config_file} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ExportError(f"{config_file} is not a JSON object")
    return config


def format_of(path: Path) -> ExportFormat:
    config = read_config(path)
    for name, fmt in _FORMATS.items():
        if name != _FALLBACK and fmt.claims(config):
            return fmt
    return get_format(_FALLBACK)
