"""`moeprof export`: a trace as a long table (parquet or CSV) for pandas, Polars and DuckDB."""

from __future__ import annotations

from pathlib import Path

import typer

from moeprof.commands._common import (
    MoeprofError,
    force_option,
    note_written,
    progress_bar,
    traces_argument,
)


def export_cmd(
    trace_paths: list[Path] = traces_argument,
    output: Path = typer.Option(..., "--output", "-o", help="Table to write."),
    fmt: str = typer.Option("parquet", "--format", "-F", help="parquet or csv."),
    force: bool = force_option,
) -> None:
    """Write one row per token x MoE layer: request, position, step, phase, layer, experts.

    Example: moeprof export traces/demo.moe --format parquet -o demo.parquet
    """
    from moeprof import _io
    from moeprof.export import EXPORT_FORMATS, export_trace
    from moeprof.shards import load_traces

    if fmt not in EXPORT_FORMATS:
        raise MoeprofError(
            f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}"
        )
    _io.check_outputs([output], force=force)
    trace = load_traces(trace_paths)
    with progress_bar("exporting") as progress:
        rows = export_trace(trace, output, fmt, progress=progress)
    note_written(output, f"{fmt} table ({rows:,} rows)")


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
