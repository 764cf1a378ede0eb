"""Benchmark: `moeprof.synthesize` (generator version 2) against version 1 on the same settings.

Shape: DeepSeek-V3 — 61 MoE layers, top-8 of 256 experts (uint16 ids), Zipf 1.0, locality 0.3,
requests of 512 tokens, seed 0. Sizes in routing decisions (token x layer x slot), default 10 M
and 100 M. Timed: the whole ``synthesize`` call as a user makes it (drawing, then
``Trace.from_arrays``' validation), wall clock and CPU time (all threads). numba's first compile
(or load from its on-disk cache) is done on a small trace first and not counted.

Version 1 is the previous generator (Gumbel-top-k over every expert, vectorised fixed-point
locality), copied below as it was: the baseline of the ratio. It runs at about 0.4 M
decisions/s, so it is timed at ``min(size, --old-max)`` decisions (default 10 M) and the table
says which size it ran.

Target: version 2 >= 20 M decisions/s (wall clock) at every size. CPU time is printed too: on a
shared machine the wall clock measures the other load as much as the generator.

    .venv/bin/python benchmarks/bench_synth.py [--sizes 10M,100M] [--old-max 10M] [--strict]

``--strict`` exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from machine import machine_rows, markdown_table

import moeprof

N_EXPERTS, TOP_K, N_LAYERS = 256, 8, 61
ZIPF, LOCALITY, TOKENS_PER_REQUEST, SEED = 1.0, 0.3, 512, 0
TARGET_RATE = 20e6
_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = _SUFFIX.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in _SUFFIX else text) * scale)


def shape_for(decisions: int) -> tuple[int, int]:
    """(requests, tokens per request) for about `decisions` routing decisions."""
    per_token = N_LAYERS * TOP_K
    tokens = max(1, round(decisions / per_token))
    requests = max(1, round(tokens / TOKENS_PER_REQUEST))
    return requests, max(1, round(tokens / requests))


# ------------------------------------------------------------------ version 1, as it was
_V1_CHUNK, _V1_DRAW_FLOATS = 1 << 15, 1 << 22
_V1_WINDOW_MIN, _V1_WINDOW_MAX, _V1_LOCALITY_DECISIONS = 32, 1 << 15, 1 << 20


def _v1_ranked_draws(rng: np.random.Generator, log_p: np.ndarray, n: int, k: int) -> np.ndarray:
    n_exp = log_p.shape[0]
    keys = log_p[None, :] + rng.gumbel(size=(n, n_exp))
    top = (
        np.argpartition(-keys, k - 1, axis=1)[:, :k]
        if k < n_exp
        else np.tile(np.arange(n_exp), (n, 1))
    )
    top_keys = np.take_along_axis(keys, top, axis=1)
    return np.take_along_axis(top, np.argsort(-top_keys, axis=1), axis=1)


def _v1_fill_fresh(cand: np.ndarray, carried: np.ndarray, keep: np.ndarray) -> np.ndarray:
    top_k = cand.shape[1]
    taken = np.zeros(cand.shape, dtype=bool)
    for j in range(top_k):
        taken |= keep[:, j : j + 1] & (cand == carried[:, j : j + 1])
    usable = np.take_along_axis(cand, np.argsort(taken, axis=1, kind="stable"), axis=1)
    fresh_rank = np.maximum(np.cumsum(~keep, axis=1) - 1, 0)
    return np.where(keep, carried, np.take_along_axis(usable, fresh_rank, axis=1))


def _v1_apply_locality(cand: np.ndarray, keep: np.ndarray, carry: np.ndarray | None) -> np.ndarray:
    cand = np.asarray(cand, dtype=np.int64)
    top_k = cand.shape[-1]
    cand = cand.reshape(cand.shape[0], -1, top_k)
    keep = np.array(keep, dtype=bool).reshape(cand.shape)
    if carry is not None:
        cand = np.concatenate([np.asarray(carry, dtype=np.int64).reshape(1, -1, top_k), cand])
        keep = np.concatenate([np.zeros_like(keep[:1]), keep])
    n, n_streams, _ = cand.shape
    keep[0] = False
    fresh = ~keep
    rows = np.arange(n)[:, None, None]
    stream = np.arange(n_streams)[None, :, None]
    slot = np.arange(top_k)[None, None, :]
    src = np.maximum.accumulate(np.where(fresh, rows, 0), axis=0)
    next_fresh = np.minimum.accumulate(np.where(fresh, rows, n)[::-1], axis=0)[::-1]
    run_end = np.concatenate([next_fresh[1:], np.full_like(next_fresh[:1], n)]) - 1
    value = cand.copy()
    lo, width = 0, _V1_WINDOW_MIN
    while lo < n:
        hi = min(n, lo + width)
        todo = np.arange(lo, hi)
        passes = 0
        while todo.size:
            passes += 1
            old = value[todo]
            new = _v1_fill_fresh(
                cand[todo].reshape(-1, top_k),
                value[src[todo], stream, slot].reshape(-1, top_k),
                keep[todo].reshape(-1, top_k),
            ).reshape(old.shape)
            is_fresh = fresh[todo]
            changed = is_fresh & (new != old)
            value[todo] = np.where(is_fresh, new, old)
            r, s, k = np.nonzero(changed)
            r = todo[r]
            stops = np.minimum(run_end[r, s, k] + 1, hi) - lo
            starts = np.minimum(r + 1 - lo, stops)
            span = np.bincount(starts, minlength=hi - lo + 1)
            span -= np.bincount(stops, minlength=hi - lo + 1)
            todo = lo + np.flatnonzero(np.cumsum(span[: hi - lo]) > 0)
        lo = hi
        if passes <= 4:
            width = min(2 * width, _V1_WINDOW_MAX)
        elif passes > 16:
            width = max(width // 2, _V1_WINDOW_MIN)
    out = value[src, stream, slot]
    return out[1:] if carry is not None else out


def synth_v1(n_requests: int, tokens_per_request: int) -> np.ndarray:
    """Version 1's expert ids [T, L, K] for this benchmark's settings (no length spread)."""
    rng = np.random.default_rng(SEED)
    rng.uniform(1.0, 1.0, size=n_requests)  # version 1 drew the lengths' spread first
    n_tokens = n_requests * tokens_per_request
    is_first = np.arange(n_tokens) % tokens_per_request == 0
    base = -ZIPF * np.log(np.arange(1, N_EXPERTS + 1, dtype=np.float64))
    log_p = np.stack([base[rng.permutation(N_EXPERTS)] for _ in range(N_LAYERS)])
    ids = np.empty((n_tokens, N_LAYERS, TOP_K), dtype=np.uint16)
    keep = np.zeros(ids.shape, dtype=bool)
    chunk = max(1, min(_V1_CHUNK, _V1_DRAW_FLOATS // N_EXPERTS))
    for layer in range(N_LAYERS):
        for lo in range(0, n_tokens, chunk):
            hi = min(n_tokens, lo + chunk)
            ids[lo:hi, layer] = _v1_ranked_draws(rng, log_p[layer], hi - lo, TOP_K)
            keep[lo:hi, layer] = rng.random((hi - lo, TOP_K)) < LOCALITY
    keep[is_first] = False
    step = max(1, _V1_LOCALITY_DECISIONS // (N_LAYERS * TOP_K))
    carry = None
    for lo in range(0, n_tokens, step):
        hi = min(n_tokens, lo + step)
        ids[lo:hi] = _v1_apply_locality(ids[lo:hi], keep[lo:hi], carry)
        carry = ids[hi - 1]
    return ids


# ------------------------------------------------------------------ timing
def synth_v2(n_requests: int, tokens_per_request: int) -> np.ndarray:
    trace = moeprof.synthesize(
        n_experts=N_EXPERTS,
        top_k=TOP_K,
        n_layers=N_LAYERS,
        n_requests=n_requests,
        tokens_per_request=tokens_per_request,
        zipf=ZIPF,
        locality=LOCALITY,
        seed=SEED,
    )
    return trace.expert_ids


def timed(fn, *args: int) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """(wall seconds, CPU seconds of all threads, decisions made)."""
    wall, cpu = time.perf_counter(), time.process_time()
    ids = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, int(ids.size)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10M,100M", help="decisions per trace, e.g. 10M,100M")
    parser.add_argument("--old-max", default="10M", help="largest size version 1 is timed at")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    old_max = parse_size(args.old_max)

    synth_v2(1, 4)  # numba compile or cache load, not counted
    header = (
        "| decisions | v2 wall s | v2 M dec/s | v2 CPU s | v2 M dec/CPU-s | v1 run at | v1 wall s "
        f"| v1 CPU s | v1 M dec/CPU-s | v2 / v1 (CPU) |\n|{' ---: |' * 10}"
    )
    rows, met = [], True
    for size in sizes:
        shape = shape_for(size)
        wall2, cpu2, made2 = timed(synth_v2, *shape)
        old_shape = shape_for(min(size, old_max))
        wall1, cpu1, made1 = timed(synth_v1, *old_shape)
        rate2, cpu_rate2, cpu_rate1 = made2 / wall2, made2 / cpu2, made1 / cpu1
        met &= rate2 >= TARGET_RATE
        rows.append(
            f"| {made2 / 1e6:,.1f} M | {wall2:.2f} | {rate2 / 1e6:.1f} | {cpu2:.2f} "
            f"| {cpu_rate2 / 1e6:.1f} | {made1 / 1e6:,.1f} M | {wall1:.2f} | {cpu1:.2f} "
            f"| {cpu_rate1 / 1e6:.2f} | {cpu_rate2 / cpu_rate1:.0f}x |"
        )
        print(rows[-1], flush=True)
    workload = (
        f"{N_LAYERS} layers x top-{TOP_K} of {N_EXPERTS} experts, zipf {ZIPF}, locality "
        f"{LOCALITY}, {TOKENS_PER_REQUEST}-token requests, seed {SEED}"
    )
    print(f"\nsynthesize, generator v2 vs v1 ({workload}); target >= 20 M decisions/s\n")
    print(header)
    print("\n".join(rows))
    print()
    print(markdown_table(("machine", ""), machine_rows({"workload": workload})))
    if args.strict and not met:
        print(f"target missed: v2 below {TARGET_RATE / 1e6:.0f} M decisions/s", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
