"""Methods that live outside pruneflow: modules that register metrics, strategies, recovery methods,
export formats or architecture adapters with the usual one-line registrations.

They are named by the user, never found in a model folder or a dataset: an installed package declares
them under the entry-point group `pruneflow.plugins`, or `PRUNEFLOW_PLUGINS` lists modules to import
(comma-separated). The spec is composed after they are loaded, so their names and settings validate
like built-in ones.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from tasks.errors import UserError

ENTRY_POINT_GROUP = "pruneflow.plugins"
ENV_VAR = "PRUNEFLOW_PLUGINS"


class PluginError(UserError):
    pass


def plugin_modules() -> list[str]:
    listed = [name.strip() for name in os.environ.get(ENV_VAR, "").split(",") if name.strip()]
    declared = [point.value for point in entry_points(group=ENTRY_POINT_GROUP)]
    return [*declared, *listed]


def load_plugins() -> list[str]:
    """Imports every plugin module (each registers itself); returns their names."""
    names = plugin_modules()
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise PluginError(
                f"plugin module '{name}' (from {ENV_VAR} or the '{ENTRY_POINT_GROUP}' entry points) cannot be "
                f"imported: {exc}"
            ) from exc
    return names
