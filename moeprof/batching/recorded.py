"""``recorded``: one batch per distinct ``steps`` value, as the model really ran. The batch size
does not apply; the plan reports the largest batch."""

from __future__ import annotations

import numpy as np

from moeprof.batching.base import BatchPolicy
from moeprof.batching.plan import BatchPlan, plan_from_batch_ids
from moeprof.errors import MoeprofError
from moeprof.trace import Trace


class RecordedPolicy(BatchPolicy):
    name = "recorded"
    help = "the steps the model really ran"
    takes_batch_size = False

    def plan(self, trace: Trace, batch_size: int) -> BatchPlan:
        if trace.steps is None:
            raise MoeprofError(
                f"policy {self.name!r} needs a trace with recorded steps; this trace has none"
            )
        _, dense = np.unique(trace.steps, return_inverse=True)
        plan = plan_from_batch_ids(self.name, 0, dense.astype(np.int64))
        largest = int(plan.batch_tokens.max()) if plan.n_batches else 0
        return BatchPlan(self.name, largest, plan.order, plan.starts)
