"""`moeprof doctor`: what this machine offers for a GPU replay, and what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from moeprof.commands._common import console, force_option, note_written


def doctor_cmd(
    bandwidth: bool = typer.Option(
        True,
        "--bandwidth/--no-bandwidth",
        help="Measure the pinned host->device peak (1 GiB copy).",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write the findings as JSON here."),
    force: bool = force_option,
) -> None:
    """Check GPU, driver, CUDA, PCIe link and NVML counters for `moeprof replay`.

    Without a GPU it says what is missing and exits 0.
    """
    from moeprof import _io
    from moeprof.replay.doctor import gather
    from moeprof.report.terminal import render_doctor

    _io.check_outputs([json_out], force=force)
    doc = gather(measure_bandwidth=bandwidth).to_dict()
    for part in render_doctor(doc):
        console.print(part)
    if json_out is not None:
        _io.write_text(json_out, json.dumps(doc, indent=2) + "\n")
        note_written(json_out, "doctor JSON")


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_cmd)
