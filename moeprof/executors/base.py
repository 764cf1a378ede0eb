"""The interface every executor implements: map a module-level function over items, results as
they finish (docs/sweep.md, "Executors")."""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Sequence
from types import TracebackType
from typing import ClassVar, TypeVar

from moeprof.errors import MoeprofError

T = TypeVar("T")
R = TypeVar("R")
E = TypeVar("E", bound="Executor")


def check_workers(workers: int | None) -> int:
    """`workers` as a count of parallel tasks (None: every core of this machine)."""
    if workers is None:
        return os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise MoeprofError(f"workers must be 1 or more, got {workers!r}")
    return workers


class Executor:
    """Runs `fn(item)` for each item somewhere else. Subclasses set `name`, `help` and
    `imap_unordered`; `map` and the context manager come from here.

    `fn` must be a picklable module-level function (or a `functools.partial` of one): it and the
    items travel to the workers by pickle, so workers need moeprof importable and any file an
    item names readable."""

    name: ClassVar[str]  # the registry key and the `--executor` value
    help: ClassVar[str]  # a few words for `--executor` help

    def __init__(self, *, workers: int | None = None, address: str | None = None) -> None:
        """`workers`: tasks run at once (None: the executor's default); `address`: where a
        cluster is, for the executors that use one (a MoeprofError for the others)."""

    @classmethod
    def check_available(cls) -> None:
        """Raise a MoeprofError when this executor cannot run here (a missing optional package);
        cheap, starts nothing."""

    def imap_unordered(
        self, fn: Callable[[T], R], items: Sequence[T], *, return_exceptions: bool = False
    ) -> Generator[tuple[int, R], None, None]:
        """`(index, fn(items[index]))` as tasks finish. A task that raises an `Exception` ends the
        iteration with that exception (its original type and message), or, with
        `return_exceptions`, is yielded as `(index, exception)` and the others go on. Closing the
        iterator early (Ctrl-C, an error, `break`) cancels the tasks not started."""
        raise NotImplementedError

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """`[fn(item) for item in items]`, in item order, run in parallel; the first task to
        raise ends it with that exception."""
        results: dict[int, R] = {}
        iterator = self.imap_unordered(fn, items)
        try:
            for index, result in iterator:
                results[index] = result
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        return [results[i] for i in range(len(items))]

    def close(self) -> None:
        """Release the workers (only what this executor started)."""

    def __enter__(self: E) -> E:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
