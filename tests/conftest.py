"""Shared test helpers: reference locations, CLI runner, small random traces."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
