"""Admission policies and the schedule analysis against brute-force references written here:
counts per step by Python sets, affinity scores by Python sums over histograms, waiting times
from the plans' steps, cache loads by conftest's reference LRU."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from conftest import plan_rows, random_trace, reference_loads
from test_serve import with_phases

from moeprof.batching.serve import ServePolicy, request_table
from moeprof.errors import MoeprofError
from moeprof.schedule import (
    AffinityAdmission,
    admission_for,
    check_admissions,
    greedy_groups,
    parse_cache,
    schedule,
    signatures,
)
from moeprof.trace import Trace


def topic_trace(
    n_requests: int = 60, prompt: int = 6, gen: int = 6, seed: int = 0, n_topics: int = 4
) -> Trace:
    """Requests of a few topics, each topic routing to its own experts (with noise)."""
    rng = np.random.default_rng(seed)
    n_layers, n_experts, top_k = 3, 16, 2
    topic = rng.integers(n_topics, size=n_requests)
    length = prompt + gen
    ids = np.empty((n_requests * length, n_layers, top_k), dtype=np.int64)
    for row in range(ids.shape[0]):
        t = int(topic[row // length])
        for layer in range(n_layers):
            home = [(4 * t + j + layer) % n_experts for j in range(4)]
            pool = home if rng.random() < 0.85 else list(range(n_experts))
            ids[row, layer] = rng.choice(pool, size=top_k, replace=False)
    return Trace.from_arrays(
        ids,
        n_experts=n_experts,
        request_ids=np.repeat(np.arange(n_requests), length),
        positions=np.tile(np.arange(length), n_requests),
        phase=np.tile(np.r_[np.zeros(prompt), np.ones(gen)], n_requests).astype(np.uint8),
        expert_bytes=[100, 200, 300],
    )


def histogram(trace: Trace, rows: list[int]) -> Counter:
    """(layer, expert) -> share of the routed slots of `rows`, in plain Python."""
    ids = trace.expert_ids.tolist()
    counts: Counter = Counter()
    for r in rows:
        for layer, slots in enumerate(ids[r]):
            for e in slots:
                if e != int(trace.n_experts[layer]):
                    counts[(layer, e)] += 1
    total = sum(counts.values())
    return Counter({k: v / total for k, v in counts.items()}) if total else Counter()


def brute_unique(trace: Trace, batches: list[list[int]]) -> list[int]:
    ids = trace.expert_ids.tolist()
    return [
        sum(
            len({e for r in rows for e in ids[r][layer] if e != int(trace.n_experts[layer])})
            for rows in batches
        )
        * 1
        for layer in range(trace.n_layers)
    ]


def test_signatures_by_hand() -> None:
    rng = np.random.default_rng(2)
    for _ in range(20):
        trace = with_phases(random_trace(rng, n_tokens=40), rng)
        table = request_table(trace)
        e_max = int(trace.n_experts.max())
        for future in (False, True):
            sig = signatures(trace, table, future=future)
            for r, (first, n, p) in enumerate(
                zip(table.first.tolist(), table.length.tolist(), table.prompt.tolist())
            ):
                want = histogram(trace, list(range(first, first + (n if future else p))))
                got = {(i // e_max, i % e_max): float(v) for i, v in enumerate(sig[r]) if v != 0}
                assert got.keys() == want.keys()
                assert all(abs(got[k] - want[k]) < 1e-6 for k in want)


class _Checked(AffinityAdmission):
    """Affinity that checks each choice against scores summed in plain Python."""

    def __init__(self, sig: np.ndarray, hists: list[Counter]) -> None:
        super().__init__(sig)
        self.hists = hists
        self.running: set[int] = set()
        self.checked = 0

    def pick(self, waiting: np.ndarray, lo: int, hi: int) -> int:
        r = super().pick(waiting, lo, hi)
        scores = {
            w: sum(self.hists[w][k] * self.hists[j][k] for j in self.running for k in self.hists[w])
            for w in np.flatnonzero(waiting).tolist()
        }
        best = max(scores.values())
        assert scores[r] >= best - 1e-5
        if best == 0:  # nothing running overlaps: the earliest waiting request
            assert r == min(scores)
        self.checked += 1
        return r

    def admitted(self, request: int) -> None:
        super().admitted(request)
        self.running.add(request)

    def left(self, request: int) -> None:
        super().left(request)
        self.running.discard(request)


def test_affinity_choices_maximise_the_brute_force_score() -> None:
    trace = topic_trace(n_requests=30)
    table = request_table(trace)
    sig = signatures(trace, table, future=False)
    hists = [
        histogram(trace, list(range(f, f + p)))
        for f, p in zip(table.first.tolist(), table.prompt.tolist())
    ]
    chooser = _Checked(sig, hists)
    ServePolicy(16).run(trace, 4, chooser)
    assert chooser.checked > 20


def test_greedy_groups_by_hand() -> None:
    trace = topic_trace(n_requests=23, seed=3)
    table = request_table(trace)
    sig = signatures(trace, table, future=True)
    hists = [
        histogram(trace, list(range(f, f + n)))
        for f, n in zip(table.first.tolist(), table.length.tolist())
    ]
    order = greedy_groups(sig, 5).tolist()
    assert sorted(order) == list(range(23))
    left = list(range(23))
    for g in range(0, 23, 5):
        group = [min(left)]
        left.remove(group[0])
        while len(group) < 5 and left:
            score = {
                w: sum(hists[w][k] * hists[j][k] for j in group for k in hists[w]) for w in left
            }
            best = max(score.values())
            nxt = min(w for w in left if score[w] > best - 1e-6)
            group.append(nxt)
            left.remove(nxt)
        assert order[g : g + 5] == group


def test_counts_and_waits_match_brute_force() -> None:
    rng = np.random.default_rng(6)
    for i in range(12):
        trace = (
            topic_trace(n_requests=int(rng.integers(5, 30)), seed=i)
            if i % 2
            else (with_phases(random_trace(rng, n_tokens=50), rng))
        )
        result = schedule(
            trace,
            [2, 5],
            ["fifo", "random", "affinity", "oracle", "group", "group-oracle"],
            max_tokens_per_step=7,
            seed=i,
        )
        table = request_table(trace)
        sigs: dict = {}
        for row in result.rows:
            admission = admission_for(row.admission, trace, table, row.batch_size, i, sigs)
            run = ServePolicy(7, seed=i).run(trace, row.batch_size, admission)
            batches = plan_rows(run.plan)
            assert row.loads == sum(brute_unique(trace, batches))
            want = sum(
                n * b for n, b in zip(brute_unique(trace, batches), trace.expert_bytes.tolist())
            )
            assert row.bytes_loaded == want
            assert row.steps == row.n_batches == len(batches)  # no idle step: all arrive at 0
            assert row.tokens == trace.n_tokens
        by = {(r.admission, r.batch_size): r for r in result.rows}
        for r in result.rows:
            base = by[("fifo", r.batch_size)]
            assert r.reduction_vs_fifo == pytest.approx(1 - r.loads / base.loads)


def test_wait_statistics_by_hand() -> None:
    trace = topic_trace(n_requests=40, seed=1)
    result = schedule(trace, [4], ["fifo", "affinity"], max_tokens_per_step=4096)
    table = request_table(trace)
    for row in result.rows:
        run = ServePolicy(4096).run(trace, 4, admission_for(row.admission, trace, table, 4, 0, {}))
        first_step = {}
        for s, rows in enumerate(plan_rows(run.plan)):
            for r in rows:
                first_step.setdefault(int(trace.request_ids[r]), s)
        waits = sorted(first_step.values())  # all arrive at 0; a big budget runs them at once
        assert row.wait_mean == pytest.approx(sum(waits) / len(waits))
        assert row.wait_max == waits[-1]
        assert row.wait_p95 == waits[-(-95 * len(waits) // 100) - 1]
        occupancy = [len({int(trace.request_ids[r]) for r in rows}) for rows in plan_rows(run.plan)]
        assert row.occupancy_mean == pytest.approx(sum(occupancy) / len(occupancy))


def test_affinity_saves_loads_on_topics() -> None:
    trace = topic_trace(n_requests=120, seed=4)
    result = schedule(trace, [8], ["fifo", "random", "affinity", "oracle"])
    by = {r.admission: r for r in result.rows}
    assert by["affinity"].reduction_vs_fifo > 0.1
    assert by["oracle"].reduction_vs_fifo > 0.1
    assert by["affinity"].oracle_share == pytest.approx(
        by["affinity"].reduction_vs_fifo / by["oracle"].reduction_vs_fifo
    )


def test_max_wait_zero_equals_fifo_and_seed_repeats() -> None:
    trace = topic_trace(n_requests=50, seed=2)
    zero = schedule(trace, [4], ["fifo", "random", "affinity", "oracle"], max_wait=0)
    assert len({r.loads for r in zero.rows}) == 1
    assert len({(r.wait_mean, r.wait_max) for r in zero.rows}) == 1
    a = schedule(trace, [4], ["random"], seed=3, arrival_rate=0.5)
    b = schedule(trace, [4], ["random"], seed=3, arrival_rate=0.5)
    assert [r.loads for r in a.rows] == [r.loads for r in b.rows]
    assert [r.wait_mean for r in a.rows] == [r.wait_mean for r in b.rows]


def test_cache_loads_equal_reference_lru() -> None:
    trace = topic_trace(n_requests=25, seed=5)
    result = schedule(trace, [3], ["fifo", "affinity"], cache=("lru", 4))
    table = request_table(trace)
    for row in result.rows:
        run = ServePolicy().run(trace, 3, admission_for(row.admission, trace, table, 3, 0, {}))
        batches = plan_rows(run.plan)
        loads = [
            sum(
                copied
                for items in reference_loads(trace, batches, "lru", layer, 4)
                for _, copied, _ in items
            )
            for layer in range(trace.n_layers)
        ]
        assert row.cache_loads == sum(loads)
        want = sum(n * b for n, b in zip(loads, trace.expert_bytes.tolist())) / 25 / 6
        assert row.cache_bytes_per_generated_token == pytest.approx(want)


def test_fifo_always_runs_first() -> None:
    assert check_admissions(["oracle", "affinity"]) == ("fifo", "affinity", "oracle")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda t: schedule(t, [4], ["greedy"]), r"^unknown admission policy 'greedy'; choose"),
        (lambda t: schedule(t, [0], ["fifo"]), r"^batch size must be at least 1, got 0$"),
        (
            lambda t: schedule(t, [4], ["fifo"], max_tokens_per_step=0),
            r"^max_tokens_per_step must be at least 1",
        ),
        (
            lambda t: schedule(t, [4], ["fifo"], arrival_rate=-2.0),
            r"^arrival_rate must be a positive",
        ),
        (lambda t: schedule(t, [4], ["fifo"], max_wait=-1), r"^max_wait must be a whole number"),
        (lambda t: schedule(t, [4], ["group"], arrival_rate=1.0), r"^grouping plans a fixed pool"),
        (lambda t: schedule(t, [4], [], arrival_rate=1.0), r"^no admission policies given"),
    ],
)
def test_bad_input(call, match: str) -> None:
    with pytest.raises(MoeprofError, match=match):
        call(topic_trace(n_requests=5))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("lru", r"is not STRATEGY:EXPERTS"),
        ("lru:-1", r"is not STRATEGY:EXPERTS"),
        ("dedup:4", r"^cache strategy 'dedup' keeps no cache"),
        ("nope:4", r"^cache strategy 'nope' keeps no cache"),
    ],
)
def test_bad_cache(text: str, match: str) -> None:
    with pytest.raises(MoeprofError, match=match):
        parse_cache(text)
    assert parse_cache("belady:8") == ("belady", 8)
