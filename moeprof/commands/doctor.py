"""`moeprof doctor`: what this machine offers for a GPU replay, and what is missing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from moeprof.commands._common import console, force_option, note_written


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


def doctor_renderables(doc: dict[str, Any]) -> list[Any]:
    """Rich tables for a DoctorReport dict."""
    from rich.table import Table

    from moeprof.formatting import human_bytes
    from moeprof.nvml import pcie_link_gbps

    out: list[Any] = []
    env = Table(title="Environment", title_justify="left", show_header=False)
    env.add_column(style="bold")
    env.add_column()
    nv = doc["nvml"]
    env.add_row(
        "torch",
        f"{doc['torch_version'] or 'not installed'}"
        + (f" (CUDA {doc['torch_cuda']})" if doc.get("torch_cuda") else " (CPU-only build)"),
    )
    env.add_row("CUDA available", "yes" if doc["cuda_available"] else "no")
    env.add_row("NVML", "yes" if nv["nvml"] is True else _value(nv["nvml"]))
    env.add_row("driver", _value(nv["driver_version"]))
    env.add_row("CUDA (driver)", _value(nv["cuda_driver_version"]))
    out.append(env)

    for d in doc["cuda_devices"]:
        t = Table(title=f"cuda:{d['index']} {d['name']}", title_justify="left", show_header=False)
        t.add_column(style="bold")
        t.add_column()
        t.add_row("memory", human_bytes(d["total_memory_bytes"]))
        t.add_row("compute capability", d["capability"])
        t.add_row("PCI bus id", _value(d["pci_bus_id"]))
        peak = d.get("h2d_peak_gbps")
        t.add_row(
            "pinned host->device peak",
            f"{peak:.2f} GB/s (one copy of {human_bytes(d['h2d_bytes'])})"
            if peak
            else _value(d.get("h2d_reason")),
        )
        out.append(t)

    devices = nv["devices"]
    if isinstance(devices, list):
        for d in devices:
            t = Table(
                title=f"NVML GPU {d['index']}: {_value(d['name'])}",
                title_justify="left",
                show_header=False,
            )
            t.add_column(style="bold")
            t.add_column()
            t.add_row("PCI bus id", _value(d["pci_bus_id"]))
            t.add_row(
                "PCIe generation (current / max / GPU max)",
                f"{_value(d['pcie_gen_current'])} / {_value(d['pcie_gen_max'])} / {_value(d['pcie_gen_gpu_max'])}",
            )
            t.add_row(
                "PCIe width (current / max)",
                f"x{_value(d['pcie_width_current'])} / x{_value(d['pcie_width_max'])}",
            )
            gen, width = d["pcie_gen_max"], d["pcie_width_max"]
            if isinstance(gen, int) and isinstance(width, int):
                link = pcie_link_gbps(gen, width)
                if link:
                    t.add_row("link max (theoretical, one direction)", f"{link:.1f} GB/s")
            counters = d["pcie_counters"]
            t.add_row(
                "PCIe byte counters (RX/TX)",
                f"supported ({counters['counter_bits']}-bit)"
                if isinstance(counters, dict) and counters.get("supported")
                else _support(counters),
            )
            thr = d["pcie_throughput_kib_s"]
            t.add_row(
                "PCIe throughput sampling", "supported" if isinstance(thr, list) else _support(thr)
            )
            out.append(t)
    if doc["missing"]:
        miss = Table(title="Missing", title_justify="left", show_header=False)
        miss.add_column()
        for m in doc["missing"]:
            miss.add_row(f"[yellow]•[/yellow] {m}")
        out.append(miss)
    verdict = (
        "[green]ready[/green]: `moeprof replay TRACE --device cuda` can run here"
        if doc["ready_for_cuda_replay"]
        else "[yellow]no GPU replay here[/yellow]: `moeprof replay TRACE --device cpu` still runs "
        "(CPU backend)"
    )
    out.append(verdict)
    return out


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor_cmd(
        bandwidth: bool = typer.Option(
            True,
            "--bandwidth/--no-bandwidth",
            help="Measure the pinned host->device peak (1 GiB copy).",
        ),
        json_out: Path | None = typer.Option(
            None, "--json", help="Write the findings as JSON here."
        ),
        force: bool = force_option,
    ) -> None:
        """Check GPU, driver, CUDA, PCIe link and NVML counters for `moeprof replay`.

        Without a GPU it says what is missing and exits 0.
        """
        from moeprof import _io
        from moeprof.replay.doctor import gather

        _io.check_outputs([json_out], force=force)
        doc = gather(measure_bandwidth=bandwidth).to_dict()
        for part in doctor_renderables(doc):
            console.print(part)
        if json_out is not None:
            _io.write_text(json_out, json.dumps(doc, indent=2) + "\n")
            note_written(json_out, "doctor JSON")
