"""Benchmark: moeprof.analyze against a per-batch Python set() implementation, side by side.

Trace: synthetic, 20,000 tokens x 32 MoE layers x top-8 of 64 experts (5.12 M routing decisions),
policy tokens, batch sizes 1,2,4,8,16,32,64. Also timed: one numpy copy of the expert-id array,
the memory-bound floor for any pass over the decisions. Target: analyze >= 100x faster than
set(), with identical results.

    .venv/bin/python benchmarks/bench_analyze.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

import moeprof
from moeprof.trace import Trace

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
TARGET_SPEEDUP = 100.0


def set_baseline(trace: Trace, batch_sizes: tuple[int, ...]) -> dict[int, list[int]]:
    """Straightforward reference: for each batch and layer, len(set(ids)) without sentinels."""
    ids = trace.expert_ids
    sentinel = int(trace.n_experts[0])
    out: dict[int, list[int]] = {}
    for b in batch_sizes:
        unique = [0] * trace.n_layers
        for start in range(0, trace.n_tokens, b):
            chunk = ids[start : start + b]
            for layer in range(trace.n_layers):
                experts = set(chunk[:, layer, :].ravel().tolist())
                experts.discard(sentinel)
                unique[layer] += len(experts)
        out[b] = unique
    return out


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of the fast timings")
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
    decisions = trace.expert_ids.size
    print(
        f"trace: {trace.n_tokens:,} tokens x {trace.n_layers} layers x top-{trace.top_k} "
        f"of {int(trace.n_experts[0])} experts = {decisions / 1e6:.2f} M decisions"
    )
    print(f"batch sizes {','.join(map(str, BATCH_SIZES))}, policy tokens\n")

    ids = np.asarray(trace.expert_ids)
    t_copy, _ = timed(lambda: ids.copy(), args.repeat)
    moeprof.analyze(trace, BATCH_SIZES)  # warm-up
    t_fast, result = timed(lambda: moeprof.analyze(trace, BATCH_SIZES), args.repeat)
    t_set, reference = timed(lambda: set_baseline(trace, BATCH_SIZES), 1)

    assert isinstance(result, moeprof.AnalysisResult) and isinstance(reference, dict)
    identical = all(
        [layer.unique for layer in row.layers] == reference[row.batch_size]
        for row in result.results
    )
    speedup = t_set / t_fast
    print(f"{'implementation':<34}{'time':>12}{'vs analyze':>14}")
    print(
        f"{'numpy copy of expert_ids (floor)':<34}{t_copy * 1e3:>10.2f} ms{t_copy / t_fast:>13.3f}x"
    )
    print(f"{'moeprof.analyze (bitsets)':<34}{t_fast * 1e3:>10.2f} ms{1.0:>13.3f}x")
    print(f"{'per-batch Python set()':<34}{t_set * 1e3:>10.2f} ms{speedup:>13.1f}x")
    print()
    print(
        f"speedup over set(): {speedup:.1f}x (target >= {TARGET_SPEEDUP:.0f}x) "
        f"{'OK' if speedup >= TARGET_SPEEDUP else 'BELOW TARGET'}"
    )
    print(f"analyze / memory floor: {t_fast / t_copy:.1f}x")
    print(f"results identical: {identical}")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
