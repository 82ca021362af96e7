"""User-facing errors: one clear line naming the thing and the fix, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad path, unsupported model, layer out of range, ...).

    The CLI prints ``str(err)`` as one line and exits non-zero; anything else is a bug and keeps
    its traceback.
    """


class BadImageError(UserError):
    """An image file that cannot be decoded (corrupt, truncated, empty or unsupported)."""

    def __init__(self, path: str, reason: str, fix: str = "fix or remove the file"):
        self.path = str(path)
        self.reason = reason
        # the fix is the command's: `extract` adds "or pass --skip-bad", `inspect` has no such flag
        super().__init__(f"bad image {self.path}: {reason} ({fix})")

    def with_fix(self, fix: str) -> BadImageError:
        """The same error with another fix in its message (a command that offers more ways out)."""
        return BadImageError(self.path, self.reason, fix)


class Interrupted(Exception):
    """Raised (e.g. by a SIGTERM handler) to stop a run the way Ctrl-C does: finished work is kept."""
