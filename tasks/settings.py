"""The base of every settings section a stage or method takes from the pipeline spec."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model


def _choice(node: dict[str, Any]) -> None:
    # Prefect's form renders `anyOf` as a choice of typed sub-forms but `oneOf` (a discriminated union)
    # as a raw JSON editor; validation stays pydantic's, so the looser keyword loses nothing.
    if "oneOf" in node:
        node["anyOf"] = node.pop("oneOf")
        node.pop("discriminator", None)
    for branch in node.get("anyOf", []):
        if branch.get("type") == "null":
            branch.setdefault("title", "not set")
        if "const" in branch:  # a single-choice select instead of "is a const and cannot be changed"
            branch["enum"] = [branch.pop("const")]
            branch.setdefault("title", str(branch["enum"][0]))


def form_friendly(schema: dict[str, Any], cls: type | None = None) -> None:
    """Shapes a section's JSON schema for the parameter form Prefect draws from it (see `_choice`)."""
    for node in (schema.get("properties") or {}).values():
        _choice(node)
        if "const" in node:
            node["enum"] = [node.pop("const")]


class Settings(BaseModel):
    """Unknown keys are errors (a typo never passes silently), and a section never changes once read."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=form_friendly)


def misplaced_sections(section: Settings, where: str, kind: str, active: str,
                        classes: dict[str, type[Settings]]) -> list[str]:
    """Settings given for a method other than the chosen one (e.g. `search.beam` with strategy iterative)."""
    return [f"{where}.{name} applies only with {where}.{kind}: {name} (the {kind} is '{active}')"
            for name in classes if getattr(section, name, None) is not None and name != active]


def with_method_sections(base: type[Settings], name: str, kind: str, classes: dict[str, type[Settings]],
                          module: str) -> type[Settings]:
    """`base` with a field per registered method that takes settings (`<section>.<method>`), as the class
    `name` of `module` (the spec that composes it)."""
    fields: dict[str, Any] = {
        method: (settings | None, Field(None, description=f"Settings of {kind} {method} (only with that {kind})."))
        for method, settings in classes.items()
    }
    return create_model(name, __base__=base, __module__=module, **fields)
