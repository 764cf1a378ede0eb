"""`moeprof analyze`: dedup savings by batch size, per layer, under a batching policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
from moeprof.errors import MoeprofError
from moeprof.executors import EXECUTORS, executor_help

TRACE_HELP = (
    "Trace file (.moe); several files, a folder of them or a quoted glob ('run-*.moe') are "
    "read as one trace, shard after shard."
)
CHUNK_HELP = (
    "Stream the trace N tokens at a time (memory bounded by the chunk); 0 = the whole trace in "
    "memory. Default: in memory when its bitsets take at most 256 MiB, else chunks of about "
    "64 MiB of bitsets. Results are identical either way."
)


def executor_option(tasks: str) -> Any:
    """--executor, its help saying what the tasks are (`tasks`: a sentence)."""
    return typer.Option(
        None,
        "--executor",
        "-e",
        help=f"{executor_help()} {tasks} Every worker reads the shard files by path: on a "
        "cluster, the same path on every node. Default: this process.",
        metavar="|".join(EXECUTORS),
    )


workers_option = typer.Option(
    None,
    "--workers",
    "-w",
    help="Tasks run at once with --executor (default: every core; with --ray-address, every "
    "CPU of the cluster).",
)
ray_address_option = typer.Option(
    None,
    "--ray-address",
    metavar="ADDR",
    help="A running Ray cluster (HOST:6379, or auto) for --executor ray; default: a local Ray "
    "runtime.",
)


def check_executor_options(executor: str | None, workers: int | None, address: str | None) -> None:
    """--executor, --workers and --ray-address, checked before anything is read: an unknown
    executor or Ray not installed is one line, not a failure after the trace is loaded."""
    from moeprof.executors import check_executor

    if executor is not None:
        check_executor(executor)
    if address is not None and executor != "ray":
        raise MoeprofError("--ray-address is only for --executor ray")
    if workers is not None:
        if executor is None:
            raise MoeprofError("--workers goes with --executor (local or ray)")
        if workers < 1:
            raise MoeprofError(f"--workers must be 1 or more, got {workers}")


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
    executor: str | None = executor_option(
        "One task per shard file; the driver merges their counts."
    ),
    workers: int | None = workers_option,
    ray_address: str | None = ray_address_option,
) -> None:
    """Count per-batch expert loads with and without deduplication, for each batch size.

    Example: moeprof analyze traces/demo.moe --batch-sizes 1,8,64 --json out.json

    On a Ray cluster: moeprof analyze /shared/dumps/ --policy decode --executor ray
    --ray-address HOST:6379
    """
    from moeprof import _io
    from moeprof.batching import get_policy
    from moeprof.shards import open_shards
    from moeprof.stream import analyze_stream, check_chunk_tokens, default_chunk_tokens, streams

    get_policy(policy)
    sizes = parse_batch_sizes(batch_sizes)
    if chunk_tokens is not None:
        check_chunk_tokens(chunk_tokens)
    check_executor_options(executor, workers, ray_address)
    _io.check_outputs([json_out, markdown_out, plot_out], force=force)
    shards = open_shards(trace_paths)
    if executor is not None:
        from moeprof.distribute import analyze_sharded
        from moeprof.executors import get_executor

        with (
            get_executor(executor, workers=workers, address=ray_address) as runner,
            progress_bar(
                f"analyze ({executor}, one task per shard)", unit="tasks", eta=True
            ) as update,
        ):
            result = analyze_sharded(
                shards, sizes, policy, runner, chunk_tokens=chunk_tokens, on_progress=update
            )
        _show(result.to_dict(), trace_paths, layers, json_out, markdown_out, plot_out)
        return
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
    _show(result.to_dict(), trace_paths, layers, json_out, markdown_out, plot_out)


def _show(
    doc: dict[str, Any],
    trace_paths: list[Path],
    layers: bool,
    json_out: Path | None,
    markdown_out: Path | None,
    plot_out: Path | None,
) -> None:
    from moeprof.report.terminal import render_terminal

    doc["trace"]["path"] = trace_label(trace_paths)
    console.print(render_terminal(doc, layers=layers))
    write_outputs(doc, json_out=json_out, markdown_out=markdown_out, plot_out=plot_out)


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze_cmd)
