"""Benchmark: the cache simulation (strategies x capacities) against a per-access Python
``OrderedDict`` LRU, side by side on the same trace.

Trace: synthetic, 20,000 tokens x 32 MoE layers x top-8 of 64 experts (5.12 M routing decisions,
zipf 0.8, locality 0.3, seed 0), policy decode, B = 8. Simulated: strategies lru, lfu, static,
belady x cache_experts C in {0, 2, 4, 8, 16, 32} = 24 simulations of every layer (budget
per-layer), built as `moeprof cache` builds them: one ``distinct_per_batch`` per layer, reused by
every simulation, ``layer_sequence`` and ``strategy.retention``. numba's first compile (or load
from its on-disk cache) is timed apart and not counted.

Baseline: a straightforward per-access ``OrderedDict`` LRU with the same semantics (a request of
an expert not in the cache is a load; every request moves its expert to the most recent end;
after each batch the least recent are dropped down to C), timed for the 6 LRU simulations; its
loads must equal the simulation's for every layer and C.

Targets: all 24 simulations <= 2 s, and the LRU simulations >= 30x faster than the OrderedDict.

    .venv/bin/python benchmarks/bench_cache.py [--repeat 3] [--strict]

``--strict`` exits 1 when a target is missed; differing loads always exit 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import OrderedDict

import numpy as np
from machine import machine_rows, markdown_table

import moeprof
from moeprof.strategies import get_strategy
from moeprof.strategies.retention import AccessSequence, layer_sequence, map_threads
from moeprof.strategies.schedule import distinct_per_batch
from moeprof.trace import Trace

STRATEGIES = ("lru", "lfu", "static", "belady")
CAPACITIES = (0, 2, 4, 8, 16, 32)
POLICY, BATCH_SIZE = "decode", 8
TARGET_SECONDS = 2.0
TARGET_SPEEDUP = 30.0


def simulate(
    seqs: list[AccessSequence], popularity: list[np.ndarray], names: tuple[str, ...]
) -> dict[tuple[str, int], list[int]]:
    """Loads per layer of every (strategy, C), as the cache command runs them."""
    out = {}
    for name in names:
        strategy = get_strategy(name)
        for capacity in CAPACITIES:
            # Layers side by side on the cores, as moeprof.cache runs them.
            out[name, capacity] = map_threads(
                lambda job, s=strategy, c=capacity: s.retention(job[0], c, popularity=job[1]).loads,  # type: ignore[attr-defined]
                zip(seqs, popularity),
            )
    return out


def ordered_dict_lru(trace: Trace, batches: list[list[int]]) -> dict[int, list[int]]:
    """Per-access Python LRU: loads per layer for every C, straight from the expert ids."""
    ids = trace.expert_ids
    out = {}
    for capacity in CAPACITIES:
        loads = []
        for layer in range(trace.n_layers):
            sentinel = int(trace.n_experts[layer])
            rows = ids[:, layer, :].tolist()
            cache: OrderedDict[int, None] = OrderedDict()
            n = 0
            for batch in batches:
                for row in batch:
                    for e in rows[row]:
                        if e == sentinel:
                            continue
                        if e in cache:
                            cache.move_to_end(e)
                        else:
                            cache[e] = None
                            n += 1
                while len(cache) > capacity:
                    cache.popitem(last=False)
            loads.append(n)
        out[capacity] = loads
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of the fast timings")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()

    trace = moeprof.synthesize(
        n_experts=64,
        top_k=8,
        n_layers=32,
        n_requests=20,
        tokens_per_request=1000,
        zipf=0.8,
        locality=0.3,
        seed=0,
    )
    workload = (
        f"{trace.n_tokens:,} tokens x {trace.n_layers} layers x top-{trace.top_k} of "
        f"{int(trace.n_experts[0])} experts = {trace.expert_ids.size / 1e6:.2f} M decisions"
    )
    print(f"trace: {workload}")
    print(
        f"policy {POLICY}, B = {BATCH_SIZE}, strategies {','.join(STRATEGIES)} x C in "
        f"{','.join(map(str, CAPACITIES))} = {len(STRATEGIES) * len(CAPACITIES)} simulations\n"
    )

    t0 = time.perf_counter()
    plan = moeprof.plan_batches(trace, POLICY, BATCH_SIZE)
    layers = range(trace.n_layers)
    distinct = [distinct_per_batch(trace, plan, layer) for layer in layers]
    seqs = [layer_sequence(d, int(trace.n_experts[j])) for j, d in zip(layers, distinct)]
    popularity = [
        np.bincount(s.block, weights=s.requests, minlength=s.n_blocks).astype(np.int64)
        for s in seqs
    ]
    t_prep = time.perf_counter() - t0
    items = sum(int(s.block.shape[0]) for s in seqs)

    t0 = time.perf_counter()
    simulate(seqs[:1], popularity[:1], STRATEGIES)  # numba compiles (or loads its cache) here
    t_compile = time.perf_counter() - t0

    times, lru_times, got = [], [], {}
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        got = simulate(seqs, popularity, STRATEGIES)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        simulate(seqs, popularity, ("lru",))
        lru_times.append(time.perf_counter() - t0)
    t_all, t_lru = statistics.median(times), statistics.median(lru_times)

    batches = [plan.rows(b).tolist() for b in range(plan.n_batches)]
    t0 = time.perf_counter()
    reference = ordered_dict_lru(trace, batches)
    t_dict = time.perf_counter() - t0

    wrong = [c for c in CAPACITIES if reference[c] != got["lru", c]]
    speedup = t_dict / t_lru
    fast_enough = t_all <= TARGET_SECONDS
    met = speedup >= TARGET_SPEEDUP

    print(f"{'step':<52}{'time':>12}")
    print(f"{'distinct_per_batch + layer_sequence, 32 layers (once)':<52}{t_prep * 1e3:>9.1f} ms")
    print(f"{'first call: numba compile or cache load (not counted)':<52}{t_compile:>10.2f} s")
    print(f"{'24 simulations (lru, lfu, static, belady x 6 C)':<52}{t_all * 1e3:>9.1f} ms")
    print(f"{'  of which the 6 lru simulations':<52}{t_lru * 1e3:>9.1f} ms")
    print(f"{'per-access OrderedDict LRU, same 6 simulations':<52}{t_dict * 1e3:>9.0f} ms")
    print()
    print(f"items simulated per strategy and C: {items:,} (distinct experts per batch and layer)")
    print(
        f"24 simulations: {t_all:.3f} s (target <= {TARGET_SECONDS:.0f} s) "
        f"{'OK' if fast_enough else 'TOO SLOW'}"
    )
    print(
        f"speedup over OrderedDict LRU: {speedup:.1f}x (target >= {TARGET_SPEEDUP:.0f}x) "
        f"{'OK' if met else 'BELOW TARGET'}"
    )
    print(f"LRU loads identical to the OrderedDict for every layer and C: {not wrong}")
    for c in wrong:
        print(f"  C = {c}: simulation {sum(got['lru', c])}, OrderedDict {sum(reference[c])}")
    print("\nloads (all layers) per strategy and C:")
    print(f"{'C':>4}" + "".join(f"{n:>10}" for n in STRATEGIES))
    for c in CAPACITIES:
        print(f"{c:>4}" + "".join(f"{sum(got[n, c]):>10,}" for n in STRATEGIES))

    print("\nMarkdown:\n")
    timings = [
        ("numba compile or cache load, first call (not counted)", f"{t_compile:,.2f} s"),
        ("24 simulations (4 strategies x 6 capacities, 32 layers)", f"{t_all * 1e3:,.0f} ms"),
        ("the 6 LRU simulations", f"{t_lru * 1e3:,.1f} ms"),
        ("per-access Python `OrderedDict` LRU, same 6", f"{t_dict * 1e3:,.0f} ms"),
        (
            "**speedup over `OrderedDict`**",
            f"**{speedup:,.0f}×** (target ≥ {TARGET_SPEEDUP:.0f}×: {'met' if met else 'missed'})",
        ),
        ("LRU loads identical", "yes" if not wrong else "**no**"),
    ]
    print(markdown_table(("step", "time"), timings))
    print()
    print(markdown_table(("machine", ""), machine_rows({"workload": workload})))
    if wrong:
        sys.exit(1)
    if args.strict and not (met and fast_enough):
        sys.exit(1)


if __name__ == "__main__":
    main()
