"""YAML pipelines: composition with `extends`, `--set dotted.key=value` overrides, validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipelines.spec import PipelineSpec
from tasks.errors import UserError


class SpecError(UserError):
    """A pipeline that cannot be read or validated; `errors` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(f"  - {e}" for e in errors))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(str(path), [f"no such pipeline file: {path}"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [f"not valid YAML: {exc}"]) from exc
    except RecursionError as exc:  # the YAML parser recurses once per nesting level
        raise SpecError(str(path), [_too_deep("<root>")]) from exc
    except UnicodeDecodeError as exc:
        raise SpecError(str(path), [f"not UTF-8 text ({exc.reason} at byte {exc.start})"]) from exc
    if not isinstance(data, dict):
        raise SpecError(str(path), ["a pipeline must be a YAML mapping of sections (name, model, search, ...)"])
    return data


# Choices (a union member picked by its keys or its `method`) are replaced whole, never merged:
# merging {blocks: 8} with {params_ratio: 0.2} would ask for both.
_WHOLE_KEYS = {"target"}


def _switches_choice(base: dict[str, Any], override: dict[str, Any]) -> bool:
    return "method" in override and override["method"] != base.get("method")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if key in _WHOLE_KEYS or (isinstance(value, dict) and isinstance(merged.get(key), dict)
                                  and _switches_choice(merged[key], value)):
            merged[key] = value
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_pipeline(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A pipeline's raw mapping, with `extends: base.yaml` (relative to the file) merged under it."""
    path = path.resolve()
    if path in _seen:
        raise SpecError(str(path), [f"extends cycle: {' -> '.join(str(p) for p in (*_seen, path))}"])
    data = _read_yaml(path)
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str) or not base_name.strip():
        raise SpecError(str(path), [f"extends: expected one file name (a base pipeline beside this one), got {base_name!r}"])
    return deep_merge(read_pipeline(path.parent / str(base_name), (*_seen, path)), data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` strings; values are parsed as YAML (numbers, booleans, lists, mappings)."""
    errors = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            errors.append(f"--set {item!r}: expected dotted.key=value, e.g. search.target.blocks=4")
            continue
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                errors.append(f"--set {key}: '{part}' is not a section")
                break
            node = child
        else:
            try:
                node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as exc:
                errors.append(f"--set {key}: value is not valid YAML: {exc}")
            except RecursionError:
                errors.append(_too_deep(f"--set {key}"))
    if errors:
        raise SpecError("--set", errors)
    return data


def format_validation_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"] if not str(part).startswith("function-"))
        # Tagged-union members put their tag in the location; drop it so paths read like the YAML.
        loc = loc.replace(".blocks.blocks", ".blocks").replace(".params_ratio.params_ratio", ".params_ratio")
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key (not part of the pipeline spec)"
        lines.append(f"{loc or '<root>'}: {message}")
    return lines


# No pipeline section nests anywhere near this deep; far deeper input would exhaust the validator's stack.
MAX_DEPTH = 16


def _too_deep(where: str) -> str:
    return f"{where}: nested more than {MAX_DEPTH} levels deep; a pipeline's sections nest a few levels at most"


def _deepest(data: Any) -> tuple[int, str]:
    """Depth of the most nested value and its dotted path (iterative: the input may be arbitrarily deep)."""
    best, stack = (0, "<root>"), [(data, 0, "")]
    while stack:
        node, depth, where = stack.pop()
        if depth > best[0]:
            best = (depth, where or "<root>")
        if depth > MAX_DEPTH:
            continue
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack += [(v, depth + 1, f"{where}.{k}" if where else str(k)) for k, v in children]
    return best


def validate_mapping(data: dict[str, Any], source: str = "<spec>") -> PipelineSpec:
    depth, where = _deepest(data)
    if depth > MAX_DEPTH:
        raise SpecError(source, [_too_deep(where)])
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, format_validation_errors(exc)) from exc


def load_spec(path: str | Path, overrides: list[str] | None = None) -> PipelineSpec:
    data = read_pipeline(Path(path))
    data = apply_overrides(data, list(overrides or []))
    return validate_mapping(data, str(path))
