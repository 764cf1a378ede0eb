"""`local`: a `concurrent.futures` process pool on this machine; one worker runs in-process."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import ClassVar, TypeVar

from moeprof.errors import MoeprofError
from moeprof.executors.base import Executor, check_workers

T = TypeVar("T")
R = TypeVar("R")


class LocalExecutor(Executor):
    name: ClassVar[str] = "local"
    help: ClassVar[str] = "a process pool on this machine"

    def __init__(self, *, workers: int | None = None, address: str | None = None) -> None:
        if address is not None:
            raise MoeprofError("address is only for the ray executor")
        self.workers = check_workers(workers)
        self._pool: ProcessPoolExecutor | None = None

    def _pool_for(self, n_items: int) -> ProcessPoolExecutor:
        if self._pool is None:
            # No more processes than items: a pool's processes are forked at the first submit.
            self._pool = ProcessPoolExecutor(max_workers=min(self.workers, n_items))
        return self._pool

    def imap_unordered(
        self, fn: Callable[[T], R], items: Sequence[T], *, return_exceptions: bool = False
    ) -> Generator[tuple[int, R], None, None]:
        if self.workers == 1 or len(items) <= 1:  # no pool to start: this process, in order
            return self._in_process(fn, items, return_exceptions)
        return self._pooled(fn, items, return_exceptions)

    @staticmethod
    def _in_process(
        fn: Callable[[T], R], items: Sequence[T], return_exceptions: bool
    ) -> Generator[tuple[int, R], None, None]:
        for index, item in enumerate(items):
            try:
                result = fn(item)
            except Exception as exc:
                if not return_exceptions:
                    raise
                yield index, exc  # type: ignore[misc]
                continue
            yield index, result

    def _pooled(
        self, fn: Callable[[T], R], items: Sequence[T], return_exceptions: bool
    ) -> Generator[tuple[int, R], None, None]:
        pool = self._pool_for(len(items))
        index_of: dict[Future[R], int] = {pool.submit(fn, item): i for i, item in enumerate(items)}
        running = set(index_of)
        try:
            while running:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    exc = future.exception()
                    if exc is None:
                        yield index_of[future], future.result()
                    elif return_exceptions and isinstance(exc, Exception):
                        yield index_of[future], exc  # type: ignore[misc]
                    else:
                        raise exc
        finally:  # Ctrl-C, an error, or the caller stopping: start nothing more
            for future in running:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            # Tasks not started are dropped; running ones finish so no process is left behind.
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
