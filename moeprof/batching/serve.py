"""``serve``: continuous batching with chunked prefill, as vLLM and SGLang schedule (docs/schedule.md).

At most B requests run at once (``max_num_seqs``) within a budget of tokens per step
(``max_num_batched_tokens``). Each step every running request whose prompt is done contributes
its next token, in admission order while the budget lasts; what is left of the budget goes to
prompt chunks of the running requests, in admission order. A request whose last row has run
leaves after that step; a free slot admits a waiting request at the start of the next step,
chosen by an :class:`Admission` policy (FIFO here; affinity and the others in
:mod:`moeprof.schedule`). A request's prompt is its leading run of prefill rows (``phase`` 0);
a trace without phases is all decode, and then ``serve`` with FIFO equals ``decode``.

The loop runs once per step (not per token or request): each step is a few array operations on
the running requests.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from moeprof.batching.base import BatchPolicy
from moeprof.batching.decode import request_spans
from moeprof.batching.plan import BatchPlan, check_batch_size, plan_from_batch_ids
from moeprof.errors import MoeprofError, is_whole_number
from moeprof.trace import PHASE_PREFILL, Trace

DEFAULT_MAX_TOKENS_PER_STEP = 2048  # vLLM's max_num_batched_tokens default for chunked prefill


@dataclass(frozen=True)
class Requests:
    """Each request's rows in stored (request-major) order."""

    first: np.ndarray  # int64 [R]: first row
    length: np.ndarray  # int64 [R]: rows
    prompt: np.ndarray  # int64 [R]: leading prefill rows (run in chunks)

    @property
    def n_requests(self) -> int:
        return int(self.first.shape[0])


def request_table(trace: Trace) -> Requests:
    """First row, length and prompt length of every request of `trace`."""
    first, length = request_spans(trace)
    if trace.phase is None or first.size == 0:
        return Requests(first, length, np.zeros_like(length))
    # The prompt ends at a request's first non-prefill row (or its end).
    req_index = np.repeat(np.arange(first.shape[0]), length)
    not_prompt = np.flatnonzero(trace.phase != PHASE_PREFILL)
    end = first + length
    first_other = np.full(first.shape[0], -1, dtype=np.int64)
    # Rows are sorted, so each request's first non-prefill row is its first in `not_prompt`.
    owners, at = np.unique(req_index[not_prompt], return_index=True)
    first_other[owners] = not_prompt[at]
    prompt_end = np.where(first_other >= 0, first_other, end)
    return Requests(first, length, (prompt_end - first).astype(np.int64))


def check_max_tokens_per_step(value: Any) -> int:
    if not is_whole_number(value):
        raise MoeprofError(f"max_tokens_per_step must be a whole number, got {value!r}")
    if value < 1:
        raise MoeprofError(
            f"max_tokens_per_step must be at least 1 (one token per step), got {value}"
        )
    return int(value)


def check_max_wait(value: Any) -> int | None:
    if value is None:
        return None
    if not is_whole_number(value) or value < 0:
        raise MoeprofError(f"max_wait must be a whole number of steps, 0 or more, got {value!r}")
    return int(value)


MAX_ARRIVAL_STEP = 2**62  # arrival steps stay far inside int64


def check_arrival_rate(value: Any) -> float | None:
    if value is None:
        return None
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)) or float(value) <= 0:
        raise MoeprofError(
            f"arrival_rate must be a positive number of requests per step, got {value!r}"
        )
    return float(value)


def arrival_steps(n_requests: int, arrival_rate: float | None, seed: int = 0) -> np.ndarray:
    """Step at which each request arrives, int64 [R], non-decreasing in stored order: all at
    step 0 (None), or a Poisson process of `arrival_rate` requests per step (seeded)."""
    if arrival_rate is None:
        return np.zeros(n_requests, dtype=np.int64)
    rate = check_arrival_rate(arrival_rate)
    assert rate is not None
    gaps = np.random.default_rng(check_seed(seed)).exponential(1.0 / rate, size=n_requests)
    arrivals = np.floor(np.cumsum(gaps))
    if arrivals.size and not arrivals[-1] < MAX_ARRIVAL_STEP:  # a cast past int64 would wrap
        raise MoeprofError(
            f"arrival_rate {rate!r} is too small: the requests would arrive over more than "
            f"{MAX_ARRIVAL_STEP:,} steps"
        )
    return arrivals.astype(np.int64)


def check_seed(seed: object) -> int:
    """A seed numpy takes: a whole number, 0 or more."""
    whole = is_whole_number(seed)
    if not whole or int(seed) < 0:  # type: ignore[call-overload]
        raise MoeprofError(f"seed must be a whole number, 0 or more, got {seed!r}")
    return int(seed)  # type: ignore[call-overload]


class Admission:
    """Which waiting request a free slot takes. One object serves one simulation: `start` resets
    it; `admitted` and `left` tell it how the running set changes."""

    name: ClassVar[str]
    barrier: ClassVar[bool] = False  # True: admit only when no request runs (static groups)

    def start(self, n_requests: int) -> None:
        """Called once before the first step."""

    def pick(self, waiting: np.ndarray, lo: int, hi: int) -> int:
        """A request index r in [lo, hi) with ``waiting[r]`` true (`waiting`: bool [R]; every
        waiting request lies in [lo, hi), ordered by arrival)."""
        raise NotImplementedError

    def admitted(self, request: int) -> None:
        """`request` joined the running batch."""

    def left(self, request: int) -> None:
        """`request` ran its last row."""


class FifoAdmission(Admission):
    """First come, first served: the earliest waiting request."""

    name = "fifo"

    def pick(self, waiting: np.ndarray, lo: int, hi: int) -> int:
        return lo  # lo is the earliest waiting request


@dataclass(frozen=True)
class ServeRun:
    """One serving simulation: the plan and what each request and step saw."""

    plan: BatchPlan
    arrival_step: np.ndarray  # int64 [R]
    admit_step: np.ndarray  # int64 [R]
    finish_step: np.ndarray  # int64 [R]: the step that ran its last row
    step_of_batch: np.ndarray  # int64 [n_batches]: the clock of each executed step
    running: np.ndarray  # int64 [n_batches]: requests running in each executed step
    n_steps: int  # the clock when the pool has drained (idle steps included)
    decisions: int  # requests admitted by the policy's choice (not by max_wait)
    decision_seconds: float  # time spent choosing

    @property
    def wait_steps(self) -> np.ndarray:
        return self.admit_step - self.arrival_step


def simulate_serve(
    trace: Trace,
    batch_size: int,
    *,
    max_tokens_per_step: int = DEFAULT_MAX_TOKENS_PER_STEP,
    admission: Admission | None = None,
    arrivals: np.ndarray | None = None,
    max_wait: int | None = None,
    policy_name: str = "serve",
) -> ServeRun:
    """Serve every request of `trace` (module docstring). `arrivals`: step of each request's
    arrival (default all 0); `max_wait`: a request that has waited that many steps is admitted
    next whatever the admission policy prefers (0 is FIFO)."""
    b = check_batch_size(batch_size)
    budget = check_max_tokens_per_step(max_tokens_per_step)
    max_wait = check_max_wait(max_wait)
    chooser = admission if admission is not None else FifoAdmission()
    table = request_table(trace)
    n_req = table.n_requests
    arrival = np.zeros(n_req, np.int64) if arrivals is None else np.asarray(arrivals, np.int64)
    if arrival.shape != (n_req,) or (
        n_req > 0 and ((np.diff(arrival) < 0).any() or arrival.min() < 0)
    ):
        raise MoeprofError("arrivals must be one non-decreasing step (0 or more) per request")
    prompt, length = table.prompt, table.length
    chooser.start(n_req)

    admit_step = np.full(n_req, -1, dtype=np.int64)
    finish_step = np.full(n_req, -1, dtype=np.int64)
    waiting = np.zeros(n_req, dtype=bool)
    run_req = np.zeros(0, dtype=np.int64)  # running requests, in admission order
    run_done = np.zeros(0, dtype=np.int64)  # rows each has run
    seg_req: list[np.ndarray] = []
    seg_start: list[np.ndarray] = []
    seg_count: list[np.ndarray] = []
    steps: list[int] = []
    running: list[int] = []
    clock = n_arrived = head = finished = decisions = 0
    decide_s = 0.0
    while finished < n_req:
        arrived = int(np.searchsorted(arrival, clock, side="right"))
        waiting[n_arrived:arrived] = True
        n_arrived = arrived
        while head < n_arrived and not waiting[head]:
            head += 1
        n_waiting = int(np.count_nonzero(waiting[head:n_arrived])) if head < n_arrived else 0
        if run_req.shape[0] == 0 and not n_waiting:
            clock = int(arrival[n_arrived])  # idle until the next arrival
            continue
        free = b - run_req.shape[0]
        if chooser.barrier and run_req.shape[0]:
            free = 0
        if free and n_waiting:
            t0 = time.perf_counter()
            new: list[int] = []
            for _ in range(min(free, n_waiting)):
                if max_wait is not None and clock - int(arrival[head]) >= max_wait:
                    r = head
                else:
                    r = chooser.pick(waiting, head, n_arrived)
                    decisions += 1
                if not waiting[r]:
                    raise MoeprofError(f"admission {chooser.name!r} chose request {r}, not waiting")
                waiting[r] = False
                admit_step[r] = clock
                chooser.admitted(r)
                new.append(r)
                while head < n_arrived and not waiting[head]:
                    head += 1
            decide_s += time.perf_counter() - t0
            run_req = np.concatenate((run_req, np.asarray(new, dtype=np.int64)))
            run_done = np.concatenate((run_done, np.zeros(len(new), dtype=np.int64)))
        # This step's tokens: one per decoding request while the budget lasts, then prompt chunks.
        rest_prompt = np.maximum(prompt[run_req] - run_done, 0)
        decoding = rest_prompt == 0
        take = np.zeros(run_req.shape[0], dtype=np.int64)
        dec = np.flatnonzero(decoding)[:budget]
        take[dec] = 1
        left = budget - dec.shape[0]
        if left > 0:
            pre = np.flatnonzero(~decoding)
            need = rest_prompt[pre]
            before = np.cumsum(need) - need
            take[pre] = np.clip(left - before, 0, need)
        ran = take > 0
        seg_req.append(run_req[ran])
        seg_start.append(run_done[ran])
        seg_count.append(take[ran])
        steps.append(clock)
        running.append(int(run_req.shape[0]))
        run_done = run_done + take
        done = run_done == length[run_req]
        if done.any():
            gone = run_req[done]
            finish_step[gone] = clock
            for r in gone.tolist():
                chooser.left(r)
            finished += int(gone.shape[0])
            run_req, run_done = run_req[~done], run_done[~done]
        clock += 1

    plan = _plan_from_segments(policy_name, b, trace.n_tokens, table, seg_req, seg_start, seg_count)
    return ServeRun(
        plan=plan,
        arrival_step=arrival,
        admit_step=admit_step,
        finish_step=finish_step,
        step_of_batch=np.asarray(steps, dtype=np.int64),
        running=np.asarray(running, dtype=np.int64),
        n_steps=clock,
        decisions=decisions,
        decision_seconds=decide_s,
    )


def _plan_from_segments(
    policy: str,
    batch_size: int,
    n_rows: int,
    table: Requests,
    seg_req: list[np.ndarray],
    seg_start: list[np.ndarray],
    seg_count: list[np.ndarray],
) -> BatchPlan:
    """Rows of each step from its (request, first rank, count) segments, as a plan."""
    if not seg_req:
        return plan_from_batch_ids(policy, batch_size, np.zeros(0, dtype=np.int64))
    per_step = np.asarray([s.shape[0] for s in seg_req], dtype=np.int64)
    req = np.concatenate(seg_req)
    start = np.concatenate(seg_start)
    count = np.concatenate(seg_count)
    step = np.repeat(np.arange(per_step.shape[0], dtype=np.int64), per_step)
    seg_first = table.first[req] + start
    offset = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(
        np.cumsum(count) - count, count
    )
    rows = np.repeat(seg_first, count) + offset
    batch_of_row = np.empty(n_rows, dtype=np.int64)
    batch_of_row[rows] = np.repeat(step, count)
    return plan_from_batch_ids(policy, batch_size, batch_of_row)


class ServePolicy(BatchPolicy):
    name = "serve"
    help = "continuous batching with chunked prefill, B running, 2048 tokens per step, FIFO"

    def __init__(
        self,
        max_tokens_per_step: int = DEFAULT_MAX_TOKENS_PER_STEP,
        arrival_rate: float | None = None,
        seed: int = 0,
    ) -> None:
        self.max_tokens_per_step = check_max_tokens_per_step(max_tokens_per_step)
        self.arrival_rate = check_arrival_rate(arrival_rate)
        self.seed = int(seed)

    def run(
        self,
        trace: Trace,
        batch_size: int,
        admission: Admission | None = None,
        max_wait: int | None = None,
    ) -> ServeRun:
        """The whole simulation under `admission` (default FIFO)."""
        first, _ = request_spans(trace)
        return simulate_serve(
            trace,
            batch_size,
            max_tokens_per_step=self.max_tokens_per_step,
            admission=admission,
            arrivals=arrival_steps(first.shape[0], self.arrival_rate, self.seed),
            max_wait=max_wait,
            policy_name=self.name,
        )

    def plan(self, trace: Trace, batch_size: int) -> BatchPlan:
        return self.run(trace, batch_size).plan
