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
    write_outputs,
)


def analyze_cmd(
    trace_path: Path = typer.Argument(..., metavar="TRACE", help="Trace file (.moe)."),
    batch_sizes: str = typer.Option(
        "1,2,4,8,16,32,64", "--batch-sizes", "-b", help="Comma-separated batch sizes."
    ),
    policy: str = typer.Option("tokens", "--policy", "-p", help=policy_help()),
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
    from moeprof.analyze import analyze
    from moeprof.batching import get_policy
    from moeprof.report.terminal import render_terminal
    from moeprof.trace import load_trace

    get_policy(policy)
    sizes = parse_batch_sizes(batch_sizes)
    _io.check_outputs([json_out, markdown_out, plot_out], force=force)
    trace = load_trace(trace_path)
    doc = analyze(trace, sizes, policy=policy).to_dict()
    doc["trace"]["path"] = str(trace_path)
    console.print(render_terminal(doc, layers=layers))
    write_outputs(doc, json_out=json_out, markdown_out=markdown_out, plot_out=plot_out)


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze_cmd)
