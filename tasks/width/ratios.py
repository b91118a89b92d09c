"""A width in a shape: an absolute count, or the share of the dense model's width kept, written as a percentage.

A share is a string ending in `%` (`"90%"`, `"66.67%"`), never a bare float: YAML reads `1` and `1.0` as
different types, and a float of 1.0 would otherwise mean one unit to the validator and all units to a
reader. It resolves against the widths of the source model (before any pruning), to the nearest whole unit,
halves rounding up; exact fractions, so `"90%"` of 1536 is 1382 on every platform.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Annotated

from pydantic import BeforeValidator, Field

_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")
_FORMS = "an absolute count (an integer, e.g. 1382) or the share of the dense width kept, as a percentage (e.g. '90%')"


def _width(value: object) -> object:
    """Every check is here, so the union below never reports a per-branch error."""
    if isinstance(value, bool) or isinstance(value, float):
        hint = f"; for a share write '{100 * value:g}%'" if isinstance(value, float) and 0 < value <= 1 else ""
        raise ValueError(f"{value!r} is not a width: give {_FORMS}{hint}")
    if isinstance(value, str):
        text = value.replace(" ", "")
        if text.isdigit():
            value = int(text)
        elif (match := _PERCENT.match(text)) is None:
            raise ValueError(f"{value!r} is not a width: give {_FORMS}")
        elif not 0 < Fraction(match.group(1)) <= 100:
            raise ValueError(f"{value!r}: a share kept is above 0% and at most 100%")
        else:
            return text
    if isinstance(value, int) and value < 1:
        raise ValueError(f"{value} is not a width: keep at least 1, or give {_FORMS}")
    return value


# The two branches describe the forms to the parameter form Prefect draws; `_width` has checked the value.
Width = Annotated[Annotated[int, Field(ge=1)] | Annotated[str, Field(pattern=_PERCENT.pattern)],
                  BeforeValidator(_width)]


def is_share(value: int | str | None) -> bool:
    return isinstance(value, str)


def share(value: str) -> Fraction:
    """`"90%"` -> 9/10, exactly."""
    return Fraction(_PERCENT.match(value).group(1)) / 100


def nearest(value: Fraction, step: int = 1) -> int:
    """The multiple of `step` nearest to `value`, halves rounding up."""
    return math.floor(value / step + Fraction(1, 2)) * step


def smallest_share(step: int, dense: int) -> str:
    """The least percentage (two decimals) whose nearest multiple of `step` is not zero, for a refusal's hint."""
    return f"{math.ceil(Fraction(step, 2 * dense) * 10000) / 100:g}%"
