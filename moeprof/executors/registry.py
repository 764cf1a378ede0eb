"""The executors by name: adding one is a class in its own module plus a line here."""

from __future__ import annotations

from moeprof.errors import MoeprofError
from moeprof.executors.base import Executor
from moeprof.executors.local import LocalExecutor
from moeprof.executors.ray_ import RayExecutor

REGISTRY: dict[str, type[Executor]] = {
    e.name: e
    for e in (
        LocalExecutor,
        RayExecutor,
    )
}
EXECUTORS: tuple[str, ...] = tuple(REGISTRY)


def check_executor(name: str) -> type[Executor]:
    """The executor class called `name`, once it is known to be able to run here (Ray
    installed); starts nothing."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise MoeprofError(f"unknown executor {name!r}; choose one of {', '.join(REGISTRY)}")
    cls.check_available()
    return cls


def get_executor(name: str, *, workers: int | None = None, address: str | None = None) -> Executor:
    """A ready executor: `workers` parallel tasks (None: every core; on a Ray cluster, every CPU
    it has), `address` of a Ray cluster (ray only; None starts a local runtime)."""
    return check_executor(name)(workers=workers, address=address)


def executor_help() -> str:
    """`--executor` help: every registered executor with its few words."""
    listed = ", ".join(f"{e.name} ({e.help})" for e in REGISTRY.values())
    return f"Where the work runs: {listed}."
