"""`moeprof analyze`: dedup savings by batch size, per layer, under a batching policy."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from moeprof.commands._common import (
    console,
    force_option,
    layers_option,
    markdown_option,
    note_written,
    plot_option,
)


def write_outputs(
    doc: dict,
    *,
    json_out: Path | None,
    markdown_out: Path | None,
    plot_out: Path | None,
    title: str = "moeprof report",
) -> None:
    """Render every output, write them all to temporary files, then rename them all: an error
    while producing any one of them leaves none written (and none overwritten)."""
    from moeprof import _io
    from moeprof.report.markdown import render_markdown

    rendered: list[tuple[Path, bytes, str]] = []
    if json_out is not None:
        rendered.append((json_out, (json.dumps(doc, indent=2) + "\n").encode(), "results JSON"))
    if markdown_out is not None:
        rendered.append(
            (markdown_out, render_markdown(doc, title=title).encode(), "markdown report")
        )
    if plot_out is not None:
        from moeprof.report.plot import render_plot

        rendered.append((plot_out, render_plot(doc), "plot"))
    _io.write_all([(path, data) for path, data, _ in rendered])
    for path, _, what in rendered:
        note_written(path, what)


def register(app: typer.Typer) -> None:
    @app.command("analyze")
    def analyze_cmd(
        trace_path: Path = typer.Argument(..., metavar="TRACE", help="Trace file (.moe)."),
        batch_sizes: str = typer.Option(
            "1,2,4,8,16,32,64", "--batch-sizes", "-b", help="Comma-separated batch sizes."
        ),
        policy: str = typer.Option(
            "tokens",
            "--policy",
            "-p",
            help="How tokens form batches: tokens (consecutive rows), decode (continuous "
            "batching, B slots), recorded (the steps the model really ran).",
        ),
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
        from moeprof.analyze import analyze, parse_batch_sizes
        from moeprof.policies import check_policy
        from moeprof.report.terminal import render_terminal
        from moeprof.trace import load_trace

        check_policy(policy)
        sizes = parse_batch_sizes(batch_sizes)
        _io.check_outputs([json_out, markdown_out, plot_out], force=force)
        trace = load_trace(trace_path)
        doc = analyze(trace, sizes, policy=policy).to_dict()
        doc["trace"]["path"] = str(trace_path)
        console.print(render_terminal(doc, layers=layers))
        write_outputs(doc, json_out=json_out, markdown_out=markdown_out, plot_out=plot_out)
