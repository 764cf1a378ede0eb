"""`moeprof analyze`: dedup savings by batch size, per layer, under a batching policy."""

from __future__ import annotations

from pathlib import Path

import typer

from moeprof.batching import policy_help
from moeprof.commands._common import (
    console,
    force_option,
    layers_option,
    markdown_option,
    parse_batch_sizes,
    plot_option,
    progress_bar,
    write_outputs,
)

TRACE_HELP = (
    "Trace file (.moe); several files, a folder of them or a quoted glob ('run-*.moe') are "
    "read as one trace, shard after shard."
)
CHUNK_HELP = (
    "Stream the trace N tokens at a time (memory bounded by the chunk); 0 = the whole trace in "
    "memory. Default: in memory when its bitsets take at most 256 MiB, else chunks of about "
    "64 MiB of bitsets. Results are identical either way."
)


def trace_label(paths: list[Path]) -> str:
    """The results' trace path: the argument as given (several joined by spaces)."""
    return " ".join(str(p) for p in paths)


def analyze_cmd(
    trace_paths: list[Path] = typer.Argument(..., metavar="TRACE...", help=TRACE_HELP),
    batch_sizes: str = typer.Option(
        "1,2,4,8,16,32,64", "--batch-sizes", "-b", help="Comma-separated batch sizes."
    ),
    policy: str = typer.Option("tokens", "--policy", "-p", help=policy_help()),
    chunk_tokens: int | None = typer.Option(None, "--chunk-tokens", help=CHUNK_HELP),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results JSON here."),
    markdown_out: Path | None = markdown_option,
    plot_out: Path | None = plot_option,
    layers: bool = layers_option,
    force: bool = force_option,
) -> None:
    """Count per-batch expert loads with and without deduplication, for each batch size.

    Example: moeprof analyze traces/demo.moe --batch-sizes 1,8,64 --json out.json
    """
    from moeprof import _io
    from moeprof.batching import get_policy
    from moeprof.report.terminal import render_terminal
    from moeprof.shards import open_shards
    from moeprof.stream import analyze_stream, check_chunk_tokens, default_chunk_tokens, streams

    get_policy(policy)
    sizes = parse_batch_sizes(batch_sizes)
    if chunk_tokens is not None:
        check_chunk_tokens(chunk_tokens)
    _io.check_outputs([json_out, markdown_out, plot_out], force=force)
    shards = open_shards(trace_paths)
    chunk = (
        default_chunk_tokens(shards.n_tokens, shards.n_layers, shards.n_experts)
        if chunk_tokens is None
        else chunk_tokens
    )
    how = (
        f"analyze (streaming, {chunk:,} tokens a chunk)"
        if chunk and streams(shards)
        else "analyze (in memory)"
    )
    with progress_bar(how, unit="tokens") as update:
        result = analyze_stream(
            shards, sizes, policy, chunk, on_progress=lambda done, total: update(done, total)
        )
    doc = result.to_dict()
    doc["trace"]["path"] = trace_label(trace_paths)
    console.print(render_terminal(doc, layers=layers))
    write_outputs(doc, json_out=json_out, markdown_out=markdown_out, plot_out=plot_out)


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze_cmd)
