"""``tokens``: rows in stored order, cut into consecutive chunks of B rows (the last may be
short)."""

from __future__ import annotations

import numpy as np

from moeprof.batching.base import BatchPolicy
from moeprof.batching.plan import BatchPlan, check_batch_size
from moeprof.trace import Trace


class TokensPolicy(BatchPolicy):
    name = "tokens"
    help = "consecutive rows"

    def plan(self, trace: Trace, batch_size: int) -> BatchPlan:
        b = check_batch_size(batch_size)
        n = trace.n_tokens
        # A batch larger than the trace is the whole trace; clamping keeps the step in int64.
        step = min(b, max(n, 1))
        starts = np.concatenate((np.arange(0, n, step, dtype=np.int64), [n])).astype(np.int64)
        return BatchPlan(self.name, b, np.arange(n, dtype=np.int64), starts)
