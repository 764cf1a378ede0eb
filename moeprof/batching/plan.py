"""What a batching policy produces: a plan of batches, and the checks every policy shares.

A plan is a permutation of the rows grouped by batch: batch b is ``order[starts[b]:starts[b+1]]``,
batches in execution order. Everything downstream works on (order, starts) with array operations
(docs/method.md, "Batches").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from moeprof.errors import MoeprofError, is_whole_number

MAX_BATCH_SIZE = 2**31 - 1  # rows are indexed by int32-sized counts


@dataclass(frozen=True)
class BatchPlan:
    policy: str  # the policy's registry name (the results JSON's "policy")
    batch_size: int  # B for policies that take one; the largest batch otherwise
    order: np.ndarray  # int64 [T]: rows grouped by batch
    starts: np.ndarray  # int64 [n_batches + 1]: batch b = order[starts[b]:starts[b+1]]

    @property
    def n_batches(self) -> int:
        return int(self.starts.shape[0] - 1)

    @property
    def n_rows(self) -> int:
        """Rows the plan covers (a plan cut to its first batches covers the first of them)."""
        return int(self.starts[-1])

    @property
    def batch_tokens(self) -> np.ndarray:
        """Tokens in each batch, int64 [n_batches]."""
        return np.diff(self.starts)

    @cached_property
    def is_identity(self) -> bool:
        """True when batches are consecutive rows in stored order (no gather needed)."""
        n = self.order.shape[0]
        return bool(n == 0 or (self.order[0] == 0 and (np.diff(self.order) == 1).all()))

    @cached_property
    def equal_contiguous(self) -> bool:
        """True when batches are consecutive rows of `batch_size` each (the last may be
        shorter): per-batch reductions are then a reshape, faster than a gather and reduceat."""
        if self.n_batches == 0 or not self.is_identity:
            return False
        sizes = self.batch_tokens
        return bool((sizes[:-1] == self.batch_size).all() and sizes[-1] <= self.batch_size)

    def rows(self, batch: int) -> np.ndarray:
        return self.order[self.starts[batch] : self.starts[batch + 1]]

    def head(self, max_batches: int | None) -> BatchPlan:
        """The first `max_batches` batches (all when None or more than there are)."""
        if max_batches is None or max_batches >= self.n_batches:
            return self
        if max_batches < 1:
            raise MoeprofError(f"max_batches must be at least 1, got {max_batches}")
        starts = self.starts[: max_batches + 1]
        return BatchPlan(self.policy, self.batch_size, self.order[: int(starts[-1])], starts)


def check_batch_size(batch_size: Any) -> int:
    if not is_whole_number(batch_size):
        raise MoeprofError(f"batch size must be a whole number, got {batch_size!r}")
    if batch_size <= 0:
        raise MoeprofError(f"batch size must be at least 1, got {batch_size}")
    if batch_size > MAX_BATCH_SIZE:
        raise MoeprofError(f"batch size must be at most {MAX_BATCH_SIZE:,}, got {batch_size}")
    return int(batch_size)


def check_batch_sizes(batch_sizes: Iterable[int]) -> list[int]:
    """Whole positive batch sizes -> sorted distinct ints; anything else is a MoeprofError."""
    if isinstance(batch_sizes, str):
        raise MoeprofError(f"batch sizes must be whole numbers, not the text {batch_sizes!r}")
    sizes = [check_batch_size(b) for b in batch_sizes]
    if not sizes:
        raise MoeprofError("no batch sizes given")
    return sorted(set(sizes))


def plan_from_batch_ids(policy: str, batch_size: int, batch_ids: np.ndarray) -> BatchPlan:
    """Group rows by a per-row batch id (ids dense from 0, in execution order)."""
    order = np.argsort(batch_ids, kind="stable").astype(np.int64)
    counts = np.bincount(batch_ids, minlength=int(batch_ids.max()) + 1 if batch_ids.size else 0)
    starts = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    return BatchPlan(policy, batch_size, order, starts)
