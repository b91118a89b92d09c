"""The `recover` section: `method: none`, or the settings class of a registered recovery method.

The section's type is composed from the registry (`recover_section`), so a method registered in its
own module (a plugin's included) is a valid `recover.method` with its own validated settings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field

from tasks.recover.registry import RECOVERY_METHODS
from tasks.settings import Settings


class NoRecovery(Settings):
    method: Literal["none"] = Field("none", description="No recovery: the pruned checkpoint is final.")


def recover_section() -> Any:
    """The discriminated union of `NoRecovery` and every registered method's settings, on `method`."""
    classes = [NoRecovery, *(method.settings for _, method in RECOVERY_METHODS.items())]
    return Annotated[Union[tuple(classes)], Field(discriminator="method")]
