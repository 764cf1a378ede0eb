"""`moeprof schedule`: serve a trace's requests under several admission policies (FIFO, random,
expert affinity, the oracle, offline grouping) and compare expert loads and waiting times
(docs/schedule.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from moeprof.commands._common import (
    console,
    force_option,
    markdown_option,
    parse_batch_sizes,
    parse_names,
    progress_bar,
    write_outputs,
)
from moeprof.commands.analyze import TRACE_HELP, trace_label


def schedule_cmd(
    trace_paths: list[Path] = typer.Argument(..., metavar="TRACE...", help=TRACE_HELP),
    batch_sizes: str = typer.Option(
        "8,32", "--batch-sizes", "-b", help="Comma-separated B: requests running at once."
    ),
    admission: str = typer.Option(
        "fifo,random,affinity,oracle",
        "--admission",
        "-a",
        help="Comma-separated admission policies: fifo, random, affinity (by prompt routing), "
        "oracle (by the whole routing: a bound), group and group-oracle (offline grouping of "
        "the pool). FIFO always runs: the others are compared with it.",
    ),
    max_tokens_per_step: int = typer.Option(
        2048,
        "--max-tokens-per-step",
        help="Token budget per step (vLLM's max_num_batched_tokens): decode tokens first, "
        "then prompt chunks.",
    ),
    max_wait: int | None = typer.Option(
        None,
        "--max-wait",
        help="A request that has waited this many steps is admitted next (0 = FIFO).",
    ),
    arrival_rate: float | None = typer.Option(
        None,
        "--arrival-rate",
        help="Poisson arrivals, requests per step (default: all requests wait at step 0).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the arrivals and of random admission."),
    cache: str | None = typer.Option(
        None,
        "--cache",
        help="Also count loads with an expert cache, STRATEGY:EXPERTS per layer (lru:8).",
    ),
    chunk_tokens: int | None = typer.Option(
        None,
        "--chunk-tokens",
        help="N > 0: stream, reading one layer's expert ids at a time (signatures, loads, "
        "cache); 0 = the whole trace in memory. Default: in memory when its bitsets take at "
        "most 256 MiB. Results are identical.",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results JSON here."),
    markdown_out: Path | None = markdown_option,
    plot_out: Path | None = typer.Option(
        None, "--plot", help="Write a PNG of load reduction against added waiting time here."
    ),
    force: bool = force_option,
) -> None:
    """Simulate continuous batching with chunked prefill under admission policies: expert loads
    per generated token, reduction against FIFO, waiting time per request.

    Example: moeprof schedule demo.moe --batch-sizes 8,32 --admission fifo,affinity,oracle
    """
    from moeprof import _io
    from moeprof.batching.serve import (
        check_arrival_rate,
        check_max_tokens_per_step,
        check_max_wait,
    )
    from moeprof.report.terminal import render_terminal
    from moeprof.schedule import check_admissions, parse_cache, schedule
    from moeprof.shards import open_shards
    from moeprof.stream import check_chunk_tokens, default_chunk_tokens

    sizes = parse_batch_sizes(batch_sizes)
    chosen = check_admissions(parse_names(admission))
    check_max_tokens_per_step(max_tokens_per_step)
    check_max_wait(max_wait)
    check_arrival_rate(arrival_rate)
    cached = None if cache is None else parse_cache(cache)
    if chunk_tokens is not None:
        check_chunk_tokens(chunk_tokens)
    _io.check_outputs([json_out, markdown_out, plot_out], force=force)
    shards = open_shards(trace_paths)
    chunk = (
        default_chunk_tokens(shards.n_tokens, shards.n_layers, shards.n_experts)
        if chunk_tokens is None
        else chunk_tokens
    )
    how = "schedule (streaming, one layer at a time)" if chunk else "schedule (in memory)"
    with progress_bar(how, unit="runs") as update:
        result = schedule(
            shards if chunk else shards.to_trace(),
            sizes,
            chosen,
            max_tokens_per_step=max_tokens_per_step,
            max_wait=max_wait,
            arrival_rate=arrival_rate,
            seed=seed,
            cache=cached,
            on_progress=lambda done, total: update(done, total),
        )
    doc = result.to_dict()
    doc["trace"]["path"] = trace_label(trace_paths)
    console.print(render_terminal(doc))
    write_outputs(
        doc,
        json_out=json_out,
        markdown_out=markdown_out,
        plot_out=plot_out,
        title="moeprof schedule report",
    )


def register(app: typer.Typer) -> None:
    app.command("schedule")(schedule_cmd)
