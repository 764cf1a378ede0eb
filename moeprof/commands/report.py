"""`moeprof report`: render a results JSON (from analyze or replay) on the terminal, as markdown, as a plot."""

from __future__ import annotations

from pathlib import Path

import typer

from moeprof.commands._common import (
    console,
    force_option,
    layers_option,
    markdown_option,
    plot_option,
    write_outputs,
)


def report_cmd(
    results_path: Path = typer.Argument(..., metavar="RESULTS.json", help="Results JSON."),
    markdown_out: Path | None = markdown_option,
    plot_out: Path | None = plot_option,
    layers: bool = layers_option,
    force: bool = force_option,
) -> None:
    """Show the summary and savings tables of a results file; optionally write markdown and PNG."""
    from moeprof import _io
    from moeprof.report.results import load_results
    from moeprof.report.terminal import render_terminal

    _io.check_outputs([markdown_out, plot_out], force=force)
    doc = load_results(results_path)
    console.print(render_terminal(doc, layers=layers))
    write_outputs(doc, json_out=None, markdown_out=markdown_out, plot_out=plot_out)


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
