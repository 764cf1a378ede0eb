"""`ray`: Ray tasks, on a cluster (`address`) or on a local Ray runtime started for the run.

Ray is optional (`pip install 'moeprof[ray]'`) and imported only here, only when this executor is
built. A runtime this executor starts, it shuts down; one already initialised in the process (by
the caller, or by a test) is reused and left running."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Generator, Sequence
from typing import Any, ClassVar, TypeVar

from moeprof.errors import MoeprofError, one_line
from moeprof.executors.base import Executor, check_workers

T = TypeVar("T")
R = TypeVar("R")

_INSTALL = "pip install 'moeprof[ray]'"
_CONNECT_TIMEOUT_S = 5.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise MoeprofError(f"the ray executor needs Ray ({one_line(exc)}): {_INSTALL}") from None
    return ray


def _call(fn: Callable[[T], R], item: T) -> R:
    """The one remote function: `fn` travels as an argument, so a `functools.partial` works too
    (`ray.remote` takes only plain functions)."""
    return fn(item)


def check_reachable(address: str) -> None:
    """Refuse an address no cluster answers on, in seconds: Ray itself retries for minutes and
    prints its retries on stderr."""
    if address in ("auto", "local"):  # Ray resolves these itself, and fails fast
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise MoeprofError(
            f"address {address!r} is not HOST:PORT (for example 10.0.0.1:6379), auto or "
            "ray://HOST:PORT"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or one_line(exc)
        raise MoeprofError(f"cannot reach a Ray cluster at {address}: {reason}") from None


def _original(exc: BaseException, ray: Any) -> BaseException:
    """The exception the task raised, not Ray's wrapper of it."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return exc


class RayExecutor(Executor):
    name: ClassVar[str] = "ray"
    help: ClassVar[str] = "Ray tasks: a cluster with --ray-address, else a local Ray runtime"

    @classmethod
    def check_available(cls) -> None:
        import_ray()

    def __init__(self, *, workers: int | None = None, address: str | None = None) -> None:
        self._ray = ray = import_ray()
        self._started = False
        self.workers = None if workers is None else check_workers(workers)
        quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
        if not ray.is_initialized():
            try:
                if address is not None:
                    check_reachable(address)
                    ray.init(address=address, **quiet)
                else:
                    # address="local": a new runtime even where RAY_ADDRESS names a cluster.
                    ray.init(
                        address="local",
                        num_cpus=check_workers(workers),
                        include_dashboard=False,
                        **quiet,
                    )
            except MoeprofError:
                raise
            except Exception as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
                raise MoeprofError(f"could not start {where}: {one_line(exc)}") from None
            self._started = True
        self._remote = ray.remote(_call)

    def _window(self) -> int:
        """Tasks in flight at once: `workers`, else every CPU the cluster has. Tasks beyond it are
        not submitted yet, so closing early has nothing queued on the cluster to cancel."""
        if self.workers is not None:
            return self.workers
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    def imap_unordered(
        self, fn: Callable[[T], R], items: Sequence[T], *, return_exceptions: bool = False
    ) -> Generator[tuple[int, R], None, None]:
        ray = self._ray
        window = self._window()
        index_of: dict[Any, int] = {}
        next_item = 0
        try:
            while next_item < len(items) or index_of:
                while next_item < len(items) and len(index_of) < window:
                    index_of[self._remote.remote(fn, items[next_item])] = next_item
                    next_item += 1
                ready, _ = ray.wait(list(index_of), num_returns=1)
                for ref in ready:
                    index = index_of.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:
                        original = _original(exc, ray)
                        if return_exceptions and isinstance(original, Exception):
                            yield index, original  # type: ignore[misc]
                            continue
                        raise original from None
                    yield index, result
        finally:  # Ctrl-C, an error, or the caller stopping: nothing more runs
            for ref in index_of:
                ray.cancel(ref)

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False
