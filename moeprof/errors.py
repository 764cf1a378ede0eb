"""The one error type moeprof raises for anything a user can fix; the CLI maps it to an exit code once."""

from __future__ import annotations


class MoeprofError(Exception):
    """A problem with the user's input or environment: printed as one line, exit code 2."""

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (whitespace runs collapsed), else its type's name."""
    return " ".join(str(exc).split()) or type(exc).__name__
