"""Benchmark: moeprof.analyze against a per-batch Python set() implementation, side by side.

Trace: synthetic, 20,000 tokens x 32 MoE layers x top-8 of 64 experts (5.12 M routing decisions),
policy tokens, batch sizes 1,2,4,8,16,32,64. Also timed: one numpy copy of the expert-id array,
the memory-bound floor for any pass over the decisions.

Target: analyze >= 100x faster than the per-batch set() count of distinct experts (the timed
baseline, the work that dominates), with identical results. Identical means every field of every
result row and layer row: the set() counts are completed, untimed, into full rows with plain
Python (requests from routed slots, bytes, savings, the uniform expectation as a product over each
batch's tokens, docs/method.md) and compared with ``analyze(...).to_dict()`` field by field; a
field analyze adds that this reference does not compute is a failure too.

Prints a markdown table (timings, ratio, machine, date) for the README's Performance section.

    .venv/bin/python benchmarks/bench_analyze.py [--repeat 5] [--strict]

``--strict`` exits 1 when the speedup is below the target; differing results always exit 1.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from machine import machine_rows, markdown_table

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


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def reference_rows(trace: Trace, unique: dict[int, list[int]]) -> list[dict[str, Any]]:
    """Every field of analyze's result rows (policy tokens), from the set() counts and the trace,
    in plain Python: batches are consecutive runs of b tokens."""
    ids = trace.expert_ids
    n_exp = [int(e) for e in trace.n_experts]
    sizes = [int(b) for b in trace.expert_bytes]
    model_layers = trace.moe_layer_indices
    n_layers, n_tokens = len(n_exp), trace.n_tokens
    # Routed slots per token and layer (a slot holding the sentinel routes nowhere).
    slots = [
        [sum(1 for e in row if e != n_exp[layer]) for layer, row in enumerate(ids[t].tolist())]
        for t in range(n_tokens)
    ]
    req = [sum(slots[t][layer] for t in range(n_tokens)) for layer in range(n_layers)]
    # Uniform routing: token t misses a given expert of layer l with probability 1 - k_t / E_l.
    miss = [[1.0 - k / n_exp[layer] for layer, k in enumerate(row)] for row in slots]
    rows = []
    for b, uni in unique.items():
        starts = range(0, n_tokens, b)
        uniform = [
            sum(n_exp[layer] * (1.0 - math.prod(m[layer] for m in miss[s : s + b])) for s in starts)
            for layer in range(n_layers)
        ]
        savings = [_ratio(r - u, r) for r, u in zip(req, uni)]
        layers = [
            {
                "layer": i,
                "model_layer": model_layers[i],
                "requests": req[i],
                "unique": uni[i],
                "memory_savings": savings[i],
                "bytes_requested": req[i] * sizes[i],
                "bytes_unique": uni[i] * sizes[i],
                "uniform_unique": uniform[i],
                "uniform_memory_savings": _ratio(req[i] - uniform[i], req[i]),
            }
            for i in range(n_layers)
        ]
        total_req, total_uni = sum(req), sum(uni)
        known = min(sizes) > 0  # any unknown size: byte totals 0, bandwidth = memory savings
        bytes_req = sum(r * s for r, s in zip(req, sizes)) if known else 0
        bytes_uni = sum(u * s for u, s in zip(uni, sizes)) if known else 0
        active = [i for i in range(n_layers) if req[i] > 0]
        best = max(active, key=lambda i: savings[i]) if active else 0
        rows.append(
            {
                "batch_size": b,
                "policy": "tokens",
                "n_batches": len(starts),
                "tokens": n_tokens,
                "requests": total_req,
                "unique": total_uni,
                "memory_savings": _ratio(total_req - total_uni, total_req),
                "bandwidth_savings": (
                    _ratio(bytes_req - bytes_uni, bytes_req)
                    if bytes_req
                    else _ratio(total_req - total_uni, total_req)
                ),
                "bytes_requested": bytes_req,
                "bytes_unique": bytes_uni,
                "bytes_saved": bytes_req - bytes_uni,
                "max_reuse_factor": savings[best] if active else 0.0,
                "max_reuse_layer": best,
                "mean_reuse_factor": statistics.fmean(savings[i] for i in active)
                if active
                else 0.0,
                "uniform_unique": sum(uniform),
                "uniform_memory_savings": _ratio(total_req - sum(uniform), total_req),
                "layers": layers,
            }
        )
    return rows


def differences(got: Any, want: Any, where: str = "results") -> list[str]:
    """Where two result documents differ: keys, lengths, ints exactly, floats to 1e-9."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}.{k}: not in the reference" for k in sorted(set(got) - set(want))]
        out += [f"{where}.{k}: missing from analyze" for k in sorted(set(want) - set(got))]
        for key in sorted(set(got) & set(want)):
            out += differences(got[key], want[key], f"{where}.{key}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{where}: {len(got)} entries, reference {len(want)}"]
        return [
            d for i, (g, w) in enumerate(zip(got, want)) for d in differences(g, w, f"{where}[{i}]")
        ]
    if isinstance(want, float) or isinstance(got, float):
        same = math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-12)
    else:
        same = got == want and type(got) is type(want)
    return [] if same else [f"{where}: analyze {got!r}, reference {want!r}"]


def count_fields(doc: Any) -> int:
    if isinstance(doc, dict):
        return sum(count_fields(v) for v in doc.values())
    if isinstance(doc, list):
        return sum(count_fields(v) for v in doc)
    return 1


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
    parser.add_argument(
        "--strict",
        action="store_true",
        help=f"exit 1 when analyze is less than {TARGET_SPEEDUP:.0f}x faster than set()",
    )
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
    workload = (
        f"{trace.n_tokens:,} tokens x {trace.n_layers} layers x top-{trace.top_k} "
        f"of {int(trace.n_experts[0])} experts = {decisions / 1e6:.2f} M decisions"
    )
    print(f"trace: {workload}")
    print(f"batch sizes {','.join(map(str, BATCH_SIZES))}, policy tokens\n")

    ids = np.asarray(trace.expert_ids)
    t_copy, _ = timed(lambda: ids.copy(), args.repeat)
    moeprof.analyze(trace, BATCH_SIZES)  # warm-up
    t_fast, result = timed(lambda: moeprof.analyze(trace, BATCH_SIZES), args.repeat)
    t_set, unique = timed(lambda: set_baseline(trace, BATCH_SIZES), 1)

    assert isinstance(result, moeprof.AnalysisResult) and isinstance(unique, dict)
    got = result.to_dict()["results"]
    diffs = differences(got, reference_rows(trace, unique))
    speedup = t_set / t_fast
    met = speedup >= TARGET_SPEEDUP

    print(f"{'implementation':<34}{'time':>12}{'vs analyze':>14}")
    print(
        f"{'numpy copy of expert_ids (floor)':<34}{t_copy * 1e3:>10.2f} ms{t_copy / t_fast:>13.3f}x"
    )
    print(f"{'moeprof.analyze (bitsets)':<34}{t_fast * 1e3:>10.2f} ms{1.0:>13.3f}x")
    print(f"{'per-batch Python set()':<34}{t_set * 1e3:>10.2f} ms{speedup:>13.1f}x")
    print()
    print(
        f"speedup over set(): {speedup:.1f}x (target >= {TARGET_SPEEDUP:.0f}x) "
        f"{'OK' if met else 'BELOW TARGET'}"
    )
    print(f"analyze / memory floor: {t_fast / t_copy:.1f}x")
    print(
        f"results identical: {not diffs} ({count_fields(got):,} fields of {len(got)} result rows "
        "compared)"
    )
    for line in diffs[:20]:
        print(f"  {line}")

    print("\nMarkdown (README, Performance):\n")
    timings = [
        ("one numpy copy of the expert ids (memory-bound floor)", f"{t_copy * 1e3:,.1f} ms"),
        ("`moeprof.analyze` (bitsets)", f"{t_fast * 1e3:,.1f} ms"),
        ("per-batch Python `set()`", f"{t_set * 1e3:,.0f} ms"),
        (
            "**speedup of analyze over `set()`**",
            f"**{speedup:,.0f}×** (target ≥ {TARGET_SPEEDUP:.0f}×: {'met' if met else 'missed'})",
        ),
        ("results identical (every field)", "yes" if not diffs else "**no**"),
    ]
    print(markdown_table(("implementation", "time"), timings))
    print()
    print(markdown_table(("machine", ""), machine_rows({"workload": workload})))
    if diffs:
        sys.exit(1)
    if args.strict and not met:
        sys.exit(1)


if __name__ == "__main__":
    main()
