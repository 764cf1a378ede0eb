"""Shared test helpers: reference locations, CLI runner, small random traces."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import moeprof
from moeprof.trace import Trace

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
# Public routing captures made by other projects, read in place and never copied into this
# repository (docs/real-routing.md says where each comes from and how to fetch it). The variable
# names a folder holding their sub-folders; without it, the sibling folder of the team's CI.
REFERENCE_TRACES = Path(
    os.environ.get("MOEPROF_REFERENCE_TRACES") or REPO.parent / "shared" / "reference-traces"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except Exception:  # torch missing or broken: no CUDA either way
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]):
    """Run `moeprof ARGS` in-process; returns exit code and captured output."""
    from moeprof.cli import main

    def run(*args: str | Path) -> CliResult:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


def random_trace(
    rng: np.random.Generator,
    *,
    n_tokens: int | None = None,
    n_layers: int | None = None,
    top_k: int | None = None,
    n_experts: int | Sequence[int] | None = None,
    sentinel_rate: float = 0.1,
    with_steps: bool = True,
) -> Trace:
    """A small random trace with varied shapes, request lengths, sentinels and optional steps."""
    n_tokens = int(rng.integers(1, 60)) if n_tokens is None else n_tokens
    n_layers = int(rng.integers(1, 4)) if n_layers is None else n_layers
    top_k = int(rng.integers(1, 5)) if top_k is None else top_k
    if n_experts is None:
        choices = [top_k, 4, 8, 16, 64, 65, 130, 300]
        n_experts = [int(max(top_k, rng.choice(choices))) for _ in range(n_layers)]
    n_exp = np.broadcast_to(np.asarray(n_experts), (n_layers,))
    ids = np.empty((n_tokens, n_layers, top_k), dtype=np.int64)
    for layer in range(n_layers):
        e = int(n_exp[layer])
        draws = np.argsort(rng.random((n_tokens, e)), axis=1)[:, :top_k]
        # Skew towards few experts sometimes, so batches share experts.
        if rng.random() < 0.5 and e > top_k:
            draws = np.argsort(rng.random((n_tokens, e)) * (1 + np.arange(e)), axis=1)[:, :top_k]
        ids[:, layer] = draws
    drop = rng.random(ids.shape) < sentinel_rate
    ids = np.where(drop, n_exp[None, :, None], ids)
    n_req = int(rng.integers(1, max(2, n_tokens // 3) + 1))
    request_ids = rng.integers(0, n_req, size=n_tokens) * 7 + 3  # sparse, unsorted ids
    positions = rng.permutation(n_tokens).astype(np.int64)
    steps = rng.integers(0, max(1, n_tokens // 2), size=n_tokens) if with_steps else None
    return Trace.from_arrays(
        ids,
        n_experts=[int(x) for x in n_exp],
        request_ids=request_ids,
        positions=positions,
        steps=steps,
        expert_bytes=[int(x) for x in rng.integers(1, 1000, size=n_layers)],
    )


@pytest.fixture
def small_trace() -> Trace:
    return moeprof.synthesize(
        n_experts=8,
        top_k=2,
        n_layers=3,
        n_requests=5,
        tokens_per_request=20,
        length_spread=0.5,
        zipf=1.0,
        locality=0.3,
        seed=1,
    )


# ---------------------------------------------------------------------- replay and strategies


def reference_loads(
    trace: Trace, batches: Sequence[Sequence[int]], strategy: str, layer: int, capacity: int = 0
) -> list[list[tuple[int, bool, int]]]:
    """Per batch, the (expert, copied, tokens) items a strategy issues at `layer`, in issue
    order, by direct simulation over each batch's rows, written apart from moeprof.strategies:

    naive: every (token, expert) request in row then top-k order, one token each; dedup: each
    distinct expert once, ascending, with its request count; lru: dedup's experts, those cached
    at the batch's start first (hits, not copied), then the rest (misses), each group ascending;
    the cache follows each expert's last request in row then top-k order and drops its least
    recent experts down to `capacity` once the batch is done; lfu, static, belady: the same
    hits-then-misses order, keeping after each batch the `capacity` experts used in the most
    batches (ties: the later last request), the most requested over the whole trace (ties: lower
    id; each once first used), or the soonest used again (ties: lower id; never: dropped).
    """
    from collections import Counter, OrderedDict

    ids = trace.expert_ids[:, layer, :].tolist()
    sentinel = int(trace.n_experts[layer])
    cache: OrderedDict[int, None] = OrderedDict()
    out: list[list[tuple[int, bool, int]]] = []
    retained: set[int] = set()
    batches_used: dict[int, int] = {}
    last_request: dict[int, int] = {}
    clock = 0
    queue_cache: ReferenceCache | None = None

    def ids_of(b: int) -> list[int]:
        return [e for row in batches[b] for e in ids[int(row)] if e != sentinel]

    # static: the `capacity` most requested experts over the whole trace at the layer, ties to
    # the lower id.
    everywhere = Counter(e for row in ids for e in row if e != sentinel)
    static_set = set(sorted(everywhere, key=lambda e: (-everywhere[e], e))[:capacity])
    for rows in batches:
        requests = [e for row in rows for e in ids[int(row)] if e != sentinel]
        counts = Counter(requests)
        if strategy == "naive":
            out.append([(e, True, 1) for e in requests])
        elif strategy == "dedup":
            out.append([(e, True, counts[e]) for e in sorted(counts)])
        elif strategy == "lru":
            at_start = set(cache)
            for e in requests:
                cache[e] = None
                cache.move_to_end(e)
            while len(cache) > capacity:
                cache.popitem(last=False)
            hits = [(e, False, counts[e]) for e in sorted(counts) if e in at_start]
            misses = [(e, True, counts[e]) for e in sorted(counts) if e not in at_start]
            out.append(hits + misses)
        elif strategy in ("lfu", "static", "belady"):
            at_start = set(retained)
            for e in counts:
                batches_used[e] = batches_used.get(e, 0) + 1
            for rank, e in enumerate(requests):
                last_request[e] = clock + rank
            clock += len(requests)
            pool = retained | set(counts)
            later = [set(ids_of(b)) for b in range(len(out) + 1, len(batches))]
            if strategy == "lfu":
                ranked = sorted(pool, key=lambda e: (-batches_used[e], -last_request[e]))
            elif strategy == "static":
                ranked = sorted(e for e in pool if e in static_set)
            else:
                nxt = {e: next((i for i, s in enumerate(later) if e in s), None) for e in pool}
                ranked = sorted((e for e in pool if nxt[e] is not None), key=lambda e: (nxt[e], e))
            retained = set(ranked[:capacity])
            hits = [(e, False, counts[e]) for e in sorted(counts) if e in at_start]
            misses = [(e, True, counts[e]) for e in sorted(counts) if e not in at_start]
            out.append(hits + misses)
        elif strategy in QUEUE_REFERENCES:
            if queue_cache is None:
                queue_cache = QUEUE_REFERENCES[strategy](capacity, [1] * (sentinel + 1))
            last_pos: dict[int, int] = {}
            for rank, e in enumerate(requests):
                last_pos[e] = clock + rank
            clock += len(requests)
            loaded = queue_cache.step(sorted(last_pos.items()))
            hits = [(e, False, counts[e]) for e in sorted(counts) if e not in loaded]
            misses = [(e, True, counts[e]) for e in sorted(counts) if e in loaded]
            out.append(hits + misses)
        else:
            raise ValueError(f"no reference for strategy {strategy!r}")
    return out


def plan_rows(plan: moeprof.BatchPlan) -> list[list[int]]:
    """Rows of each batch of a plan, in the plan's order."""
    return [plan.rows(b).tolist() for b in range(plan.n_batches)]


def cpu_replay(trace: Trace, **kw: object) -> moeprof.replay.ReplayResult:
    """replay() on the CPU backend, uncalibrated, with 1 KiB blocks unless told otherwise."""
    from moeprof.replay import replay

    kw.setdefault("calibrate", False)
    kw.setdefault("expert_bytes", 1024)
    return replay(trace, device="cpu", **kw)


def strategy_entry(doc_row: dict, name: str) -> dict:
    """One strategy's entry in a replayed results row."""
    return next(s for s in doc_row["replay"]["strategies"] if s["strategy"] == name)


# ---------------------------------------------------------------------- queue-based caches
# Plain-Python references for lfuda, s3fifo and arc at batch granularity (docs/cache.md), with
# dicts, deques and OrderedDicts, sharing no code with moeprof.strategies. `step` takes one
# batch's distinct blocks as (block, position of its last request) and returns the blocks it
# loaded (those not retained when it began); the cache is cut back once the batch is done.


class ReferenceCache:
    def __init__(self, capacity: int, weight: Sequence[int]) -> None:
        self.capacity = capacity
        self.weight = list(weight)

    def size(self, blocks: Iterable[int]) -> int:
        return sum(self.weight[b] for b in blocks)

    def step(self, items: Sequence[tuple[int, int]]) -> set[int]:
        raise NotImplementedError


class ReferenceLfuda(ReferenceCache):
    """Priority = batches used since loaded + age; keep the highest (ties: later last request)
    while they fit; the age becomes the highest priority dropped."""

    def __init__(self, capacity: int, weight: Sequence[int]) -> None:
        super().__init__(capacity, weight)
        self.uses: dict[int, int] = {}  # resident blocks
        self.priority: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.age = 0

    def step(self, items: Sequence[tuple[int, int]]) -> set[int]:
        loaded = {b for b, _ in items if b not in self.uses}
        for b, r in items:
            self.uses[b] = self.uses.get(b, 0) + 1
            self.priority[b] = self.uses[b] + self.age
            self.last[b] = r
        if self.size(self.uses) > self.capacity:
            ranked = sorted(self.uses, key=lambda b: (-self.priority[b], -self.last[b]))
            kept, used = set(), 0
            for b in ranked:
                if used + self.weight[b] <= self.capacity:
                    kept.add(b)
                    used += self.weight[b]
            gone = [b for b in self.uses if b not in kept]
            self.age = max(self.priority[b] for b in gone)
            for b in gone:
                del self.uses[b]
        return loaded


class ReferenceS3Fifo(ReferenceCache):
    """Small FIFO (10% of the capacity, rounded up), main FIFO, ghost of ids dropped from small
    (as much as main holds); counters 0..3; see moeprof/strategies/s3fifo.py's docstring."""

    def __init__(self, capacity: int, weight: Sequence[int]) -> None:
        super().__init__(capacity, weight)
        self.small: deque[int] = deque()  # left: newest
        self.main: deque[int] = deque()
        self.ghost: OrderedDict[int, None] = OrderedDict()  # first: oldest
        self.freq: dict[int, int] = {}
        self.small_size = math.ceil(capacity / 10)

    def step(self, items: Sequence[tuple[int, int]]) -> set[int]:
        loaded = set()
        for b, _ in sorted(items, key=lambda x: x[1]):
            if b in self.small or b in self.main:
                self.freq[b] = min(self.freq[b] + 1, 3)
                continue
            loaded.add(b)
            self.freq[b] = 0
            if b in self.ghost:
                del self.ghost[b]
                self.main.appendleft(b)
            else:
                self.small.appendleft(b)
        while self.size(self.small) + self.size(self.main) > self.capacity:
            if self.size(self.small) > self.small_size or not self.main:
                b = self.small.pop()
                if self.freq[b] >= 1:
                    self.freq[b] = 0
                    self.main.appendleft(b)
                else:
                    self.ghost[b] = None
                    while self.size(self.ghost) > self.capacity - self.small_size:
                        self.ghost.popitem(last=False)
            else:
                b = self.main.pop()
                if self.freq[b] > 0:
                    self.freq[b] -= 1
                    self.main.appendleft(b)
        return loaded


class ReferenceArc(ReferenceCache):
    """T1, T2, B1, B2 as OrderedDicts (first: least recent) and the adaptive target p; see
    moeprof/strategies/arc.py's docstring. Unit weights."""

    def __init__(self, capacity: int, weight: Sequence[int]) -> None:
        super().__init__(capacity, weight)
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()
        self.p = 0.0

    def step(self, items: Sequence[tuple[int, int]]) -> set[int]:
        c = self.capacity
        loaded = set()
        for b, _ in sorted(items, key=lambda x: x[1]):
            if b in self.t1:
                del self.t1[b]
            elif b in self.t2:
                del self.t2[b]
            elif b in self.b1:
                loaded.add(b)
                self.p = min(c, self.p + max(1, len(self.b2) / len(self.b1)))
                del self.b1[b]
            elif b in self.b2:
                loaded.add(b)
                self.p = max(0, self.p - max(1, len(self.b1) / len(self.b2)))
                del self.b2[b]
            else:
                loaded.add(b)
                self.t1[b] = None
                continue
            self.t2[b] = None
        while len(self.t1) + len(self.t2) > c:
            if self.t1 and (len(self.t1) > self.p or not self.t2):
                self.b1[self.t1.popitem(last=False)[0]] = None
            else:
                self.b2[self.t2.popitem(last=False)[0]] = None
        while len(self.t1) + len(self.b1) > c:
            self.b1.popitem(last=False)
        while len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) > 2 * c:
            self.b2.popitem(last=False)
        return loaded


QUEUE_REFERENCES: dict[str, type[ReferenceCache]] = {
    "lfuda": ReferenceLfuda,
    "s3fifo": ReferenceS3Fifo,
    "arc": ReferenceArc,
}


@contextlib.contextmanager
def local_ray_runtime() -> Iterator[Any]:
    """A local Ray runtime for one test module (starting one takes seconds): every Ray executor
    in the module finds it initialised, reuses it and leaves it running. Start it after any
    local process pool of the module: the pool forks the test process."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
