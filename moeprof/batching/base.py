"""The interface every batching policy implements (docs/method.md, "Batches")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from moeprof.batching.plan import BatchPlan
from moeprof.trace import Trace


class BatchPolicy:
    """Which tokens are loaded together. Subclasses set the class attributes and `plan`."""

    name: ClassVar[str]  # the registry key, `--policy` value and the results JSON's "policy"
    help: ClassVar[str]  # a few words for `--policy` help
    takes_batch_size: ClassVar[bool] = True  # False: the trace fixes the batches (one plan)

    def plan(self, trace: Trace, batch_size: int) -> BatchPlan:
        """The batches of `trace` with B = `batch_size` (ignored when not takes_batch_size)."""
        raise NotImplementedError

    def plans(self, trace: Trace, batch_sizes: Sequence[int]) -> list[BatchPlan]:
        """One plan per batch size; a single plan when the policy takes no batch size."""
        if not self.takes_batch_size:
            return [self.plan(trace, 0)]
        return [self.plan(trace, b) for b in batch_sizes]
