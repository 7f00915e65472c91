"""The error a user can fix, shared by every package (the CLI prints it as one line, exit 2).

`UserError` subclasses ValueError so that callers catching ValueError around a library call keep
working; the CLI, though, prints only `UserError` (and the store/source errors) as one line — a
plain ValueError from a library is a bug and is shown with its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """An error the user can fix (bad flag value, bad input file); one line, exit 2."""


class WriteStopped(OSError):
    """A write failed (disk full, I/O error) and the command stopped after its last complete
    unit of work. Carries that command's summary, which the CLI prints before the one-line
    error (exit 1); the ``errno`` is the failed write's."""

    def __init__(self, message: str, summary: object = None, errno: int | None = None):
        super().__init__(message)
        self.errno = errno
        self.summary = summary
