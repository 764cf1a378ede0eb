"""``decode``: continuous batching with B slots.

Requests enter in order of first appearance; at each step every active request contributes its
next token (in position order); a finished request's slot is taken by the next waiting request
at the following step.
"""

from __future__ import annotations

import heapq

import numpy as np

from moeprof.batching.base import BatchPolicy
from moeprof.batching.plan import BatchPlan, check_batch_size, plan_from_batch_ids
from moeprof.trace import Trace


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


class DecodePolicy(BatchPolicy):
    name = "decode"
    help = "continuous batching, B slots"

    def plan(self, trace: Trace, batch_size: int) -> BatchPlan:
        b = check_batch_size(batch_size)
        first, lengths = request_spans(trace)
        start_step = decode_start_steps(lengths, b)
        # Row i of request r (rank j within it) runs at step start[r] + j.
        req_index = np.repeat(np.arange(first.shape[0]), lengths)
        rank = np.arange(trace.n_tokens, dtype=np.int64) - first[req_index]
        step = start_step[req_index] + rank
        return plan_from_batch_ids(self.name, b, step)
