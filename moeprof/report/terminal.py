"""The terminal view: rich tables built from the same rows as the markdown report."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table

from moeprof.report.markdown import batch_table_rows, layer_table_rows, summary_items
from moeprof.report.model import ReportModel, build_report
from moeprof.report.replay import replay_renderables

TERMINAL_HEADER = ["Batch", "Batches", "Memory", "Bandwidth", "Max reuse", "Saved", "Uniform"]


def _table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def summary_table(model: ReportModel) -> Table:
    table = Table(title="Executive Summary", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in summary_items(model):
        table.add_row(key, value)
    return table


def render_terminal(doc: dict[str, Any], *, layers: bool = False) -> Group:
    """Summary and savings-by-batch-size tables (and per-layer savings when `layers`)."""
    model = build_report(doc)
    _, rows = batch_table_rows(model)
    # Same columns as the markdown table, with headers short enough for an 80-column terminal.
    parts: list[Any] = [
        summary_table(model),
        _table("Savings by Batch Size", TERMINAL_HEADER, rows),
    ]
    if layers:
        header, rows = layer_table_rows(model)
        parts.append(_table("Savings per Layer", header, rows))
    parts += replay_renderables(doc)
    return Group(*parts)
