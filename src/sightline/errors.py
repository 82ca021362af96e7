"""User-facing errors: one clear line naming the thing and the fix, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad path, unsupported model, layer out of range, ...).

    The CLI prints ``str(err)`` as one line and exits non-zero; anything else is a bug and keeps
    its traceback.
    """


class BadImageError(UserError):
    """An image file that cannot be decoded (corrupt, truncated, empty or unsupported)."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"bad image {self.path}: {reason} (fix or remove the file, or pass --skip-bad)")
