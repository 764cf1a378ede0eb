"""Batching policies: which tokens are loaded together. Shared by analyze and replay.

Definitions (docs/method.md, DESIGN.md):

- ``tokens``: rows in stored order, cut into consecutive chunks of B rows (the last may be short).
- ``decode``: continuous batching with B slots. Requests enter in order of first appearance; at
  each step every active request contributes its next token (in position order); a finished
  request's slot is taken by the next waiting request at the following step.
- ``recorded``: one batch per distinct ``steps`` value, as the model really ran.

A plan is a permutation of the rows grouped by batch: batch b is ``order[starts[b]:starts[b+1]]``,
batches in execution order. Everything downstream works on (order, starts) with array operations.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from moeprof.errors import MoeprofError
from moeprof.trace import Trace

POLICIES = ("tokens", "decode", "recorded")
MAX_BATCH_SIZE = 2**31 - 1  # rows are indexed by int32-sized counts


@dataclass(frozen=True)
class BatchPlan:
    policy: str
    batch_size: int  # B for tokens/decode; the largest batch for recorded
    order: np.ndarray  # int64 [T]: rows grouped by batch
    starts: np.ndarray  # int64 [n_batches + 1]: batch b = order[starts[b]:starts[b+1]]

    @property
    def n_batches(self) -> int:
        return int(self.starts.shape[0] - 1)

    @property
    def batch_tokens(self) -> np.ndarray:
        """Tokens in each batch, int64 [n_batches]."""
        return np.diff(self.starts)

    @property
    def is_identity(self) -> bool:
        """True when batches are consecutive rows in stored order (no gather needed)."""
        n = self.order.shape[0]
        return bool(n == 0 or (self.order[0] == 0 and (np.diff(self.order) == 1).all()))

    def rows(self, batch: int) -> np.ndarray:
        return self.order[self.starts[batch] : self.starts[batch + 1]]


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise MoeprofError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return policy


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise MoeprofError(f"batch size must be a whole number, got {batch_size!r}")
    if batch_size <= 0:
        raise MoeprofError(f"batch size must be at least 1, got {batch_size}")
    if batch_size > MAX_BATCH_SIZE:
        raise MoeprofError(f"batch size must be at most {MAX_BATCH_SIZE:,}, got {batch_size}")
    return int(batch_size)


def _plan_from_batch_ids(policy: str, batch_size: int, batch_ids: np.ndarray) -> BatchPlan:
    """Group rows by a per-row batch id (ids dense from 0, in execution order)."""
    order = np.argsort(batch_ids, kind="stable").astype(np.int64)
    counts = np.bincount(batch_ids, minlength=int(batch_ids.max()) + 1 if batch_ids.size else 0)
    starts = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    return BatchPlan(policy, batch_size, order, starts)


def request_spans(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """First row and length of each request, in stored (request-major) order."""
    n = trace.n_tokens
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    req = trace.request_ids
    first = np.flatnonzero(np.concatenate(([True], req[1:] != req[:-1]))).astype(np.int64)
    lengths = np.diff(np.concatenate((first, [n]))).astype(np.int64)
    return first, lengths


def decode_start_steps(lengths: np.ndarray, slots: int) -> np.ndarray:
    """Step at which each request enters a continuous batch of `slots` slots.

    List scheduling: the first `slots` requests start at step 0; each later request takes the slot
    that frees first, at the step after the previous occupant's last token. One heap operation per
    request (not per token).
    """
    n_req = lengths.shape[0]
    start = np.zeros(n_req, dtype=np.int64)
    if n_req <= slots:
        return start
    free_at = [int(x) for x in lengths[:slots]]
    heapq.heapify(free_at)
    lens = lengths.tolist()
    for r in range(slots, n_req):
        s = heapq.heappop(free_at)
        start[r] = s
        heapq.heappush(free_at, s + lens[r])
    return start


def plan_batches(trace: Trace, policy: str, batch_size: int) -> BatchPlan:
    """The batches of `trace` under `policy` with B = `batch_size`."""
    check_policy(policy)
    n = trace.n_tokens
    if policy == "tokens":
        b = check_batch_size(batch_size)
        # A batch larger than the trace is the whole trace; clamping keeps the step in int64.
        step = min(b, max(n, 1))
        starts = np.concatenate((np.arange(0, n, step, dtype=np.int64), [n])).astype(np.int64)
        return BatchPlan(policy, b, np.arange(n, dtype=np.int64), starts)
    if policy == "decode":
        b = check_batch_size(batch_size)
        first, lengths = request_spans(trace)
        start_step = decode_start_steps(lengths, b)
        # Row i of request r (rank j within it) runs at step start[r] + j.
        req_index = np.repeat(np.arange(first.shape[0]), lengths)
        rank = np.arange(n, dtype=np.int64) - first[req_index]
        step = start_step[req_index] + rank
        return _plan_from_batch_ids(policy, b, step)
    # recorded
    if trace.steps is None:
        raise MoeprofError(
            "policy 'recorded' needs a trace with recorded steps; this trace has none"
        )
    _, dense = np.unique(trace.steps, return_inverse=True)
    plan = _plan_from_batch_ids(policy, 0, dense.astype(np.int64))
    largest = int(plan.batch_tokens.max()) if plan.n_batches else 0
    return BatchPlan(policy, largest, plan.order, plan.starts)
