"""The `serve` batching policy (continuous batching with chunked prefill) against a step-by-step
reference simulation written here, apart from moeprof.batching.serve."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from conftest import plan_rows, random_trace

from moeprof.analyze import analyze
from moeprof.batching import REGISTRY, plan_batches
from moeprof.batching.serve import (
    Admission,
    ServePolicy,
    arrival_steps,
    request_table,
    simulate_serve,
)
from moeprof.errors import MoeprofError
from moeprof.trace import Trace


def with_phases(trace: Trace, rng: np.random.Generator, *, interleave: bool = False) -> Trace:
    """`trace` with a phase column: each request's first rows prefill, the rest decode; with
    `interleave`, random phases (a prompt then ends at a request's first decode row)."""
    req = trace.request_ids
    if interleave:
        phase = (rng.random(trace.n_tokens) < 0.5).astype(np.uint8)
    else:
        first = np.concatenate(([True], req[1:] != req[:-1]))
        starts = np.flatnonzero(first)
        rank = np.arange(req.shape[0]) - np.repeat(starts, np.diff(np.r_[starts, req.shape[0]]))
        cut = rng.integers(0, 12, size=starts.shape[0])
        phase = (rank >= np.repeat(cut, np.diff(np.r_[starts, req.shape[0]]))).astype(np.uint8)
    return Trace.from_arrays(
        trace.expert_ids,
        n_experts=[int(x) for x in trace.n_experts],
        request_ids=trace.request_ids,
        positions=trace.positions,
        phase=phase,
        expert_bytes=[int(x) for x in trace.expert_bytes],
    )


def reference_serve(
    trace: Trace, b: int, budget: int, arrivals: list[int] | None = None
) -> list[list[int]]:
    """Rows of each executed step, FIFO admission, one Python step at a time."""
    rows_of: dict[int, list[int]] = defaultdict(list)
    order: list[int] = []
    for row, req in enumerate(trace.request_ids.tolist()):
        if req not in rows_of:
            order.append(req)
        rows_of[req].append(row)  # stored order is position order within a request
    phase = None if trace.phase is None else trace.phase.tolist()
    prompt = {}
    for req in order:
        n = 0
        while phase is not None and n < len(rows_of[req]) and phase[rows_of[req][n]] == 0:
            n += 1
        prompt[req] = n
    arrive = arrivals if arrivals is not None else [0] * len(order)
    pending = list(zip(arrive, order))
    queue: list[int] = []
    active: list[list[int]] = []  # [request, rows done]
    step = 0
    batches = []
    while pending or queue or active:
        while pending and pending[0][0] <= step:
            queue.append(pending.pop(0)[1])
        if not active and not queue:
            step = pending[0][0]
            continue
        while len(active) < b and queue:
            active.append([queue.pop(0), 0])
        left = budget
        batch = []
        for a in active:  # decoding requests first, one token each
            if a[1] >= prompt[a[0]] and left > 0:
                batch.append(rows_of[a[0]][a[1]])
                a[1] += 1
                left -= 1
        for a in active:  # then prompt chunks
            if a[1] < prompt[a[0]] and left > 0:
                n = min(prompt[a[0]] - a[1], left)
                batch += rows_of[a[0]][a[1] : a[1] + n]
                a[1] += n
                left -= n
        batches.append(sorted(batch))
        active = [a for a in active if a[1] < len(rows_of[a[0]])]
        step += 1
    return batches


def check_valid(trace: Trace, plan_batches_rows: list[list[int]], b: int, budget: int) -> None:
    """A valid schedule: every row once; a request's rows in position order over the steps,
    prompt rows in steps before its generated rows; at most b requests and budget rows a step."""
    table = request_table(trace)
    seen = sorted(r for rows in plan_batches_rows for r in rows)
    assert seen == list(range(trace.n_tokens))
    step_of = np.empty(trace.n_tokens, dtype=np.int64)
    for s, rows in enumerate(plan_batches_rows):
        step_of[rows] = s
        assert len(rows) <= budget
        assert len({int(trace.request_ids[r]) for r in rows}) <= b
    for first, length, prompt in zip(
        table.first.tolist(), table.length.tolist(), table.prompt.tolist()
    ):
        steps = step_of[first : first + length]
        assert (np.diff(steps) >= 0).all()
        # After the prompt, one row per step.
        assert (np.diff(steps[max(prompt - 1, 0) :]) >= 1).all()
    # Running requests never exceed b: a request runs from its first to its last step.
    spans = [
        (int(step_of[f]), int(step_of[f + n - 1]))
        for f, n in zip(table.first.tolist(), table.length.tolist())
    ]
    for s in range(len(plan_batches_rows)):
        assert sum(lo <= s <= hi for lo, hi in spans) <= b


def test_registered() -> None:
    assert "serve" in REGISTRY and REGISTRY["serve"].takes_batch_size


def test_serve_without_phases_equals_decode() -> None:
    rng = np.random.default_rng(11)
    for _ in range(150):
        trace = random_trace(rng)
        for b in (1, 2, 3, 7, 64):
            serve, decode = plan_batches(trace, "serve", b), plan_batches(trace, "decode", b)
            assert np.array_equal(serve.order, decode.order)
            assert np.array_equal(serve.starts, decode.starts)


@pytest.mark.parametrize("interleave", [False, True])
def test_fifo_matches_reference(interleave: bool) -> None:
    rng = np.random.default_rng(5 + interleave)
    for _ in range(120):
        trace = with_phases(random_trace(rng, n_tokens=int(rng.integers(1, 80))), rng)
        if interleave:
            trace = with_phases(trace, rng, interleave=True)
        b, budget = int(rng.integers(1, 6)), int(rng.integers(1, 10))
        rate = None if rng.random() < 0.5 else float(rng.uniform(0.05, 2.0))
        n_req = trace.n_requests
        arrivals = arrival_steps(n_req, rate, seed=3)
        run = simulate_serve(trace, b, max_tokens_per_step=budget, arrivals=arrivals)
        want = reference_serve(trace, b, budget, arrivals.tolist())
        got = [sorted(r) for r in plan_rows(run.plan)]
        assert got == want
        check_valid(trace, got, b, budget)
        # Waiting time: arrival to the first step a request runs in (FIFO admits, then runs).
        assert (run.admit_step >= run.arrival_step).all()


class _Shuffled(Admission):
    name = "shuffled"

    def start(self, n_requests: int) -> None:
        self.rng = np.random.default_rng(n_requests)

    def pick(self, waiting: np.ndarray, lo: int, hi: int) -> int:
        return lo + int(self.rng.choice(np.flatnonzero(waiting[lo:hi])))


def test_any_admission_gives_a_valid_schedule() -> None:
    rng = np.random.default_rng(8)
    for _ in range(80):
        trace = with_phases(random_trace(rng, n_tokens=int(rng.integers(1, 80))), rng)
        b, budget = int(rng.integers(1, 6)), int(rng.integers(1, 10))
        max_wait = None if rng.random() < 0.5 else int(rng.integers(0, 6))
        run = simulate_serve(
            trace, b, max_tokens_per_step=budget, admission=_Shuffled(), max_wait=max_wait
        )
        check_valid(trace, plan_rows(run.plan), b, budget)
        if max_wait is not None:
            # Arrivals at 0: from step max_wait on every waiting request is overdue, so each
            # step admits the earliest requests not yet admitted.
            admit = run.admit_step
            for step in sorted(set(admit.tolist())):
                if step >= max_wait:
                    now = np.flatnonzero(admit == step)
                    later = np.flatnonzero(admit >= step)
                    assert now.tolist() == later[: now.shape[0]].tolist()


def test_max_wait_zero_is_fifo() -> None:
    rng = np.random.default_rng(9)
    for _ in range(40):
        trace = with_phases(random_trace(rng), rng)
        fifo = simulate_serve(trace, 3, max_tokens_per_step=5)
        other = simulate_serve(trace, 3, max_tokens_per_step=5, admission=_Shuffled(), max_wait=0)
        assert np.array_equal(fifo.plan.order, other.plan.order)
        assert np.array_equal(fifo.plan.starts, other.plan.starts)


def test_same_seed_same_arrivals_and_plan() -> None:
    trace = with_phases(
        random_trace(np.random.default_rng(1), n_tokens=60), np.random.default_rng(2)
    )
    a = ServePolicy(4, arrival_rate=0.3, seed=7).run(trace, 2)
    b = ServePolicy(4, arrival_rate=0.3, seed=7).run(trace, 2)
    assert np.array_equal(a.plan.order, b.plan.order) and np.array_equal(
        a.arrival_step, b.arrival_step
    )
    c = ServePolicy(4, arrival_rate=0.3, seed=8).run(trace, 2)
    assert not np.array_equal(a.arrival_step, c.arrival_step)


def test_poisson_arrivals_rate() -> None:
    steps = arrival_steps(20000, 0.5, seed=0)
    assert (np.diff(steps) >= 0).all()
    assert abs(steps[-1] / 20000 - 2.0) < 0.05  # mean gap 1 / rate


def test_analyze_counts_serve_plans() -> None:
    rng = np.random.default_rng(4)
    for _ in range(20):
        trace = with_phases(random_trace(rng, n_tokens=50), rng)
        result = analyze(trace, [3], policy="serve").results[0]
        batches = reference_serve(trace, 3, 2048)
        ids = trace.expert_ids.tolist()
        unique = sum(
            len({e for r in rows for e in ids[r][layer] if e != int(trace.n_experts[layer])})
            for rows in batches
            for layer in range(trace.n_layers)
        )
        assert result.unique == unique and result.n_batches == len(batches)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"^batch size must be at least 1, got 0$"),
        ({"max_tokens_per_step": 0}, r"^max_tokens_per_step must be at least 1"),
        ({"max_wait": -1}, r"^max_wait must be a whole number of steps, 0 or more"),
    ],
)
def test_bad_settings(kwargs: dict, match: str) -> None:
    trace = random_trace(np.random.default_rng(0), n_tokens=10)
    args = {"batch_size": 2, **kwargs}
    b = args.pop("batch_size")
    with pytest.raises(MoeprofError, match=match):
        simulate_serve(trace, b, **args)


def test_bad_arrival_rate() -> None:
    with pytest.raises(MoeprofError, match=r"^arrival_rate must be a positive number"):
        ServePolicy(arrival_rate=-1.0)
    with pytest.raises(MoeprofError, match=r"^arrival_rate must be a positive number"):
        ServePolicy(arrival_rate=float("nan"))


def test_serve_plans_an_empty_trace_like_decode() -> None:
    from moeprof.batching.serve import ServePolicy

    empty = Trace.from_arrays(np.zeros((0, 2, 2), np.int64), n_experts=8)
    plan = ServePolicy().plan(empty, 4)
    assert plan.n_batches == plan_batches(empty, "decode", 4).n_batches == 0
