"""The one base class of user errors: what a user can fix in their spec, data, model or folders.

The command line prints such an error's message and exits 2 (no traceback); every other exception is a
bug and keeps its traceback. Each stage raises its own subclass, whose message names the field or input
at fault and what would be accepted.
"""

from __future__ import annotations


class UserError(ValueError):
    pass
