"""Benchmark: `moeprof analyze` and `moeprof cache` on traces of 10 M, 100 M and 1 B routing
decisions, streaming (``--chunk-tokens N``) against in memory (``--chunk-tokens 0``).

Traces: DeepSeek-V3's shape — 61 MoE layers, top-8 of 256 experts (uint16 ids; 1 B decisions
are about 2 GB of ids), Zipf 0.8, locality 0.2, requests of 512 tokens, seed 0 — made once by
``moeprof synth`` into a cache folder (default ``~/.cache/moeprof-bench``, ``--cache-dir``) and
reused (the file name holds the size, seed and generator version).

Each measurement runs the CLI as a child process and reads that child's own peak RSS
(``os.wait4``'s rusage, ``ru_maxrss``):

- ``analyze --policy tokens -b 1,2,4,8,16,32,64`` and the same with ``--policy decode``;
- ``cache --strategies lru -C 16 --policy decode`` (batch sizes: the command's default).

Each in memory (``--chunk-tokens 0``) unless the trace is larger than
``--skip-in-memory-above`` (default 100M decisions), and streaming (``--chunk-tokens N``,
``--chunk N``, default 16,384 tokens) where the command has the option (read from its
``--help``; without it the streaming rows are skipped, with a note).

Targets: time linear in decisions (per-decision time at the largest size <= 1.5x the smallest
size's, per command and mode); streaming peak RSS flat (<= 1.5 GB at every size); streaming no
more than 1.3x slower per decision than in memory.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 10M,100M,1B] [--cache-dir DIR]
        [--skip-in-memory-above 100M] [--chunk 16384] [--strict]

``--strict`` exits 1 when a target is missed; a failing command always exits 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from machine import machine_rows, markdown_table

from moeprof.synth import GENERATOR_VERSION

N_EXPERTS, TOP_K, N_LAYERS = 256, 8, 61
ZIPF, LOCALITY, TOKENS_PER_REQUEST, SEED = 0.8, 0.2, 512, 0
BATCH_SIZES = "1,2,4,8,16,32,64"
COMMANDS = {
    "analyze tokens": ["analyze", "--policy", "tokens", "-b", BATCH_SIZES],
    "analyze decode": ["analyze", "--policy", "decode", "-b", BATCH_SIZES],
    "cache lru C=16": ["cache", "--strategies", "lru", "-C", "16", "--policy", "decode"],
}
TARGET_LINEAR = 1.5  # per-decision time, largest size / smallest size
TARGET_RSS = 1.5e9  # bytes, streaming, every size
TARGET_STREAMING = 1.3  # streaming / in-memory seconds
_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = _SUFFIX.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in _SUFFIX else text) * scale)


def size_label(n: int) -> str:
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


@dataclass
class Run:
    seconds: float
    peak_rss: int  # bytes
    returncode: int
    stderr: str


def run_child(args: list[str]) -> Run:
    """Run `args`; wall time and the child's own peak RSS (not the largest child so far)."""
    with tempfile.TemporaryFile(mode="w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return Run(seconds, usage.ru_maxrss * 1024, proc.returncode, err.read())


def moeprof_cli() -> list[str]:
    return [sys.executable, "-m", "moeprof"]


def has_chunk_tokens(command: str) -> bool:
    """Whether `moeprof COMMAND --help` offers --chunk-tokens (streaming)."""
    out = subprocess.run(
        [*moeprof_cli(), command, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    return "--chunk-tokens" in out


def trace_for(size: int, cache_dir: Path) -> tuple[Path, int, Run | None]:
    """The cached trace of about `size` decisions (made now if missing), its exact decision
    count, and the synth run when it was made."""
    tokens = max(1, round(size / (N_LAYERS * TOP_K)))
    requests = max(1, round(tokens / TOKENS_PER_REQUEST))
    per_request = max(1, round(tokens / requests))
    decisions = requests * per_request * N_LAYERS * TOP_K
    path = cache_dir / f"dsv3-{size_label(size)}-seed{SEED}-gen{GENERATOR_VERSION}.moe"
    if path.exists():
        return path, decisions, None
    cache_dir.mkdir(parents=True, exist_ok=True)
    made = run_child(
        [
            *moeprof_cli(),
            "synth",
            "-o",
            str(path),
            "-E",
            str(N_EXPERTS),
            "-k",
            str(TOP_K),
            "-L",
            str(N_LAYERS),
            "-R",
            str(requests),
            "-T",
            str(per_request),
            "--zipf",
            str(ZIPF),
            "--locality",
            str(LOCALITY),
            "--seed",
            str(SEED),
        ]
    )
    if made.returncode != 0:
        sys.exit(f"moeprof synth failed for {size_label(size)}: {made.stderr.strip()}")
    return path, decisions, made


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10M,100M,1B", help="decisions per trace")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "moeprof-bench")
    parser.add_argument(
        "--skip-in-memory-above", default="100M", help="no in-memory runs above this size"
    )
    parser.add_argument("--chunk", type=int, default=16384, help="--chunk-tokens when streaming")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    sizes = sorted(parse_size(s) for s in args.sizes.split(","))
    in_memory_max = parse_size(args.skip_in_memory_above)
    streams = {name: has_chunk_tokens(argv[0]) for name, argv in COMMANDS.items()}
    notes = [
        f"{name}: `moeprof {COMMANDS[name][0]}` has no --chunk-tokens yet; streaming rows skipped"
        for name, ok in streams.items()
        if not ok
    ]

    header = (
        "| decisions | command | mode | seconds | M decisions/s | peak RSS | "
        "streaming / in memory |\n| ---: | --- | --- | ---: | ---: | ---: | ---: |"
    )
    rows: list[str] = []
    seconds: dict[tuple[str, str, int], float] = {}
    rss: dict[tuple[str, str, int], int] = {}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        out_json = str(Path(tmp) / "out.json")
        for size in sizes:
            path, decisions, made = trace_for(size, args.cache_dir)
            if made is not None:
                rows.append(
                    f"| {decisions / 1e6:,.0f} M | synth (made the trace) | in memory "
                    f"| {made.seconds:.1f} | {decisions / made.seconds / 1e6:.1f} "
                    f"| {made.peak_rss / 2**20:,.0f} MiB | |"
                )
                print(rows[-1], flush=True)
            for name, argv in COMMANDS.items():
                modes = []
                if size <= in_memory_max:
                    modes.append(("in memory", ["--chunk-tokens", "0"] if streams[name] else []))
                if streams[name]:
                    modes.append(("streaming", ["--chunk-tokens", str(args.chunk)]))
                for mode, extra in modes:
                    run = run_child(
                        [*moeprof_cli(), *argv, str(path), "--json", out_json, "--force", *extra]
                    )
                    if run.returncode != 0:
                        failed = True
                        print(f"{name} {mode} failed: {run.stderr.strip()}", file=sys.stderr)
                        continue
                    key = (name, mode, size)
                    seconds[key], rss[key] = run.seconds, run.peak_rss
                    ratio = ""
                    if mode == "streaming" and (name, "in memory", size) in seconds:
                        ratio = f"{run.seconds / seconds[name, 'in memory', size]:.2f}x"
                    rows.append(
                        f"| {decisions / 1e6:,.0f} M | {name} | {mode} | {run.seconds:.1f} "
                        f"| {decisions / run.seconds / 1e6:.1f} "
                        f"| {run.peak_rss / 2**20:,.0f} MiB | {ratio} |"
                    )
                    print(rows[-1], flush=True)

    missed = []
    smallest, largest = sizes[0], sizes[-1]
    for name in COMMANDS:
        for mode in ("in memory", "streaming"):
            if (
                largest > smallest
                and (name, mode, smallest) in seconds
                and ((name, mode, largest) in seconds)
            ):
                growth = (seconds[name, mode, largest] / largest) / (
                    seconds[name, mode, smallest] / smallest
                )
                if growth > TARGET_LINEAR:
                    missed.append(f"{name} {mode}: per-decision time x{growth:.2f} at the largest")
        for size in sizes:
            if rss.get((name, "streaming", size), 0) > TARGET_RSS:
                missed.append(f"{name} streaming at {size_label(size)}: peak RSS over 1.5 GB")
            both = (name, "streaming", size), (name, "in memory", size)
            if all(k in seconds for k in both):
                ratio = seconds[both[0]] / seconds[both[1]]
                if ratio > TARGET_STREAMING:
                    missed.append(f"{name} at {size_label(size)}: streaming {ratio:.2f}x slower")

    workload = (
        f"{N_LAYERS} layers x top-{TOP_K} of {N_EXPERTS} experts (uint16), zipf {ZIPF}, "
        f"locality {LOCALITY}, {TOKENS_PER_REQUEST}-token requests, seed {SEED}, generator "
        f"v{GENERATOR_VERSION}; streaming chunk {args.chunk:,} tokens"
    )
    print(f"\nmoeprof at scale ({workload})\n")
    print(header)
    print("\n".join(rows))
    for note in notes:
        print(f"\nnote: {note}")
    print(
        "\ntargets: time linear in decisions (x<=1.5 per decision), streaming peak RSS <= 1.5 GB, "
        "streaming <= 1.3x in memory"
    )
    print("missed: " + ("; ".join(missed) if missed else "none"))
    print()
    print(markdown_table(("machine", ""), machine_rows({"workload": workload})))
    if failed or (args.strict and missed):
        sys.exit(1)


if __name__ == "__main__":
    main()
