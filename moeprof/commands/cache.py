"""`moeprof cache`: what an expert cache would save on a trace, per strategy, capacity and batch
size, against dedup and the Belady bound (docs/cache.md)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict
from pathlib import Path

import typer

from moeprof.batching import policy_help
from moeprof.commands._common import (
    MoeprofError,
    console,
    err_console,
    force_option,
    layers_option,
    markdown_option,
    parse_batch_sizes,
    parse_names,
    progress_bar,
    write_outputs,
)
from moeprof.commands.analyze import (
    TRACE_HELP,
    check_executor_options,
    executor_option,
    ray_address_option,
    trace_label,
    workers_option,
)

# Decimal and binary units of --gpu-memory, by lower-cased name; a plain number is bytes.
MEMORY_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_MEMORY = re.compile(r"([0-9]{1,15}(?:\.[0-9]{1,9})?)\s*([A-Za-z]*)")


def parse_memory(text: str) -> int:
    """`--gpu-memory` text ('24GiB', '80 GB', '1073741824') -> bytes; else a MoeprofError."""
    match = _MEMORY.fullmatch(text.strip())
    unit = match.group(2).lower() if match else ""
    if match is None or (unit and unit not in MEMORY_UNITS):
        raise MoeprofError(
            f"--gpu-memory {text!r} is not a memory size: a number with one of the units B, KiB, "
            "MiB, GiB, TiB, KB, MB, GB, TB (a plain number is bytes)"
        )
    size = int(float(match.group(1)) * MEMORY_UNITS[unit or "b"])
    if size <= 0:
        raise MoeprofError(f"--gpu-memory {text!r} must be more than 0 bytes")
    return size


def parse_capacities(text: str, top_k: int, n_experts: int) -> dict[int, str]:
    """`--cache-experts` text -> {C: how it was spelled}: whole numbers ('4'), multiples of top-k
    ('2k' = 2 * top_k) and shares of a layer's experts ('25%' = floor(0.25 * n_experts)).
    Spellings that give the same C are joined ('2k = 4')."""
    from moeprof.cache import capacity_from_spelling

    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise MoeprofError("no --cache-experts given")
    out: dict[int, str] = {}
    for item in items:
        value = capacity_from_spelling(item, top_k, n_experts)
        out[value] = item if value not in out else f"{out[value]} = {item}"
    return out


def cache_cmd(
    trace_paths: list[Path] = typer.Argument(..., metavar="TRACE...", help=TRACE_HELP),
    strategies: str = typer.Option(
        "lru,lfu,static,belady",
        "--strategies",
        "-s",
        help="Comma-separated: the caching strategies (lru, lfu, static, belady, ...) and the "
        "references naive and dedup.",
    ),
    cache_experts: str = typer.Option(
        "0,1k,2k,4k",
        "--cache-experts",
        "-C",
        help="Experts retained per layer between batches, comma-separated: whole numbers "
        "(4), multiples of top-k (2k) or shares of the layer's experts (25%).",
    ),
    batch_sizes: str = typer.Option(
        "1,8", "--batch-sizes", "-b", help="Comma-separated batch sizes."
    ),
    policy: str = typer.Option("decode", "--policy", "-p", help=policy_help()),
    budget: str = typer.Option(
        "per-layer",
        "--budget",
        help="per-layer: each layer retains its own C experts; global: one pool of the same "
        "memory (C x layers experts, or their bytes) shared by all layers (always simulated in "
        "memory).",
    ),
    count: str = typer.Option(
        "batch",
        "--count",
        help="batch: a load per distinct expert of a batch; access: per request (no dedup "
        "inside a batch; batch size 1 gives token-level numbers).",
    ),
    warm: bool = typer.Option(
        False, "--warm", help="Start with a warm cache: first uses are not loads."
    ),
    phase: str = typer.Option("all", "--phase", help="Rows to simulate: all, decode or prefill."),
    gpu_memory: str | None = typer.Option(
        None,
        "--gpu-memory",
        help="Device memory for experts (24GiB, 80GB, bytes): adds the C it holds per layer "
        "beside the widest batch's working set.",
    ),
    link_gbps: float | None = typer.Option(
        None,
        "--link-gbps",
        help="Project link seconds per token and decode tokens/s at this many GB/s.",
    ),
    popularity_from: Path | None = typer.Option(
        None,
        "--popularity-from",
        help="static's profile: the most requested experts of this other trace.",
    ),
    prefetch: str | None = typer.Option(
        None,
        "--prefetch",
        help="Also score prefetch predictors, comma-separated: prev-token, prev-layer, popular "
        "(docs/prefetch.md), against each caching strategy and capacity.",
    ),
    prefetch_experts: int | None = typer.Option(
        None,
        "--prefetch-experts",
        help="Experts each predictor may prefetch per batch and layer (default: top-k).",
    ),
    train: Path | None = typer.Option(
        None,
        "--train",
        help="Learn prev-layer's co-activations and popular's list on this trace (default: "
        "the first half of the batches, scoring the second half).",
    ),
    chunk_tokens: int | None = typer.Option(
        None,
        "--chunk-tokens",
        help="N > 0: stream, reading one layer's expert ids at a time (the per-layer budget; "
        "--budget global and --prefetch stay in memory); 0 = the whole trace in memory. "
        "Default: in memory when its bitsets take at most 256 MiB. Results are identical.",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results JSON here."),
    markdown_out: Path | None = markdown_option,
    plot_out: Path | None = typer.Option(
        None, "--plot", help="Write a PNG plot of hit rate and bytes per token here."
    ),
    layers: bool = layers_option,
    force: bool = force_option,
    executor: str | None = executor_option(
        "One task per MoE layer (per-layer budget only, without --prefetch)."
    ),
    workers: int | None = workers_option,
    ray_address: str | None = ray_address_option,
) -> None:
    """Simulate expert caches on a trace: loads, hit rates and bytes per token of each
    strategy and capacity, and the gap to the Belady bound.

    Example: moeprof cache demo.moe --cache-experts 0,1k,2k,4k --batch-sizes 1,8 --json cache.json
    """
    from moeprof import _io
    from moeprof.batching import get_policy
    from moeprof.cache import (
        BUDGETS,
        COUNTS,
        PHASES,
        cache_strategies,
        capacity_for_memory,
        select_phase,
        simulate_cache,
    )
    from moeprof.prefetch import check_predictors, score_prefetch
    from moeprof.report.terminal import render_terminal
    from moeprof.shards import open_shards
    from moeprof.strategies import REGISTRY
    from moeprof.stream import check_chunk_tokens, default_chunk_tokens
    from moeprof.trace import load_trace

    get_policy(policy)
    sizes = parse_batch_sizes(batch_sizes)
    chosen = cache_strategies(parse_names(strategies))
    for flag, value, allowed in (
        ("--budget", budget, BUDGETS),
        ("--count", count, COUNTS),
        ("--phase", phase, PHASES),
    ):
        if value not in allowed:
            raise MoeprofError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    predictors = None if prefetch is None else check_predictors(parse_names(prefetch))
    if predictors is None and (prefetch_experts is not None or train is not None):
        raise MoeprofError("--prefetch-experts and --train go with --prefetch")
    if predictors is not None and (budget != "per-layer" or warm or count != "batch"):
        raise MoeprofError(
            "--prefetch scores per-layer caches counted per batch from a cold start: leave out "
            "--budget global, --warm and --count access"
        )
    memory = None if gpu_memory is None else parse_memory(gpu_memory)
    if link_gbps is not None and not (math.isfinite(link_gbps) and link_gbps > 0):
        raise MoeprofError(f"--link-gbps must be a positive number, got {link_gbps}")
    if chunk_tokens is not None:
        check_chunk_tokens(chunk_tokens)
    check_executor_options(executor, workers, ray_address)
    if executor is not None and (budget != "per-layer" or predictors is not None):
        raise MoeprofError(
            "--executor runs one task per MoE layer under the per-layer budget: --budget global "
            "(one pool over every layer) and --prefetch run in this process, without --executor"
        )
    _io.check_outputs([json_out, markdown_out, plot_out], force=force)
    shards = open_shards(trace_paths)
    chunk = (
        default_chunk_tokens(shards.n_tokens, shards.n_layers, shards.n_experts)
        if chunk_tokens is None
        else chunk_tokens
    )
    # An executor reads layers on the workers: the driver only plans, like a streamed run.
    stream = (chunk > 0 or executor is not None) and budget == "per-layer"
    trace = shards if stream else shards.to_trace()
    profile = None if popularity_from is None else load_trace(popularity_from)
    train_trace = None if train is None else load_trace(train)
    capacities = parse_capacities(cache_experts, trace.top_k, int(trace.n_experts.min()))
    fit = None
    if memory is not None:
        if not bool((trace.expert_bytes > 0).all()):
            raise MoeprofError(
                "--gpu-memory needs the trace's expert sizes, and it does not record them "
                "(import it with --expert-bytes)"
            )
        fit = capacity_for_memory(trace, memory, sizes, policy, phase=phase)
        c = fit.cache_experts
        spelled = gpu_memory.strip() if gpu_memory else str(c)
        capacities[c] = f"{capacities[c]} = {spelled}" if c in capacities else spelled
    if executor is not None:
        from moeprof.distribute import cache_sharded
        from moeprof.executors import get_executor

        with (
            get_executor(executor, workers=workers, address=ray_address) as runner,
            progress_bar(
                f"cache ({executor}, one task per layer)", unit="layers", eta=True
            ) as update,
        ):
            result = cache_sharded(
                shards,
                chosen,
                sorted(capacities),
                sizes,
                policy,
                runner,
                count=count,
                warm=warm,
                phase=phase,
                popularity_from=profile,
                capacity_spellings=capacities,
                link_gbps=link_gbps,
                on_progress=update,
            )
    else:
        how = "cache (streaming, one layer at a time)" if stream else "cache (in memory)"
        with progress_bar(how, unit="simulations") as update:
            result = simulate_cache(
                trace,
                chosen,
                sorted(capacities),
                sizes,
                policy,
                budget=budget,
                count=count,
                warm=warm,
                phase=phase,
                popularity_from=profile,
                capacity_unit="bytes"
                if budget == "global" and bool((trace.expert_bytes > 0).all())
                else "experts",
                capacity_spellings=capacities,
                link_gbps=link_gbps,
                on_progress=lambda done, total: update(done, total),
                stream=stream,
            )
    doc = result.to_dict()
    if predictors is not None:
        with err_console.status("scoring prefetch..."):
            in_memory = shards.to_trace()  # prefetch scoring needs the whole trace
            scored = score_prefetch(
                select_phase(in_memory, phase),
                predictors,
                in_memory.top_k if prefetch_experts is None else prefetch_experts,
                batch_sizes=sizes,
                policy=policy,
                train=None if train_trace is None else select_phase(train_trace, phase),
                strategies=[s for s in chosen if REGISTRY[s].uses_cache],
                cache_experts=sorted(capacities),
                popularity_from=profile,
            )
        doc["prefetch"] = scored.to_dict()
        if train is not None:
            doc["prefetch"]["train"] = str(train)
    doc["trace"]["path"] = trace_label(trace_paths)
    if popularity_from is not None:
        doc["cache"]["popularity_from"] = str(popularity_from)
    if fit is not None:
        doc["cache"]["gpu_memory"] = {"spelling": gpu_memory, **asdict(fit)}
    console.print(render_terminal(doc, layers=layers))
    write_outputs(
        doc,
        json_out=json_out,
        markdown_out=markdown_out,
        plot_out=plot_out,
        title="moeprof cache report",
    )


def register(app: typer.Typer) -> None:
    app.command("cache")(cache_cmd)
