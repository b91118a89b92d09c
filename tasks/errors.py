"""The one base class of user errors: what a user can fix in their spec, data, model or folders.

The command line prints such an error's message and exits 2 (no traceback); every other exception is a
bug and keeps its traceback. Each stage raises its own subclass, whose message names the field or input
at fault and what would be accepted.
"""

from __future__ import annotations


class UserError(ValueError):
    pass


class DiskFull(UserError):
    """A write ran out of space: the user's to fix (free space, or another folder), then the run resumes."""


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an error it came from, is the operating system's "no space left on device"
    (safetensors and DuckDB wrap it in their own exception types, with the OS message kept)."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc) or "StorageFull" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
