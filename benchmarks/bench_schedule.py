"""Benchmark: scheduling cost of affinity admission beside the FIFO plan, under `serve`.

Pool: synthetic, 2,000 requests x 200 tokens (the first 64 of each its prompt, phase 0), 26 MoE
layers, top-6 of 64 experts (zipf 0.8, locality 0.3, seed 0); B = 64 running requests, 2,048
tokens per step, all requests waiting at step 0. Timed: the whole FIFO simulation; affinity's
signatures (one histogram per request over its prompt), its Gram matrix, the simulation, and
inside it the admission decisions (one masked argmax over the waiting pool per admitted request,
the running set's scores updated by one row per change).

Target: affinity's decisions <= 1 ms per step on average.

    .venv/bin/python benchmarks/bench_schedule.py [--repeat 3] [--strict]

``--strict`` exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from machine import machine_rows, markdown_table

import moeprof
from moeprof.batching.serve import ServePolicy, request_table
from moeprof.schedule import AffinityAdmission, signatures
from moeprof.trace import Trace

N_REQUESTS, TOKENS, PROMPT = 2000, 200, 64
LAYERS, EXPERTS, TOP_K, B = 26, 64, 6, 64
TARGET_MS_PER_STEP = 1.0


def pool() -> Trace:
    base = moeprof.synthesize(
        n_experts=EXPERTS,
        top_k=TOP_K,
        n_layers=LAYERS,
        n_requests=N_REQUESTS,
        tokens_per_request=TOKENS,
        zipf=0.8,
        locality=0.3,
        seed=0,
    )
    phase = (np.tile(np.arange(TOKENS), N_REQUESTS) >= PROMPT).astype(np.uint8)
    return Trace.from_arrays(
        base.expert_ids,
        n_experts=EXPERTS,
        request_ids=base.request_ids,
        positions=base.positions,
        phase=phase,
        expert_bytes=[int(x) for x in base.expert_bytes],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args()
    t0 = time.perf_counter()
    trace = pool()
    print(f"(pool built in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    serving = ServePolicy()
    table = request_table(trace)
    fifo_s, sig_s, gram_s, affinity_s, decide_ms = [], [], [], [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        fifo = serving.run(trace, B)
        fifo_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sig = signatures(trace, table, future=False)
        sig_s.append(time.perf_counter() - t0)
        chooser = AffinityAdmission(sig)
        t0 = time.perf_counter()
        chooser.start(table.n_requests)  # builds the Gram matrix
        gram_s.append(time.perf_counter() - t0)
        chooser.start = lambda n: None  # type: ignore[method-assign]  # reuse it in the run
        t0 = time.perf_counter()
        run = serving.run(trace, B, chooser)
        affinity_s.append(time.perf_counter() - t0)
        decide_ms.append(1e3 * run.decision_seconds / run.plan.n_batches)
    per_step = statistics.median(decide_ms)
    steps = run.plan.n_batches
    print(f"# bench_schedule: {N_REQUESTS:,} requests x {TOKENS} tokens, B = {B}\n")
    print(markdown_table(["", ""], machine_rows()))
    print()
    rows = [
        ["FIFO simulation", f"{statistics.median(fifo_s):.3f} s", f"{fifo.plan.n_batches:,}"],
        ["affinity: signatures", f"{statistics.median(sig_s):.3f} s", ""],
        ["affinity: Gram matrix", f"{statistics.median(gram_s):.3f} s", ""],
        ["affinity simulation", f"{statistics.median(affinity_s):.3f} s", f"{steps:,}"],
        [
            "affinity decisions",
            f"{statistics.median(decide_ms) * steps / 1e3:.3f} s",
            f"{run.decisions:,} decisions",
        ],
        [
            "affinity decision time per step",
            f"{per_step:.4f} ms",
            f"target <= {TARGET_MS_PER_STEP} ms",
        ],
        [
            "simulation per step, FIFO / affinity",
            f"{1e3 * statistics.median(fifo_s) / fifo.plan.n_batches:.3f} / "
            f"{1e3 * statistics.median(affinity_s) / steps:.3f} ms",
            "",
        ],
    ]
    print("| what (median of runs) | time | note |\n| --- | ---: | ---: |")
    print("\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows))
    met = per_step <= TARGET_MS_PER_STEP
    print(f"\ntarget {'met' if met else 'MISSED'}: {per_step:.4f} ms per step")
    return 1 if args.strict and not met else 0


if __name__ == "__main__":
    sys.exit(main())
