"""The one error type for bad model or corpus sources."""

from __future__ import annotations

from tasks.errors import UserError


class SourceError(UserError):
    """A model or text source cannot be used as given.

    The message names the problem and the accepted values; the CLI turns it into exit code 2.
    """
