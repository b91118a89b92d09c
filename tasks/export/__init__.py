"""Export pruned models in formats that load where models are served, and read any of them back.

Formats (`prune.format`): `hf` (original architecture, whole layers only), `remote_code` (modeling code
in the checkpoint, any removed blocks), `nemotron_nas` (DeciLM block_configs that vLLM serves),
`pruneflow` (weights and record only, read by pruneflow), `gguf` (one file llama.cpp serves). `auto` picks `hf` when only whole layers went,
else `remote_code`, or `pruneflow` for an architecture that has no modeling template.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from tasks.export import gguf_format, hf, nemotron_nas, pruneflow_format, remote_code  # noqa: F401  (register the formats)
from tasks.export.codegen import write_code
from tasks.export.trust import (TokenizerError, TrustError, check_trusted, is_own_format, model_config,
                                package_config)
from tasks.export.common import has_lone_halves, width_problem
from tasks.surgery.adapted import adapter_ranks
from tasks.export.registry import (ExportError, ExportFormat, format_names, format_of, get_format, read_config,
                                   register_format)

log = logging.getLogger(__name__)


def auto_format(model: nn.Module) -> str:
    if not has_lone_halves(model) and not adapter_ranks(model) and not width_problem(model, get_format("hf")):
        return "hf"
    problem = get_format("remote_code").problem(model)
    if problem is None:
        return "remote_code"
    log.warning("%s; writing format 'pruneflow' instead, which only pruneflow reads", problem)
    return "pruneflow"


def resolve_format(requested: str, model: nn.Module) -> str:
    """The concrete format for `requested` (`auto` included), or ExportError saying why it cannot be used."""
    name = auto_format(model) if requested == "auto" else requested
    fmt = get_format(name)
    problem = fmt.problem(model) or width_problem(model, fmt)
    if problem:
        raise ExportError(problem)
    return name


def export_model(model: nn.Module, out_dir: Path, fmt: str = "auto") -> str:
    """Write the pruned in-memory model's weights, config and code to `out_dir`; returns the format used."""
    name = resolve_format(fmt, model)
    get_format(name).write(model, Path(out_dir))
    return name


def checkpoint_format(path: str | Path) -> str:
    return format_of(Path(path)).name


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of any model folder, running code from the folder only when `trust_remote_code` (the
    spec's `model.trust_remote_code`) allows it. pruneflow's own checkpoints get their base architecture's
    config from the package, so transformers never reads their `auto_map`."""
    from transformers import AutoTokenizer

    check_trusted(Path(path), trust_remote_code)
    config = package_config(Path(path)) if is_own_format(Path(path)) else None
    extra = {"config": config} if config is not None else {}
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as exc:  # transformers' way of saying the files are missing or unreadable
        raise TokenizerError(f"{path} has no tokenizer transformers can read: {str(exc).splitlines()[0]} (a model "
                             "folder needs its tokenizer files, e.g. tokenizer.json and tokenizer_config.json)") from exc


def refresh_code(path: str | Path) -> list[str]:
    """Rewrites the modeling code a checkpoint carries with this release's, leaving weights and config as
    they are; returns the files written. Checkpoints from earlier pruneflow releases carry code written
    for the transformers of their day (before 5.24's `cache` keyword, for example)."""
    path = Path(path)
    fmt = format_of(path)
    if not fmt.carries_code:
        with_code = [name for name in format_names() if get_format(name).carries_code]
        raise ExportError(f"{path} is a '{fmt.name}' checkpoint, which carries no modeling code; "
                          f"formats that do: {', '.join(with_code)}")
    return write_code(path, fmt.code_files(read_config(path)))


def load_checkpoint(path: str | Path, dtype: str = "float32", device: str = "cpu") -> nn.Module:
    """Any checkpoint pruneflow reads or writes, as pruneflow's in-memory model (tasks.surgery's form)."""
    return format_of(Path(path)).load(Path(path), dtype, device)


__all__ = [
    "ExportError",
    "ExportFormat",
    "auto_format",
    "checkpoint_format",
    "export_model",
    "format_names",
    "get_format",
    "load_checkpoint",
    "load_tokenizer",
    "model_config",
    "package_config",
    "refresh_code",
    "register_format",
    "resolve_format",
    "TokenizerError",
    "TrustError",
]
