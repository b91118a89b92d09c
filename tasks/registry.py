"""One registry shape for every kind of plugin (metrics, strategies, recovery methods, export formats,
evaluators, architecture adapters): a name registered twice is refused, and an unknown name is answered
with the closest known ones. Class-based plugins share one base, `Plugin`: a name, an optional settings
section and an optional extra that must be installed."""

from __future__ import annotations

import difflib
import importlib.util
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, TypeVar

from tasks.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Extra:
    """An optional dependency of a plugin: the modules it imports and how a user installs them."""

    modules: tuple[str, ...]
    install: str  # e.g. "pip install 'pruneflow[recover]'"

    def missing(self) -> list[str]:
        return [m for m in self.modules if importlib.util.find_spec(m) is None]


class Plugin:
    """What every class-based plugin declares: its registry name, its settings section (a
    `tasks.settings.Settings` class, or None for a plugin that takes none) and the extra it needs."""

    name: ClassVar[str]
    settings: ClassVar[Any] = None
    extra: ClassVar[Extra | None] = None

    def missing_extra(self, field: str) -> str | None:
        """Why this plugin cannot run here (its extra is not installed), naming the spec field; or None."""
        missing = self.extra.missing() if self.extra is not None else []
        if not missing:
            return None
        return f"{field} '{self.name}' needs {', '.join(missing)}, which is not installed: {self.extra.install}"


class MissingExtra(UserError):
    """A chosen plugin needs an optional extra that is not installed."""


class UnknownName(UserError):
    """A spec or call named a plugin that is not registered."""


class DuplicateRegistration(ValueError):
    """Two plugins claimed one name: a programming error, raised at import time."""


class Registry(Mapping[str, T]):
    """Read like a dict (`registry[name]`, `in`, `.items()`); written only through `add` and `remove`."""

    def __init__(self, kind: str, unknown: type[Exception] = UnknownName):
        self.kind = kind  # "metric", "recovery method", ... as the user's messages name it
        self.unknown = unknown  # the error an unknown name raises (the stage's own user error)
        self._items: dict[str, T] = {}
        self._origins: dict[str, str] = {}

    def add(self, name: str, item: T, origin: object = None) -> T:
        """Registers `item`; `origin` is the definition it comes from when that is not the item itself
        (a strategy's needs come from its function)."""
        source = _origin(item if origin is None else origin)
        if name in self._origins and self._origins[name] != source:
            raise DuplicateRegistration(f"{self.kind} '{name}' is registered twice: {self._origins[name]} and {source}")
        # The same definition again (a module imported under two names, a reload) replaces itself.
        self._items[name], self._origins[name] = item, source
        return item

    def remove(self, name: str) -> None:
        """Unregisters `name` (tests that register a toy plugin clean up with it)."""
        del self._items[name], self._origins[name]

    def lookup(self, name: str) -> T:
        """The plugin called `name`, or the registry's user error naming the closest and every known name."""
        if name not in self._items:
            raise self.unknown(self.unknown_message(name))
        return self._items[name]

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names(), n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown {self.kind} '{name}'{guess}; known: {', '.join(self.names())}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def _origin(item: object) -> str:
    # Instances (metrics, formats, adapters) are known by their class; strategies are plain functions.
    target = item if inspect.isfunction(item) or isinstance(item, type) else type(item)
    return f"{target.__module__}.{target.__qualname__}"
