"""Errors a user can act on: a one-line message and a hint, shown by the CLI without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: bad input, a missing file, a server that is not running."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message if hint is None else f"{message} (hint: {hint})")
        self.message = message
        self.hint = hint
