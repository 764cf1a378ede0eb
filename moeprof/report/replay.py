"""Renderers for the replay part of a results document: markdown text and rich tables.

Pure: a results dict in, text or renderables out. Both draw their rows from :func:`replay_rows`
and :func:`replay_notes`, so they never disagree. A document without replay data renders as
nothing (``""`` / ``[]``).
"""

from __future__ import annotations

from typing import Any

from moeprof.formatting import human_bytes, pct
from moeprof.report.markdown import md_table

REPLAY_HEADER = [
    "Batch",
    "Strategy",
    "Copies",
    "Bytes copied",
    "Seconds",
    "GB/s",
    "Share of peak",
    "NVML RX",
    "NVML TX",
    "RX / counted",
    "Counted savings",
    "Measured savings",
    "Agree (±10%)",
]
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
LATENCY_HEADER = ["Batch", "Strategy", "Batches", "Mean ms", "p50 ms", "p90 ms", "Max ms"]
_DASH = "—"


def has_replay(doc: dict[str, Any]) -> bool:
    return isinstance(doc.get("replay"), dict) and any(
        isinstance(r.get("replay"), dict) for r in doc.get("results", [])
    )


def _opt_bytes(value: Any) -> str:
    return _DASH if value is None else human_bytes(value)


def _opt_pct(value: Any) -> str:
    return _DASH if value is None else pct(value)


def _savings_cell(cmp: dict[str, Any]) -> tuple[str, str, str]:
    counted = _opt_pct(cmp.get("counted_savings"))
    basis = cmp.get("basis")
    if basis == "nvml_rx_bytes":
        measured = f"{pct(cmp['measured_savings_nvml'])} NVML"
    elif basis == "seconds":
        measured = f"{pct(cmp['measured_savings_seconds'])} time"
    else:
        measured = _DASH
    agree = cmp.get("agrees_within_10pct")
    agree_text = _DASH if agree is None else ("yes" if agree else "no")
    return counted, measured, agree_text


def replay_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per batch size and strategy."""
    rows: list[list[str]] = []
    for result in doc.get("results", []):
        rep = result.get("replay")
        if not isinstance(rep, dict):
            continue
        for s in rep.get("strategies", []):
            counted, measured, agree = _savings_cell(s.get("vs_naive") or {})
            ratio = s.get("measured_to_counted")
            copies = f"{s['copies']:,}"
            if not s.get("copies_match_counted", True):
                copies += f" (counted {s['counted_copies']:,})"
            rows.append(
                [
                    str(result["batch_size"]),
                    s["strategy"],
                    copies,
                    human_bytes(s["bytes_copied"]),
                    f"{s['seconds']:.4f}",
                    f"{s['gbps']:.2f}",
                    _opt_pct(s.get("share_of_peak")),
                    _opt_bytes(s.get("nvml_rx_bytes")),
                    _opt_bytes(s.get("nvml_tx_bytes")),
                    _DASH if ratio is None else f"{ratio:.3f}x",
                    counted,
                    measured,
                    agree,
                ]
            )
    return REPLAY_HEADER, rows


def latency_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows: list[list[str]] = []
    for result in doc.get("results", []):
        for s in (result.get("replay") or {}).get("strategies", []):
            lat = s.get("batch_latency")
            if not lat:
                continue
            rows.append(
                [
                    str(result["batch_size"]),
                    s["strategy"],
                    f"{lat['batches']:,}",
                    f"{lat['mean_ms']:.3f}",
                    f"{lat['p50_ms']:.3f}",
                    f"{lat['p90_ms']:.3f}",
                    f"{lat['max_ms']:.3f}",
                ]
            )
    return LATENCY_HEADER, rows


def replay_notes(doc: dict[str, Any]) -> list[str]:
    """What was replayed, where, and how it was measured: one sentence each."""
    info = doc.get("replay") or {}
    notes: list[str] = []
    if info.get("ran_on_cpu"):
        notes.append(
            "**Ran on the CPU** (no GPU): host-to-host copies stand in for PCIe transfers. Copies "
            "and bytes are exact; seconds and GB/s describe this machine's memory, not a GPU link."
        )
    else:
        name = info.get("device_name") or info.get("device", "?")
        link = info.get("link") or {}
        link_text = ""
        if link.get("pcie_gen_max") and link.get("pcie_width_max"):
            link_text = f", PCIe Gen{link['pcie_gen_max']} x{link['pcie_width_max']} (max)"
        notes.append(
            f"Device: {name} ({info.get('device', '?')}{link_text}), {info.get('host_memory', '')}."
        )
    peak = info.get("peak_h2d_gbps")
    if peak:
        cal = info.get("calibration") or {}
        notes.append(
            f"Calibrated peak: {peak:.2f} GB/s ({cal.get('method', 'one large copy')} of "
            f"{human_bytes(cal.get('bytes', 0))}, best of {cal.get('repeats', '?')}); "
            "GB/s here means 10^9 bytes per second."
        )
    method = info.get("measurement_method")
    reason = info.get("measurement_reason")
    check = info.get("counter_check") or {}
    check_text = ""
    if check.get("rx_to_copied") is not None and check.get("bytes_copied"):
        check_text = (
            f" Check: the calibration's {human_bytes(check['bytes_copied'])} showed as "
            f"{human_bytes(check.get('nvml_rx_bytes') or 0)} RX ({check['rx_to_copied']:.3f}x)."
        )
    if method == "nvml_counters":
        notes.append(
            "PCIe bytes: NVML cumulative RX/TX byte counters read around each run with the streams "
            "synchronised. They include protocol overhead and every process's traffic, so RX / "
            "counted slightly above 1.00x is expected." + check_text
        )
    elif method == "nvml_throughput":
        notes.append(
            "PCIe bytes: **estimated** from nvmlDeviceGetPcieThroughput (KiB/s over ~20 ms "
            "windows) sampled and integrated; the byte counters were not available"
            + (
                f" ({'; '.join(info.get('measurement_notes') or [])})."
                if info.get("measurement_notes")
                else "."
            )
        )
    elif method:
        notes.append(f"PCIe bytes: not measured ({reason}); counted payload only.")
    if info.get("scaled_blocks"):
        rep = sorted(set(info.get("expert_bytes_replayed") or []))
        full = sorted(set(info.get("expert_bytes_full") or []))
        notes.append(
            f"Blocks were scaled down: each expert was replayed as {', '.join(human_bytes(b) for b in rep)} "
            f"instead of {', '.join(human_bytes(b) for b in full)}; `bytes_copied_full_size` and "
            "`projected_seconds_full_size` in the JSON project the full size at the measured rate."
        )
    layers = info.get("layers")
    if layers is not None:
        notes.append(
            f"Replayed MoE layers: {', '.join(str(x) for x in layers)}; policy {info.get('policy')}"
            + (
                f", first {info['max_batches']} batches per batch size"
                if info.get("max_batches")
                else ""
            )
            + (
                f", LRU cache of {info.get('cache_experts')} experts per layer"
                if "lru" in (info.get("strategies") or [])
                else ""
            )
            + "."
        )
    notes.append(
        "Savings are against naive at the same batch size. Counted savings compare payload bytes; "
        "measured savings compare NVML RX bytes when measured (NVML), else device time (time). They agree when "
        "the measured cost ratio (strategy / naive) is within 10% of the counted one."
    )
    bound = [
        f"{s.get('strategy')} B={row.get('batch_size')}"
        for row in doc.get("results") or []
        if isinstance(row.get("replay"), dict)
        for s in (row["replay"].get("strategies") or [])
        if s.get("host_bound") is True
    ]
    if bound:
        notes.append(
            f"**Host-bound runs** ({', '.join(bound)}): Python took at least 90% of the device "
            "time to queue their copies, so the GPU may have waited for it; their seconds and "
            "GB/s then describe the host, not the link. Larger blocks (--expert-bytes) help."
        )
    if info.get("interrupted"):
        notes.append("**Interrupted**: only the runs that finished are shown.")
    return notes


def _align(header: list[str]) -> str:
    return "ll" + "r" * (len(header) - 2)  # batch and strategy left, numbers right


def replay_markdown(doc: dict[str, Any]) -> str:
    """The "## Replay (measured)" section of a markdown report ("" without replay data)."""
    if not has_replay(doc):
        return ""
    header, rows = replay_rows(doc)
    parts = ["## Replay (measured)", ""]
    parts += [f"- {n}" for n in replay_notes(doc)]
    parts += ["", md_table(header, rows, align=_align(header)), ""]
    lat_header, lat_rows = latency_rows(doc)
    if lat_rows:
        parts += [
            "### Per-batch latency (copies overlapped with expert FFN compute)",
            "",
            md_table(lat_header, lat_rows, align=_align(lat_header)),
            "",
        ]
    return "\n".join(parts)


def replay_renderables(doc: dict[str, Any]) -> list[Any]:
    """Rich renderables for the terminal ([] without replay data)."""
    if not has_replay(doc):
        return []
    from rich import box
    from rich.markdown import Markdown
    from rich.table import Table

    def table(title: str, header: list[str], rows: list[list[str]]) -> Table:
        t = Table(title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD)
        for i, name in enumerate(header):
            t.add_column(name, justify="left" if i < 2 else "right")
        for row in rows:
            t.add_row(*row)
        return t

    header, rows = replay_rows(doc)
    # The markdown table is too wide for a terminal: split it in two with the same cells.
    out: list[Any] = []
    for title, columns in (
        ("Replay (measured): copies and link", TERMINAL_COPY_COLUMNS),
        ("Replay (measured): PCIe bytes and savings vs naive", TERMINAL_SAVINGS_COLUMNS),
    ):
        idx = [header.index(c) for c in columns]
        out.append(table(title, [header[i] for i in idx], [[r[i] for i in idx] for r in rows]))
    lat_header, lat_rows = latency_rows(doc)
    if lat_rows:
        out.append(
            table("Per-batch latency (copies overlapped with compute)", lat_header, lat_rows)
        )
    out.append(Markdown("\n".join(f"- {n}" for n in replay_notes(doc))))
    return out
