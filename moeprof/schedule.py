"""Locality-aware scheduling: which waiting request a serving engine admits, and what that saves
in expert loads and costs in waiting time (docs/schedule.md).

Pure analysis: arrays in, dataclasses out. Every run is the ``serve`` batching policy's
simulation (:mod:`moeprof.batching.serve`: continuous batching with chunked prefill) under one
admission policy:

- ``fifo``: the earliest waiting request (the baseline every row is compared with);
- ``random``: a uniformly drawn waiting request (seeded control);
- ``affinity``: the waiting request whose *signature* overlaps most with the running requests'
  signatures; a signature is the request's per-layer expert histogram over its prompt (prefill)
  rows, normalised to sum 1. It assumes the prompt's routing is known while the request waits
  (prefill on arrival, or a separate prefill stage);
- ``oracle``: the same with each request's whole routing (prompt and generation): an upper bound
  no real scheduler has;
- ``group`` / ``group-oracle``: offline batch inference over a fixed pool: the requests are cut
  into groups of B with similar signatures (greedy: a group starts with the earliest request
  left and takes, B − 1 times, the one overlapping most with the group so far), and the groups
  run one after the other, each once the last has drained.

Overlap is the dot product of signatures: ``score(r) = Σ_j∈running ⟨s_r, s_j⟩``. The Gram
matrix ⟨s_i, s_j⟩ is computed once per pool (one matrix product), so a running-set change is
one row added to or taken from the score vector and a decision is one masked argmax over the
waiting pool: no Python loop over requests or experts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moeprof._version import __version__
from moeprof.analyze import masks_from_ids, unique_per_batch
from moeprof.batching import check_batch_sizes
from moeprof.batching.serve import (
    DEFAULT_MAX_TOKENS_PER_STEP,
    Admission,
    FifoAdmission,
    Requests,
    ServePolicy,
    ServeRun,
    check_max_wait,
    check_seed,
    request_table,
)
from moeprof.cache import layer_trace
from moeprof.errors import MoeprofError, check_names
from moeprof.strategies import REGISTRY
from moeprof.strategies.retaining import RetainingStrategy
from moeprof.strategies.retention import layer_sequence, map_threads
from moeprof.strategies.schedule import distinct_per_batch, expert_requests
from moeprof.stream import TraceSource, as_source, source_summary
from moeprof.trace import PHASE_DECODE, Trace, out_of_range_id

ADMISSIONS = ("fifo", "random", "affinity", "oracle", "group", "group-oracle")
BASELINE = "fifo"
# Whose reduction each policy is measured against ("share of the oracle's reduction").
ORACLE_OF = {
    "random": "oracle",
    "affinity": "oracle",
    "oracle": "oracle",
    "group": "group-oracle",
    "group-oracle": "group-oracle",
}
WAIT_PERCENTILE = 95
# Above this many requests the Gram matrix (R² float32) is not kept: scores are recomputed with
# one matrix-vector product per running-set change instead.
GRAM_MAX_REQUESTS = 8192


# ---------------------------------------------------------------------- signatures


def signatures(trace: Trace | TraceSource, table: Requests, *, future: bool) -> np.ndarray:
    """Per-request expert histograms, float32 [R, L·E_max], each row summing to 1 (0 when the
    request has no rows counted): over the prompt rows, or over every row when `future`.
    Reads one layer's expert ids at a time."""
    source = as_source(trace)
    n_req = table.n_requests
    e_max = int(source.n_experts.max())
    width = source.n_layers * e_max
    if n_req == 0:
        return np.zeros((0, width), dtype=np.float32)
    req_index = np.repeat(np.arange(n_req, dtype=np.int64), table.length)
    rank = np.arange(source.n_tokens, dtype=np.int64) - table.first[req_index]
    counted = np.ones(source.n_tokens, bool) if future else rank < table.prompt[req_index]
    rows = np.flatnonzero(counted)
    owner = req_index[rows][:, None]
    out = np.zeros((n_req, width), dtype=np.float32)
    for layer in range(source.n_layers):  # one layer's histogram at a time bounds the memory
        ids = np.asarray(source.layer_ids(layer)[rows], dtype=np.int64)
        routed = ids != int(source.n_experts[layer])
        keys = (owner * e_max + ids)[routed]
        counts = np.bincount(keys, minlength=n_req * e_max).reshape(n_req, e_max)
        out[:, layer * e_max : (layer + 1) * e_max] = counts
    total = out.sum(axis=1, keepdims=True)
    out /= np.where(total > 0, total, 1.0)
    return out


class _Overlap:
    """Σ over a changing set of requests of ⟨s_r, s_j⟩ for every r, updated per change."""

    def __init__(self, sig: np.ndarray) -> None:
        self.sig = sig
        self.gram = sig @ sig.T if sig.shape[0] <= GRAM_MAX_REQUESTS else None
        self.score = np.zeros(sig.shape[0], dtype=np.float64)

    def add(self, j: int, sign: float = 1.0) -> None:
        row = self.gram[j] if self.gram is not None else self.sig @ self.sig[j]
        self.score += sign * row


def _best(score: np.ndarray, mask: np.ndarray, lo: int, hi: int) -> int:
    """The index in [lo, hi) with `mask` set and the highest score (ties: the earliest)."""
    masked = np.where(mask[lo:hi], score[lo:hi], -np.inf)
    return lo + int(np.argmax(masked))


class RandomAdmission(Admission):
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def start(self, n_requests: int) -> None:
        self.rng = np.random.default_rng(check_seed(self.seed))

    def pick(self, waiting: np.ndarray, lo: int, hi: int) -> int:
        candidates = np.flatnonzero(waiting[lo:hi])
        return lo + int(candidates[self.rng.integers(candidates.shape[0])])


class AffinityAdmission(Admission):
    """The waiting request overlapping most with the running ones (module docstring)."""

    def __init__(self, sig: np.ndarray, name: str = "affinity") -> None:
        self.name = name  # type: ignore[misc]  # one class serves affinity and oracle
        self.sig = sig

    def start(self, n_requests: int) -> None:
        self.overlap = _Overlap(self.sig)

    def pick(self, waiting: np.ndarray, lo: int, hi: int) -> int:
        return _best(self.overlap.score, waiting, lo, hi)

    def admitted(self, request: int) -> None:
        self.overlap.add(request)

    def left(self, request: int) -> None:
        self.overlap.add(request, -1.0)


def greedy_groups(sig: np.ndarray, batch_size: int) -> np.ndarray:
    """Requests in group order, int64 [R]: groups of `batch_size` (the last may be short), each
    started by the earliest request left and grown by the one overlapping most with it so far."""
    n_req = sig.shape[0]
    overlap = _Overlap(sig)
    left = np.ones(n_req, dtype=bool)
    order = np.empty(n_req, dtype=np.int64)
    head = 0
    for i in range(n_req):
        if i % batch_size == 0:
            overlap.score[:] = 0.0  # a new group: no overlap with anything yet
            while not left[head]:
                head += 1
            r = head
        else:
            r = _best(overlap.score, left, head, n_req)
        order[i] = r
        left[r] = False
        overlap.add(r)
    return order


class GroupAdmission(Admission):
    """Static groups in a fixed order: admits only when the running batch has drained."""

    barrier = True

    def __init__(self, order: np.ndarray, name: str) -> None:
        self.name = name  # type: ignore[misc]
        self.order = order.tolist()

    def start(self, n_requests: int) -> None:
        self.next = 0

    def pick(self, waiting: np.ndarray, lo: int, hi: int) -> int:
        while not waiting[self.order[self.next]]:  # max_wait may have admitted it already
            self.next += 1
        r = int(self.order[self.next])
        self.next += 1
        return r


def check_admissions(names: Iterable[str]) -> tuple[str, ...]:
    """Known, distinct admission names in the order of ADMISSIONS, fifo always first."""
    chosen = check_names(
        names,
        ADMISSIONS,
        param="admissions",
        plural="admission policies",
        singular="admission policy",
    )
    return tuple(n for n in ADMISSIONS if n in chosen or n == BASELINE)


MAX_CACHE_EXPERTS = 2**31 - 1


def parse_cache(text: str) -> tuple[str, int]:
    """'lru:8' -> ('lru', 8): a caching strategy and the experts each layer retains."""
    name, sep, cap = text.partition(":")
    if not sep or not cap.strip().isdigit():
        raise MoeprofError(
            f"cache {text!r} is not STRATEGY:EXPERTS (for example lru:8, experts kept per layer)"
        )
    strategy = REGISTRY.get(name.strip())
    if not isinstance(strategy, RetainingStrategy):
        names = ", ".join(n for n, s in REGISTRY.items() if isinstance(s, RetainingStrategy))
        raise MoeprofError(f"cache strategy {name.strip()!r} keeps no cache; choose from {names}")
    capacity = int(cap)
    if capacity > MAX_CACHE_EXPERTS:
        raise MoeprofError(
            f"cache {text!r}: at most {MAX_CACHE_EXPERTS:,} experts per layer (a layer has at "
            "most 65,535)"
        )
    return name.strip(), capacity


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class ScheduleRow:
    """One admission policy at one B."""

    admission: str
    batch_size: int
    steps: int  # steps to drain the pool (idle steps included)
    n_batches: int  # steps that ran rows
    tokens: int
    generated_tokens: int  # decode rows (every row when the trace has no phases)
    loads: int  # expert loads with dedup: Σ over steps and layers of distinct experts
    bytes_loaded: int | None  # None: some layer's expert size is unknown
    loads_per_generated_token: float
    bytes_per_generated_token: float | None
    reduction_vs_fifo: float  # 1 − loads / FIFO's loads at this B
    oracle_share: float | None  # reduction / the matching oracle's reduction
    cache_loads: int | None  # with the --cache strategy
    cache_bytes_per_generated_token: float | None
    cache_reduction_vs_fifo: float | None
    wait_mean: float  # steps from arrival to admission
    wait_p95: int
    wait_max: int
    occupancy_mean: float  # running requests per executed step
    decisions: int
    schedule_seconds: float  # the whole simulation
    decision_seconds: float  # of which choosing admissions


@dataclass(frozen=True)
class ScheduleResult:
    trace: dict[str, Any]
    settings: dict[str, Any]
    rows: tuple[ScheduleRow, ...]

    def to_dict(self) -> dict[str, Any]:
        """The ``kind: "schedule"`` results document (docs/schedule.md, "Results JSON")."""
        return {
            "kind": "schedule",
            "moeprof_version": __version__,
            "trace": self.trace,
            "schedule": self.settings,
            "results": [asdict(r) for r in self.rows],
        }


def _nearest_rank(values: np.ndarray, q: int) -> int:
    if values.size == 0:
        return 0
    ordered = np.sort(values)
    rank = -(-q * values.size // 100)
    return int(ordered[max(rank, 1) - 1])


def _ratio(part: float, whole: float) -> float:
    return float(part) / float(whole) if whole else 0.0


def admission_for(
    name: str,
    trace: Trace | TraceSource,
    table: Requests,
    batch_size: int,
    seed: int,
    sigs: dict[str, Any],
) -> Admission:
    """The admission object for `name` (signatures built once per trace, in `sigs`)."""
    if name == "fifo":
        return FifoAdmission()
    if name == "random":
        return RandomAdmission(seed)
    future = name in ("oracle", "group-oracle")
    key = "future" if future else "prompt"
    if key not in sigs:
        sigs[key] = signatures(trace, table, future=future)
    if name in ("affinity", "oracle"):
        return AffinityAdmission(sigs[key], name)
    return GroupAdmission(greedy_groups(sigs[key], batch_size), name)


def cache_loads(
    trace: Trace, run: ServeRun, strategy: str, capacity: int, popularity: list[np.ndarray]
) -> np.ndarray:
    """Loads per layer (int64 [L]) of a retaining strategy keeping `capacity` experts per layer
    between the run's steps (the cache model of docs/cache.md, per-layer budget, cold start)."""
    chosen = REGISTRY[strategy]
    assert isinstance(chosen, RetainingStrategy)

    def one(layer: int) -> int:
        seq = layer_sequence(
            distinct_per_batch(trace, run.plan, layer), int(trace.n_experts[layer])
        )
        return chosen.retention(seq, capacity, popularity=popularity[layer]).loads

    return np.asarray(map_threads(one, range(trace.n_layers)), dtype=np.int64)


def _layer_loads(
    source: TraceSource, runs: Sequence[ServeRun], cache: tuple[str, int] | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Distinct experts (dedup loads) and cache loads, int64 [runs, L], one layer's expert ids
    at a time: a layer's bitsets, and its sequences, serve every run."""
    columns = source.columns()
    n_layers = source.n_layers
    loads = np.zeros((len(runs), n_layers), dtype=np.int64)
    cached = None if cache is None else np.zeros_like(loads)
    for layer in range(n_layers):
        ids = source.layer_ids(layer)
        n_exp = source.n_experts[layer : layer + 1]
        problem = out_of_range_id(ids[:, None, :], n_exp)
        if problem:
            raise MoeprofError(problem)
        masks = masks_from_ids(ids[:, None, :], n_exp)
        for r, run in enumerate(runs):
            loads[r, layer] = int(unique_per_batch(masks, run.plan).sum())
        del masks
        if cache is not None and cached is not None:
            one = layer_trace(columns, ids, layer)
            popularity = [expert_requests(one, 0)]
            cached[:, layer] = [
                int(cache_loads(one, run, cache[0], cache[1], popularity)[0]) for run in runs
            ]
    return loads, cached


def schedule(
    trace: Trace | TraceSource,
    batch_sizes: Sequence[int] = (8, 32),
    admissions: Sequence[str] = ("fifo", "random", "affinity", "oracle"),
    *,
    max_tokens_per_step: int = DEFAULT_MAX_TOKENS_PER_STEP,
    max_wait: int | None = None,
    arrival_rate: float | None = None,
    seed: int = 0,
    cache: tuple[str, int] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ScheduleResult:
    """Serve `trace` under each admission policy and B (module docstring; docs/schedule.md).

    `trace` may be shards (:mod:`moeprof.shards`): the simulation reads the per-token columns,
    and expert ids are read one layer at a time (signatures, loads, cache), so memory holds one
    layer's ids, the runs' plans and the signatures (R x L x E floats), never the whole trace."""
    sizes = check_batch_sizes(batch_sizes)
    chosen = check_admissions(admissions)
    max_wait = check_max_wait(max_wait)
    seed = check_seed(seed)
    serving = ServePolicy(max_tokens_per_step, arrival_rate, seed)
    if cache is not None:
        cache = parse_cache(f"{cache[0]}:{cache[1]}")
    source = as_source(trace)
    trace = source.columns()  # per-token columns; expert ids only through `source`
    if trace.n_tokens == 0:
        raise MoeprofError("the trace is empty (no tokens)")
    if arrival_rate is not None and any(n.startswith("group") for n in chosen):
        raise MoeprofError(
            "grouping plans a fixed pool: leave out arrival_rate, or the group admissions"
        )
    table = request_table(trace)
    ebytes = [int(b) for b in trace.expert_bytes]
    bytes_known = trace.expert_bytes_known
    decode_rows = (
        trace.n_tokens
        if trace.phase is None
        else int(np.count_nonzero(trace.phase == PHASE_DECODE))
    )
    # A prefill-only trace generates nothing: its per-token figures are then per prompt token.
    generated = decode_rows or trace.n_tokens
    per_gen = max(generated, 1)
    sigs: dict[str, Any] = {}
    total, done = len(sizes) * len(chosen), 0
    raw: list[dict[str, Any]] = []
    runs: list[ServeRun] = []
    for b in sizes:
        for name in chosen:
            t0 = time.perf_counter()
            admission = admission_for(name, source, table, b, seed, sigs)
            run = serving.run(trace, b, admission, max_wait)
            elapsed = time.perf_counter() - t0
            waits = run.wait_steps
            runs.append(run)
            raw.append(
                {
                    "admission": name,
                    "batch_size": b,
                    "steps": run.n_steps,
                    "n_batches": run.plan.n_batches,
                    "tokens": int(run.plan.batch_tokens.sum()),
                    "generated_tokens": generated,
                    "wait_mean": float(waits.mean()) if waits.size else 0.0,
                    "wait_p95": _nearest_rank(waits, WAIT_PERCENTILE),
                    "wait_max": int(waits.max(initial=0)),
                    "occupancy_mean": float(run.running.mean()) if run.running.size else 0.0,
                    "decisions": run.decisions,
                    "schedule_seconds": elapsed,
                    "decision_seconds": run.decision_seconds,
                }
            )
            done += 1
            if on_progress is not None:
                on_progress(done, total)
    layer_loads, layer_cache = _layer_loads(source, runs, cache)
    for r, entry in enumerate(raw):
        per_layer = layer_loads[r]
        loads = int(per_layer.sum())
        bytes_loaded = (
            sum(int(n) * e for n, e in zip(per_layer.tolist(), ebytes)) if bytes_known else None
        )
        c_loads = c_bytes = None
        if layer_cache is not None:
            c_layer = layer_cache[r]
            c_loads = int(c_layer.sum())
            if bytes_known:
                c_bytes = sum(int(n) * e for n, e in zip(c_layer.tolist(), ebytes)) / per_gen
        entry.update(
            loads=loads,
            bytes_loaded=bytes_loaded,
            loads_per_generated_token=loads / per_gen,
            bytes_per_generated_token=None if bytes_loaded is None else bytes_loaded / per_gen,
            cache_loads=c_loads,
            cache_bytes_per_generated_token=c_bytes,
        )
    rows = _compare(raw)
    settings = {
        "admissions": list(chosen),
        "batch_sizes": sizes,
        "max_tokens_per_step": serving.max_tokens_per_step,
        "max_wait": max_wait,
        "arrival_rate": serving.arrival_rate,
        "seed": seed,
        "cache": None if cache is None else {"strategy": cache[0], "cache_experts": cache[1]},
        "has_phases": trace.phase is not None,
        "prompt_rows": int(table.prompt.sum()),
        "n_requests": table.n_requests,
    }
    return ScheduleResult(trace=source_summary(source), settings=settings, rows=tuple(rows))


def _compare(raw: list[dict[str, Any]]) -> list[ScheduleRow]:
    """Reductions against FIFO at the same B, and shares of the matching oracle's reduction."""
    by = {(r["admission"], r["batch_size"]): r for r in raw}
    for r in raw:
        base = by[(BASELINE, r["batch_size"])]
        r["reduction_vs_fifo"] = 1.0 - _ratio(r["loads"], base["loads"])
        r["cache_reduction_vs_fifo"] = (
            None
            if r["cache_loads"] is None
            else 1.0 - _ratio(r["cache_loads"], base["cache_loads"])
        )
    for r in raw:
        oracle = by.get((ORACLE_OF.get(r["admission"], ""), r["batch_size"]))
        best = None if oracle is None else oracle["reduction_vs_fifo"]
        r["oracle_share"] = r["reduction_vs_fifo"] / best if best is not None and best > 0 else None
    return [ScheduleRow(**r) for r in raw]
