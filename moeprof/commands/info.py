"""`moeprof info`: what a trace holds."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from moeprof.commands._common import console, err_console


def info_cmd(
    trace_path: Path = typer.Argument(..., metavar="TRACE", help="Trace file."),
    as_json: bool = typer.Option(False, "--json", help="Print the metadata as JSON."),
) -> None:
    """Show a trace's shape, model, source and metadata."""
    from moeprof.analyze import trace_summary
    from moeprof.trace import describe_warmup, load_trace, warmup_tokens

    trace = load_trace(trace_path)
    warmup = warmup_tokens(trace.expert_ids)
    if warmup.any():
        err_console.print(
            f"[yellow]warning:[/yellow] {describe_warmup(warmup)}; "
            "'moeprof import --drop-warmup' removes them",
            highlight=False,
        )
    doc = trace_summary(trace)
    doc["file_bytes"] = trace_path.stat().st_size
    if as_json:
        console.print_json(json.dumps(doc))
        return
    from moeprof.report.rows import trace_info_items
    from moeprof.report.terminal import kv_table

    console.print(kv_table(str(trace_path), trace_info_items(trace, doc)))


def register(app: typer.Typer) -> None:
    app.command("info")(info_cmd)
