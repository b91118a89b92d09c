"""Which code reading a model folder would run, and the one rule about it: none from the folder unless trusted.

transformers runs Python shipped in a folder when `config.json` or `tokenizer_config.json` maps an Auto
class to one of its files (`auto_map`), and asks on the terminal when `trust_remote_code` is left unset.
pruneflow always passes it explicitly: false unless the spec says `model.trust_remote_code: true`.
Checkpoints in pruneflow's own formats are read with the package's classes (tasks.export.common), so
their `auto_map` never needs trust; a tokenizer mapped to a folder's file does, whoever wrote the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.errors import UserError
from tasks.export.codegen import SHARED, render
from tasks.export.common import base_values
from tasks.export.registry import ExportError, format_of, read_config
from tasks.surgery.architecture import supported_model_types

TRUST_SETTING = "model.trust_remote_code"
_MAPPED_FILES = ("config.json", "tokenizer_config.json")


class TrustError(UserError):
    pass


class UnreadableConfig(UserError):
    pass


class TokenizerError(UserError):
    pass


def is_own_format(path: Path) -> bool:
    """Whether pruneflow reads this checkpoint with its own classes (any format but plain `hf`)."""
    return (Path(path) / "config.json").is_file() and format_of(Path(path)).name != "hf"


def folder_code(path: Path) -> list[str]:
    """`file: AutoClass -> module.Class` for every class a folder maps to its own code, as transformers would load it."""
    path = Path(path)
    found = []
    for name in _MAPPED_FILES:
        if name == "config.json" and is_own_format(path):
            continue
        file = path / name
        if not file.is_file():
            continue
        try:
            auto_map = json.loads(file.read_text()).get("auto_map") or {}
        except (json.JSONDecodeError, AttributeError) as exc:
            raise TrustError(f"model folder {path}: {name} is not a JSON object ({exc})") from exc
        entries = auto_map.items() if isinstance(auto_map, dict) else [("?", auto_map)]
        found += [f"{name}: {auto} -> {target}" for auto, target in entries]
    return found


def check_trusted(path: Path, trusted: bool, setting: str = TRUST_SETTING) -> None:
    """Refuses a folder that needs its own code to load unless `setting` is true; never asks on a terminal."""
    code = folder_code(path)
    if code and not trusted:
        raise TrustError(
            f"{setting}: {path} needs code from the folder to load ({'; '.join(code)}), and pruneflow runs no code "
            f"from a model folder unless the spec asks; read that code, then set {setting}: true, or use a "
            "folder without custom code"
        )


def ships_own_code(path: Path) -> bool:
    """Whether every Python file in the checkpoint is, byte for byte, what this release writes for its config."""
    path = Path(path)
    fmt = format_of(path)
    if not fmt.carries_code:
        return False
    expected = {**{name: render(name, []) for name in SHARED}, **fmt.code_files(json.loads((path / "config.json").read_text()))}
    present = {p.name: p.read_text() for p in path.glob("*.py")}
    return present == expected


def package_config(path: Path):
    """The base architecture's config of a checkpoint in one of pruneflow's formats, built by transformers'
    own class for that model type (no code from the folder)."""
    from transformers import AutoConfig

    config = read_config(path)
    record = config.get("pruneflow") or {}
    base = record.get("base_model_type") or ("llama" if format_of(path).name == "nemotron_nas" else None)
    if base is None:
        raise ExportError(f"{path}/config.json: pruneflow record lacks base_model_type")
    return AutoConfig.for_model(base, **base_values(config))


def model_config(path: Path, trusted: bool = False, setting: str = "model.source"):
    """The config of any model folder pruneflow reads, with the folder's code only when trusted."""
    from transformers import AutoConfig

    path = Path(path)
    if is_own_format(path):
        return package_config(path)
    check_trusted(path, trusted)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trusted)
    except (ValueError, KeyError, OSError) as exc:
        model_type = _declared_model_type(path)
        raise UnreadableConfig(
            f"{setting}: {path}/config.json has model_type '{model_type}', which this transformers release does "
            f"not know; supported model types: {', '.join(supported_model_types())}"
        ) from exc


def _declared_model_type(path: Path) -> str:
    try:
        return str(json.loads((path / "config.json").read_text()).get("model_type"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return "?"
