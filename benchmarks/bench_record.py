"""Overhead of recording: the demo model's greedy generation with and without recording
(`moeprof.record_routing`).

Repetitions are interleaved (plain, recorded, recorded, plain, ...) so that drift in machine load
hits both sides alike; the slowdown is the median of the per-pair ratios. On a shared machine
other work only ever adds time, so the ratio of the fastest runs of each side ("best of") is
printed too, as the estimate least touched by that noise. Building the trace (`to_trace`, once
after the run) is timed separately. Both sides must generate the same tokens.

Target: <= 5 % slowdown (median of the pairs); ``--strict`` exits 1 when it is missed, and a run
whose recorded side generated other tokens always exits 1. Ends with a markdown table of the
numbers, the machine and the date.

    .venv/bin/python benchmarks/bench_record.py                  # CPU
    .venv/bin/python benchmarks/bench_record.py --device cuda    # GPU

``--memory N`` measures something else: the peak RSS of ``moeprof record`` (the demo model, N
prompts built from the demo set) run as a child process without and with ``--shard-tokens``,
read from the child's resource usage (``os.wait4``: ru_maxrss of that child alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from machine import machine_rows, markdown_table

import moeprof
from moeprof import demo
from moeprof.record.run import encode

TARGET_SLOWDOWN = 0.05


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_all(
    model: Any, batches: list[dict[str, torch.Tensor]], new_tokens: int
) -> list[torch.Tensor]:
    outs = []
    for inputs in batches:
        outs.append(
            model.generate(
                **inputs, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens
            )
        )
    return outs


def _peak_rss_mib(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd` as a child; its peak resident memory (MiB) and wall seconds."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited with {child.returncode}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0  # ru_maxrss: KiB on Linux


def memory(args: argparse.Namespace) -> None:
    """Peak RSS of `moeprof record` over many prompts, without and with --shard-tokens."""
    base = demo.prompts()
    # Long prompts (4 demo prompts each) so that prefill-heavy runs hold many tokens.
    prompts = [" ".join(base[(i + j) % len(base)] for j in range(4)) for i in range(args.memory)]
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompts.txt"
        prompt_file.write_text("\n".join(p.replace("\n", " ") for p in prompts) + "\n")
        common = [sys.executable, "-m", "moeprof", "record", "--prompts", str(prompt_file)]
        common += ["-b", str(args.batch_size), "-n", str(args.max_new_tokens)]
        common += ["--device", args.device]
        rows = []
        for shard in (None, args.shard_tokens):
            out = Path(tmp) / ("whole.moe" if shard is None else "sharded.moe")
            cmd = common + ["-o", str(out)]
            if shard is not None:
                cmd += ["--shard-tokens", str(shard)]
            peak, seconds = _peak_rss_mib(cmd)
            files = [out] if shard is None else sorted(Path(tmp).glob("sharded-*.moe"))
            tokens = sum(moeprof.load_trace(f).n_tokens for f in files)
            label = "no sharding" if shard is None else f"--shard-tokens {shard:,}"
            rows.append(
                (label, f"{peak:,.0f} MiB", f"{tokens:,}", str(len(files)), f"{seconds:.0f}")
            )
            print(
                f"{label}: peak RSS {peak:,.0f} MiB, {tokens:,} tokens, {len(files)} file(s), "
                f"{seconds:.0f} s",
                flush=True,
            )
    print()
    head = ("moeprof record (demo model)", "peak RSS", "tokens", "files", "seconds")
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    workload = (
        f"{args.device}; {args.memory} prompts of 4 demo prompts, batch {args.batch_size}, "
        f"{args.max_new_tokens} new tokens"
    )
    print(
        markdown_table(
            ("machine", ""), machine_rows({"torch": torch.__version__, "workload": workload})
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="auto (stored bfloat16) or float32")
    ap.add_argument("--prompts", type=int, default=16, help="prompts from the demo set")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7, help="pairs of timed runs")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    ap.add_argument(
        "--strict",
        action="store_true",
        help=f"exit 1 when the median slowdown exceeds {TARGET_SLOWDOWN:.0%}",
    )
    ap.add_argument(
        "--memory",
        type=int,
        default=0,
        metavar="N",
        help="instead: peak RSS of `moeprof record` over N prompts, without and with shards",
    )
    ap.add_argument("--shard-tokens", type=int, default=100_000, help="for --memory")
    args = ap.parse_args()
    if args.memory:
        memory(args)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = demo.load(dtype=dtype, device=str(device))
    prompts = demo.prompts()[: args.prompts]
    batches = [
        encode(tokenizer, prompts[i : i + args.batch_size], device)
        for i in range(0, len(prompts), args.batch_size)
    ]
    new = args.max_new_tokens

    def plain() -> tuple[float, list[torch.Tensor]]:
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            outs = generate_all(model, batches, new)
        _sync(device)
        return time.perf_counter() - t0, outs

    def recorded() -> tuple[float, list[torch.Tensor], Any]:
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), moeprof.record_routing(model) as rec:
            outs = generate_all(model, batches, new)
        _sync(device)
        return time.perf_counter() - t0, outs, rec

    # Warm-up (allocator, kernels, lazy imports), and a correctness check: same tokens either way.
    _, ref = plain()
    _, got, rec = recorded()
    same = all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    t0 = time.perf_counter()
    trace = rec.to_trace()
    to_trace_s = time.perf_counter() - t0

    plain_s: list[float] = []
    rec_s: list[float] = []
    for r in range(args.reps):
        order = (plain, recorded) if r % 2 == 0 else (recorded, plain)
        for fn in order:
            seconds = fn()[0]
            (plain_s if fn is plain else rec_s).append(seconds)
    ratios = [b / a for a, b in zip(plain_s, rec_s, strict=True)]
    slowdown = statistics.median(ratios) - 1.0
    best_slowdown = min(rec_s) / min(plain_s) - 1.0
    tokens = trace.n_tokens
    result = {
        "device": str(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": new,
        "tokens_recorded": tokens,
        "forward_passes": rec.n_passes,
        "reps": args.reps,
        "plain_median_s": statistics.median(plain_s),
        "recorded_median_s": statistics.median(rec_s),
        "slowdown": slowdown,
        "slowdown_min_max": [min(ratios) - 1.0, max(ratios) - 1.0],
        "best_of_slowdown": best_slowdown,
        "to_trace_s": to_trace_s,
        "same_tokens": same,
    }
    print(
        f"demo model on {device} ({result['dtype']}, {result['threads']} threads): "
        f"{len(prompts)} prompts, batch {args.batch_size}, {new} new tokens, "
        f"{tokens:,} tokens in {rec.n_passes} forward passes per run"
    )
    print(f"{'':24}{'median s':>10}{'tokens/s':>12}")
    for name, values in (("generate", plain_s), ("generate + record", rec_s)):
        med = statistics.median(values)
        print(f"{name:24}{med:10.3f}{tokens / med:12,.0f}")
    print(
        f"slowdown: {100 * slowdown:+.1f}% (median of {args.reps} interleaved pairs; "
        f"range {100 * result['slowdown_min_max'][0]:+.1f}% .. {100 * result['slowdown_min_max'][1]:+.1f}%)"
    )
    print(
        f"best of {args.reps}: {min(plain_s):.3f} s vs {min(rec_s):.3f} s -> "
        f"{100 * best_slowdown:+.1f}%"
    )
    print(f"to_trace(): {1000 * to_trace_s:.1f} ms once per run; same tokens generated: {same}")
    met = slowdown <= TARGET_SLOWDOWN
    print(f"target: <= {TARGET_SLOWDOWN:.0%} slowdown: {'met' if met else 'MISSED'}")
    if args.json:
        print(json.dumps(result, indent=2))
    print("\nMarkdown:\n")
    rows = [
        ("generate, median", f"{statistics.median(plain_s):.3f} s"),
        ("generate + record, median", f"{statistics.median(rec_s):.3f} s"),
        (
            f"**slowdown** (median of {args.reps} interleaved pairs)",
            f"**{100 * slowdown:+.1f} %** (target ≤ {TARGET_SLOWDOWN:.0%}: "
            f"{'met' if met else 'missed'})",
        ),
        (
            "range of the pairs",
            f"{100 * result['slowdown_min_max'][0]:+.1f} % .. "
            f"{100 * result['slowdown_min_max'][1]:+.1f} %",
        ),
        (f"best of {args.reps}", f"{100 * best_slowdown:+.1f} %"),
        ("`to_trace()`, once per run", f"{1000 * to_trace_s:.1f} ms"),
        ("same tokens generated", "yes" if same else "**no**"),
    ]
    print(markdown_table(("demo model, greedy generation", "value"), rows))
    print()
    workload = (
        f"{device}, {result['dtype']}, {result['threads']} threads; {len(prompts)} prompts, "
        f"batch {args.batch_size}, {new} new tokens, {tokens:,} tokens in {rec.n_passes} passes"
    )
    extra = {"torch": torch.__version__, "workload": workload}
    print(markdown_table(("machine", ""), machine_rows(extra)))
    if not same:
        sys.exit("recording changed the generated tokens")
    if args.strict and not met:
        sys.exit(1)


if __name__ == "__main__":
    main()
