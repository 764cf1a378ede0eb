"""All rich output: the analysis and replay views of a results dict, a sweep's summary, trace and
record summaries, doctor's findings. Renderers return rich renderables and never print.

Every table comes from one of the helpers below, so all commands' tables look alike. Rows come
from :mod:`moeprof.report.rows`, the same the markdown report shows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Group
from rich.table import Table

from moeprof.report.rows import (
    ReportRows,
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
    summary_items,
)

if TYPE_CHECKING:  # the sweep's summary loads only when a sweep is rendered
    from moeprof.sweep.summary import SummaryTable, SweepSummary


# Same columns as the markdown table, with headers short enough for an 80-column terminal.
TERMINAL_HEADER = ["Batch", "Batches", "Memory", "Bandwidth", "Max reuse", "Saved", "Uniform"]
# The markdown replay table is too wide for a terminal: it is split in two with the same cells.
TERMINAL_COPY_COLUMNS = [
    "Batch",
    "Strategy",
    "Copies",
    "Bytes copied",
    "Seconds",
    "GB/s",
    "Share of peak",
]
TERMINAL_SAVINGS_COLUMNS = [
    "Batch",
    "Strategy",
    "NVML RX",
    "RX / counted",
    "Counted savings",
    "Measured savings",
    "Agree (±10%)",
]


# ---------------------------------------------------------------------- table helpers


def kv_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    """Key/value pairs without a header, keys in bold (cells may hold rich markup)."""
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def list_table(title: str, items: Iterable[str]) -> Table:
    """One boxed column without a header (cells may hold rich markup)."""
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column()
    for item in items:
        table.add_row(item)
    return table


def grid_table(
    title: str,
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    justify: str,
    *,
    no_wrap: bool = False,
) -> Table:
    """A table with a bold header; `justify` holds one of 'l'/'r' per column."""
    table = Table(title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD)
    for name, side in zip(header, justify, strict=True):
        table.add_column(name, justify="left" if side == "l" else "right", no_wrap=no_wrap)
    for row in rows:
        table.add_row(*row)
    return table


def _first_left(header: Sequence[str], n_left: int = 1) -> str:
    return "l" * n_left + "r" * (len(header) - n_left)


# ---------------------------------------------------------------------- results


def summary_table(report: ReportRows) -> Table:
    return kv_table("Executive Summary", summary_items(report))


def replay_renderables(doc: dict[str, Any]) -> list[Any]:
    """The replay part of a results dict ([] without replay data)."""
    if not has_replay(doc):
        return []
    from rich.markdown import Markdown

    header, rows = replay_rows(doc)
    out: list[Any] = []
    for title, columns in (
        ("Replay (measured): copies and link", TERMINAL_COPY_COLUMNS),
        ("Replay (measured): PCIe bytes and savings vs naive", TERMINAL_SAVINGS_COLUMNS),
    ):
        idx = [header.index(c) for c in columns]
        out.append(
            grid_table(
                title,
                [header[i] for i in idx],
                [[r[i] for i in idx] for r in rows],
                _first_left(columns, 2),
            )
        )
    lat_header, lat_rows = latency_rows(doc)
    if lat_rows:
        out.append(
            grid_table(
                "Per-batch latency (copies overlapped with compute)",
                lat_header,
                lat_rows,
                _first_left(lat_header, 2),
            )
        )
    out.append(Markdown("\n".join(f"- {n}" for n in replay_notes(doc))))
    return out


def cache_renderables(doc: dict[str, Any], *, layers: bool = False) -> list[Any]:
    """A `moeprof cache` document: summary, one table per batch size (capacity x strategy), the
    Belady − LRU gap, recommendations (and working sets per layer when `layers`)."""
    from rich.markdown import Markdown

    out: list[Any] = [kv_table("Expert cache simulation", cache_summary_items(doc))]
    for b in cache_batch_sizes(doc):
        # The link projection stays in the summary and the markdown: 80 columns hold 7.
        header, rows = cache_table_rows(doc, b, link=False)
        out.append(grid_table(f"Batch size {b}", header, rows, _first_left(header, 2)))
        gap_header, gap_rows = cache_gap_rows(doc, b)
        if gap_rows:
            out.append(
                grid_table(f"Belady − LRU gap, batch size {b}", gap_header, gap_rows, "rrrrrl")
            )
    if layers:
        ws_header, ws_rows = cache_working_set_rows(doc)
        out.append(
            grid_table(
                "Working set per batch (distinct experts: mean / p95 / max)",
                ws_header,
                ws_rows,
                _first_left(ws_header),
            )
        )
    pf_header, pf_rows = prefetch_rows(doc)
    if pf_rows:
        out.append(grid_table("Prefetch", pf_header, pf_rows, "lllrrrr"))
    out.append(list_table("Recommendations", cache_recommendations(doc)))
    out.append(Markdown("\n".join(f"- {n}" for n in cache_notes(doc) + prefetch_notes(doc))))
    return out


def render_terminal(doc: dict[str, Any], *, layers: bool = False) -> Group:
    """Summary and savings-by-batch-size tables (and per-layer savings when `layers`), then the
    replay tables when the document has replay data; a cache document's own tables."""
    if is_cache(doc):
        return Group(*cache_renderables(doc, layers=layers))
    if is_schedule(doc):
        return Group(*schedule_renderables(doc))
    report = build_report(doc)
    _, rows = batch_table_rows(report)
    parts: list[Any] = [
        summary_table(report),
        grid_table(
            "Savings by Batch Size",
            TERMINAL_HEADER,
            rows,
            _first_left(TERMINAL_HEADER),
            no_wrap=True,
        ),
    ]
    if report.notes:
        parts.append(list_table("Note", report.notes))
    if layers:
        header, rows = layer_table_rows(report)
        parts.append(
            grid_table("Savings per Layer", header, rows, _first_left(header), no_wrap=True)
        )
    parts += replay_renderables(doc)
    return Group(*parts)


# ---------------------------------------------------------------------- doctor


def _value(field: Any) -> str:
    if isinstance(field, dict) and "not_available" in field:
        return f"[dim]N/A ({field['not_available']})[/dim]"
    if field is None:
        return "[dim]—[/dim]"
    return str(field)


def _support(field: Any) -> str:
    """A capability that may be missing: 'not supported' says so first, else as _value."""
    if isinstance(field, dict) and field.get("kind") == "not_supported":
        return f"not supported [dim]({field['not_available']})[/dim]"
    return _value(field)


def _cuda_device_table(d: dict[str, Any]) -> Table:
    from moeprof.formatting import human_bytes

    peak = d.get("h2d_peak_gbps")
    return kv_table(
        f"cuda:{d['index']} {d['name']}",
        [
            ("memory", human_bytes(d["total_memory_bytes"])),
            ("compute capability", d["capability"]),
            ("PCI bus id", _value(d["pci_bus_id"])),
            (
                "pinned host->device peak",
                f"{peak:.2f} GB/s (one copy of {human_bytes(d['h2d_bytes'])})"
                if peak
                else _value(d.get("h2d_reason")),
            ),
        ],
    )


def _nvml_device_table(d: dict[str, Any]) -> Table:
    from moeprof.nvml import pcie_link_gbps

    rows = [
        ("PCI bus id", _value(d["pci_bus_id"])),
        (
            "PCIe generation (current / max / GPU max)",
            f"{_value(d['pcie_gen_current'])} / {_value(d['pcie_gen_max'])} / "
            f"{_value(d['pcie_gen_gpu_max'])}",
        ),
        (
            "PCIe width (current / max)",
            f"x{_value(d['pcie_width_current'])} / x{_value(d['pcie_width_max'])}",
        ),
    ]
    gen, width = d["pcie_gen_max"], d["pcie_width_max"]
    if isinstance(gen, int) and isinstance(width, int):
        link = pcie_link_gbps(gen, width)
        if link:
            rows.append(("link max (theoretical, one direction)", f"{link:.1f} GB/s"))
    counters = d["pcie_counters"]
    rows.append(
        (
            "PCIe byte counters (RX/TX)",
            f"supported ({counters['counter_bits']}-bit)"
            if isinstance(counters, dict) and counters.get("supported")
            else _support(counters),
        )
    )
    thr = d["pcie_throughput_kib_s"]
    rows.append(
        ("PCIe throughput sampling", "supported" if isinstance(thr, list) else _support(thr))
    )
    return kv_table(f"NVML GPU {d['index']}: {_value(d['name'])}", rows)


def render_doctor(doc: dict[str, Any]) -> list[Any]:
    """Doctor's findings (a DoctorReport dict): environment, devices, what is missing, verdict."""
    nv = doc["nvml"]
    out: list[Any] = [
        kv_table(
            "Environment",
            [
                (
                    "torch",
                    f"{doc['torch_version'] or 'not installed'}"
                    + (
                        f" (CUDA {doc['torch_cuda']})"
                        if doc.get("torch_cuda")
                        else " (CPU-only build)"
                    ),
                ),
                ("CUDA available", "yes" if doc["cuda_available"] else "no"),
                ("NVML", "yes" if nv["nvml"] is True else _value(nv["nvml"])),
                ("driver", _value(nv["driver_version"])),
                ("CUDA (driver)", _value(nv["cuda_driver_version"])),
            ],
        )
    ]
    out += [_cuda_device_table(d) for d in doc["cuda_devices"]]
    if isinstance(nv["devices"], list):
        out += [_nvml_device_table(d) for d in nv["devices"]]
    if doc["missing"]:
        out.append(list_table("Missing", [f"[yellow]•[/yellow] {m}" for m in doc["missing"]]))
    out.append(
        "[green]ready[/green]: `moeprof replay TRACE --device cuda` can run here"
        if doc["ready_for_cuda_replay"]
        else "[yellow]no GPU replay here[/yellow]: `moeprof replay TRACE --device cpu` still runs "
        "(CPU backend)"
    )
    return out


def schedule_renderables(doc: dict[str, Any]) -> list[Any]:
    """A `moeprof schedule` document: summary, per B a loads table and a waiting table (the
    markdown's one table split to fit 80 columns), findings, definitions."""
    from rich.markdown import Markdown

    out: list[Any] = [kv_table("Serving simulation", schedule_summary_items(doc))]
    for b in schedule_batch_sizes(doc):
        header, rows = schedule_table_rows(doc, b)
        waiting = {"Wait mean / p95 / max", "Steps", "Running"}
        # Bytes per token say what loads per token do, when the expert sizes are known.
        bytes_known = bool(rows) and rows[0][header.index("Bytes/tok")] != "—"
        hidden = {"Loads/tok"} if bytes_known else {"Bytes/tok", "Cache bytes/tok"}
        loads_cols = [c for c in header if c not in waiting | hidden]
        wait_cols = ["Admission"] + [c for c in header if c in waiting]
        for title, columns in (
            (f"B = {b}: expert loads per generated token", loads_cols),
            (f"B = {b}: waiting (steps)", wait_cols),
        ):
            idx = [header.index(c) for c in columns]
            out.append(
                grid_table(
                    title,
                    [header[i] for i in idx],
                    [[r[i] for i in idx] for r in rows],
                    _first_left(columns),
                )
            )
    out.append(list_table("Findings", schedule_findings(doc)))
    out.append(Markdown("\n".join(f"- {n}" for n in schedule_notes(doc))))
    return out


# ---------------------------------------------------------------------- sweeps

SWEEP_FAILURES_SHOWN = 10  # the terminal lists this many failures; the markdown more


def _summary_grid(table: SummaryTable) -> Table:
    return grid_table(table.title, table.header, table.rows, table.align)


def sweep_renderables(summary: SweepSummary) -> Group:
    """A sweep's summary (`moeprof.sweep.summary`): totals, executive summary, savings by batch
    size, patterns, recommendations, per-analysis tables and the first failures."""
    from moeprof.sweep.summary import (
        batch_size_table,
        executive_items,
        failure_table,
        pattern_tables,
        totals_items,
    )

    parts: list[Any] = [
        kv_table("Sweep", totals_items(summary)),
        kv_table("Executive Summary", executive_items(summary)),
    ]
    if summary.by_batch_size:
        parts.append(_summary_grid(batch_size_table(summary)))
    parts += [_summary_grid(t) for t in pattern_tables(summary)]
    if summary.recommendations:
        parts.append(list_table("Recommendations", summary.recommendations))
    for table in summary.tables:
        parts.append(_summary_grid(table))
        if table.note:
            parts.append(f"[dim]{table.note}[/dim]")
    if summary.failures:
        failures = failure_table(summary, SWEEP_FAILURES_SHOWN)
        parts.append(_summary_grid(failures))
        if failures.note:
            parts.append(failures.note)
    return Group(*parts)
