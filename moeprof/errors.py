"""The one error type moeprof raises for anything a user can fix; the CLI maps it to an exit code once."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any


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


def check_names(
    names: Iterable[str], known: Sequence[str], *, param: str, plural: str, singular: str
) -> tuple[str, ...]:
    """Known, distinct names in `known`'s order (the order runs and reports use); empty items
    skipped. A MoeprofError names the parameter (`param`) given as text, an empty choice, or
    the first unknown `singular`."""
    if isinstance(names, str):
        raise MoeprofError(f"{param} must be a list of names, not the text {names!r}")
    chosen = [n for n in names if n]
    if not chosen:
        raise MoeprofError(f"no {plural} given; choose from {', '.join(known)}")
    for name in chosen:
        if name not in known:
            raise MoeprofError(f"unknown {singular} {name!r}; choose from {', '.join(known)}")
    return tuple(n for n in known if n in chosen)


def is_whole_number(value: Any) -> bool:
    """An int or a numpy integer, not a bool (bool is an int subclass, and True is no count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
