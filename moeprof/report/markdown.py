"""All markdown: the analysis report and its replay section, the cache and schedule reports, and
the sweep report, as text.

Rows come from :mod:`moeprof.report.rows` (a sweep's from :mod:`moeprof.sweep.summary`), the
same the terminal view shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from moeprof.report.rows import (
    batch_table_rows,
    build_report,
    cache_batch_sizes,
    cache_gap_rows,
    cache_notes,
    cache_recommendations,
    cache_summary_items,
    cache_table_rows,
    cache_working_set_rows,
    has_replay,
    is_cache,
    is_schedule,
    latency_rows,
    layer_table_rows,
    prefetch_notes,
    prefetch_rows,
    replay_notes,
    replay_rows,
    schedule_batch_sizes,
    schedule_findings,
    schedule_notes,
    schedule_summary_items,
    schedule_table_rows,
    schedule_timing_rows,
    summary_items,
)

if TYPE_CHECKING:  # the sweep's summary loads only when a sweep is rendered
    from moeprof.sweep.summary import SummaryTable, SweepSummary


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A GitHub-flavoured table; `align` holds one of 'l'/'r' per column (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _replay_align(header: Sequence[str]) -> str:
    return "ll" + "r" * (len(header) - 2)  # batch (or capacity) and strategy left, numbers right


def replay_markdown(doc: dict[str, Any]) -> str:
    """The "## Replay (measured)" section of a markdown report ("" without replay data)."""
    if not has_replay(doc):
        return ""
    header, rows = replay_rows(doc)
    parts = ["## Replay (measured)", ""]
    parts += [f"- {n}" for n in replay_notes(doc)]
    parts += ["", md_table(header, rows, align=_replay_align(header)), ""]
    lat_header, lat_rows = latency_rows(doc)
    if lat_rows:
        parts += [
            "### Per-batch latency (copies overlapped with expert FFN compute)",
            "",
            md_table(lat_header, lat_rows, align=_replay_align(lat_header)),
            "",
        ]
    return "\n".join(parts)


def cache_markdown(doc: dict[str, Any], title: str) -> str:
    """The report of a `moeprof cache` document (kind "cache")."""
    parts = [f"# {title}", "", "## Summary", ""]
    parts += [f"- **{k}:** {v}" for k, v in cache_summary_items(doc)]
    for b in cache_batch_sizes(doc):
        header, rows = cache_table_rows(doc, b)
        parts += ["", f"## Batch size {b}", "", md_table(header, rows, align=_replay_align(header))]
        gap_header, gap_rows = cache_gap_rows(doc, b)
        if gap_rows:
            parts += [
                "",
                f"### Belady − LRU gap, batch size {b}",
                "",
                md_table(gap_header, gap_rows, align="rrrrrl"),
            ]
    ws_header, ws_rows = cache_working_set_rows(doc)
    if ws_rows:
        parts += [
            "",
            "## Working set per batch (distinct experts: mean / p95 / max)",
            "",
            md_table(ws_header, ws_rows),
        ]
    pf_header, pf_rows = prefetch_rows(doc)
    if pf_rows:
        parts += ["", "## Prefetch", "", md_table(pf_header, pf_rows, align="lllrrrr")]
    parts += ["", "## Recommendations", ""]
    parts += [f"{i}. {text}" for i, text in enumerate(cache_recommendations(doc), 1)]
    parts += ["", "## Definitions", ""]
    parts += [f"- {line}" for line in cache_notes(doc) + prefetch_notes(doc)]
    return "\n".join(parts) + "\n"


def render_markdown(doc: dict[str, Any], title: str = "moeprof report") -> str:
    """The whole report for one results dict (the results JSON)."""
    if is_cache(doc):
        return cache_markdown(doc, title)
    if is_schedule(doc):
        return schedule_markdown(doc, title)
    report = build_report(doc)
    parts = [f"# {title}", "", "## Executive Summary", ""]
    parts += [f"- **{k}:** {v}" for k, v in summary_items(report)]
    header, rows = batch_table_rows(report)
    parts += ["", "## Savings by Batch Size", "", md_table(header, rows), ""]
    parts += [
        "Memory savings count expert loads avoided; bandwidth savings weigh them by each layer's "
        "expert bytes. *Max Reuse Factor* is the best layer's 1 − unique/requests "
        '("layer 8": the model\'s layer 8; "L1": MoE layer 1 where the model\'s numbering is '
        "unknown). *Uniform Expectation* is the memory savings if every token picked its experts "
        "uniformly at random, for the same batches.",
        "",
        *[f"**Note:** {note}\n" for note in report.notes],
        "## Savings per Layer",
        "",
    ]
    header, rows = layer_table_rows(report)
    parts += [md_table(header, rows), ""]
    replay_section = replay_markdown(doc)
    if replay_section:
        parts += [replay_section.rstrip("\n"), ""]
    parts += ["## Recommendations", ""]
    parts += [f"{i}. {text}" for i, text in enumerate(report.recommendations, 1)]
    parts += ["", "## Technical Analysis", ""]
    parts += [f"- {line}" for line in report.technical]
    return "\n".join(parts) + "\n"


def schedule_markdown(doc: dict[str, Any], title: str) -> str:
    """The report of a `moeprof schedule` document (kind "schedule")."""
    parts = [f"# {title}", "", "## Summary", ""]
    parts += [f"- **{k}:** {v}" for k, v in schedule_summary_items(doc)]
    for b in schedule_batch_sizes(doc):
        header, rows = schedule_table_rows(doc, b)
        parts += ["", f"## B = {b} running requests", "", md_table(header, rows)]
    parts += ["", "## Findings", ""]
    parts += [f"{i}. {text}" for i, text in enumerate(schedule_findings(doc), 1)]
    t_header, t_rows = schedule_timing_rows(doc)
    parts += ["", "## Scheduling time", "", md_table(t_header, t_rows, align="llrrr")]
    parts += ["", "## Definitions", ""]
    parts += [f"- {line}" for line in schedule_notes(doc)]
    return "\n".join(parts) + "\n"


def _summary_table(table: SummaryTable, level: str = "###") -> list[str]:
    # A pipe inside a cell (an error message) would end the cell early.
    rows = [[cell.replace("|", "\\|") for cell in row] for row in table.rows]
    parts = [f"{level} {table.title}", "", md_table(table.header, rows, align=table.align), ""]
    if table.note:
        parts += [table.note, ""]
    return parts


def sweep_markdown(
    summary: SweepSummary, title: str = "Sweep report", plot_name: str | None = None
) -> str:
    """The report of a sweep's rows (`moeprof.sweep.summary`); `plot_name`: a PNG written beside
    it, shown under "Plots"."""
    from moeprof.sweep.summary import (
        DEFINITIONS,
        batch_size_table,
        executive_items,
        failure_table,
        pattern_tables,
        totals_items,
    )

    parts = [f"# {title}", "", "## Experiments", ""]
    parts += [f"- **{k}:** {v}" for k, v in totals_items(summary)]
    parts += ["", "## Executive Summary", ""]
    parts += [f"- **{k}:** {v}" for k, v in executive_items(summary)]
    parts += [""]
    if summary.by_batch_size:
        parts += _summary_table(batch_size_table(summary), "##")
    parts += ["## Observed Patterns", ""]
    tables = pattern_tables(summary)
    if not tables:
        parts += [
            "No parameter was swept with more than one value among the rows without error.",
            "",
        ]
    for table in tables:
        parts += _summary_table(table)
        analysis = table.title.split(":", 1)[0]
        parts += [f"- {p.sentence}" for p in summary.patterns if p.analysis == analysis]
        parts += [""]
    parts += ["## Recommendations", ""]
    parts += [f"{i}. {text}" for i, text in enumerate(summary.recommendations, 1)]
    if not summary.recommendations:
        parts += ["None: the rows hold no sweep of batch size, parameters or strategies."]
    parts += [""]
    if summary.tables:
        parts += ["## Per-analysis Tables", ""]
        for table in summary.tables:
            parts += _summary_table(table)
    if summary.failures:
        parts += _summary_table(failure_table(summary), "##")
    if plot_name is not None and summary.panels:
        by = summary.panels[0].curve_by
        parts += [
            "## Plots",
            "",
            f"![headline metric against batch size, one curve per {by or 'sweep'}]({plot_name})",
            "",
        ]
    parts += ["## Definitions", ""]
    parts += [f"- {line}" for line in DEFINITIONS]
    return "\n".join(parts) + "\n"
