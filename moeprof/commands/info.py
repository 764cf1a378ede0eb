"""`moeprof info`: what a trace holds."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from moeprof.commands._common import console, err_console, traces_argument


def info_cmd(
    trace_paths: list[Path] = traces_argument,
    as_json: bool = typer.Option(False, "--json", help="Print the metadata as JSON."),
) -> None:
    """Show a trace's shape, model, source and metadata."""
    from moeprof.analyze import trace_summary
    from moeprof.shards import Shards, shard_paths
    from moeprof.trace import describe_warmup, warmup_tokens

    paths = shard_paths(trace_paths)
    trace = Shards(paths).to_trace()
    warmup = warmup_tokens(trace.expert_ids)
    if warmup.any():
        err_console.print(
            f"[yellow]warning:[/yellow] {describe_warmup(warmup)}; "
            "'moeprof import --drop-warmup' removes them",
            highlight=False,
        )
    doc = trace_summary(trace)
    doc["file_bytes"] = sum(p.stat().st_size for p in paths)
    if as_json:
        console.print_json(json.dumps(doc))
        return
    from moeprof.report.rows import trace_info_items
    from moeprof.report.terminal import kv_table

    title = str(paths[0]) if len(paths) == 1 else f"{len(paths)} shards: {paths[0]} ..."
    console.print(kv_table(title, trace_info_items(trace, doc)))


def register(app: typer.Typer) -> None:
    app.command("info")(info_cmd)
