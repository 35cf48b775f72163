"""The one error type a job raises when it cannot go on for a reason its message fully states.

Library code never prints errors or picks exit statuses; it raises. Besides the standard types a command reports
as one line (`ValueError`, `FileNotFoundError`, ... see `fcdiffusion.cli`), `RunError` covers the rest: a busy
checkpoint folder, a training run stopped by a signal (status 128 + the signal), a port the demo cannot serve on.
"""
from __future__ import annotations


class RunError(Exception):
    """A job stopped for the reason in its message; a command prints `<label>: <message>` and exits with `status`."""

    def __init__(self, message: str, status: int = 1, label: str = "error"):
        super().__init__(message)
        self.status, self.label = status, label


class OutputError(RunError):
    """An output that could not be written (a full disk, a read-only file system); the message says which, and where
    the results that were made are kept."""
