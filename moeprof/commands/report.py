"""`moeprof report`: render a results JSON (from analyze, cache, schedule or replay) or a sweep's
results.jsonl on the terminal, as markdown, as a plot."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import typer

from moeprof.commands._common import (
    MoeprofError,
    console,
    force_option,
    layers_option,
    markdown_option,
    note_written,
    plot_option,
    write_outputs,
)

curve_by_option = typer.Option(
    None,
    "--curve-by",
    help="Sweep results: the parameter whose values are the plot's curves, e.g. locality "
    "(default: the parameter with the largest effect on savings).",
)


def write_sweep_report(
    rows: Sequence[Mapping[str, Any]],
    *,
    markdown_out: Path | None,
    plot_out: Path | None,
    curve_by: str | None = None,
    plot_if_any: bool = False,
) -> list[Path]:
    """Summarise a sweep's rows, print the terminal summary and write the markdown report and
    the facet plot (all or nothing); returns the files written. `plot_if_any`: leave the plot
    out, instead of refusing, when no experiment succeeded (the sweep command's end)."""
    from moeprof import _io
    from moeprof.report.markdown import sweep_markdown
    from moeprof.report.plot import render_sweep_plot
    from moeprof.report.terminal import sweep_renderables
    from moeprof.sweep.summary import summarize_sweep

    summary = summarize_sweep(rows, curve_by)
    if plot_out is not None and plot_if_any and not summary.panels:
        plot_out = None
    outputs: list[tuple[Path, bytes, str]] = []
    if plot_out is not None:
        outputs.append((plot_out, render_sweep_plot(summary), "plot"))
    if markdown_out is not None:
        plot_name = None
        if plot_out is not None:
            plot_name = os.path.relpath(str(plot_out), str(markdown_out.parent))
        title = f"Sweep report — {', '.join(summary.sweeps) or 'sweep'}"
        text = sweep_markdown(summary, title=title, plot_name=plot_name)
        outputs.insert(0, (markdown_out, text.encode(), "markdown report"))
    console.print(sweep_renderables(summary))
    _io.write_all([(path, data) for path, data, _ in outputs])
    for path, _, what in outputs:
        note_written(path, what)
    return [path for path, _, _ in outputs]


def report_cmd(
    results_path: Path = typer.Argument(
        ...,
        metavar="RESULTS",
        help="Results JSON, or a sweep's results.jsonl (or the sweep's folder).",
    ),
    markdown_out: Path | None = markdown_option,
    plot_out: Path | None = plot_option,
    layers: bool = layers_option,
    curve_by: str | None = curve_by_option,
    force: bool = force_option,
) -> None:
    """Show the summary and savings tables of a results file; optionally write markdown and PNG.

    A sweep's results.jsonl (or its folder) gets the sweep report; --curve-by sets the curves.
    """
    from moeprof import _io
    from moeprof.report.results import is_sweep_rows_path, load_results, load_sweep_rows
    from moeprof.report.terminal import render_terminal

    _io.check_outputs([markdown_out, plot_out], force=force)
    if is_sweep_rows_path(results_path):
        if layers:
            raise MoeprofError("--layers applies to a results JSON, not to a sweep's rows")
        rows = load_sweep_rows(results_path)
        write_sweep_report(rows, markdown_out=markdown_out, plot_out=plot_out, curve_by=curve_by)
        return
    if curve_by is not None:
        raise MoeprofError("--curve-by applies to a sweep's results.jsonl, not to a results JSON")
    doc = load_results(results_path)
    console.print(render_terminal(doc, layers=layers))
    write_outputs(doc, json_out=None, markdown_out=markdown_out, plot_out=plot_out)


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
