"""What a benchmark ran on, for the markdown tables the benchmarks print."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

import numpy as np


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, else what platform reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_rows(extra: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(label, value) rows: date, CPU, cores, OS, Python and numpy versions, then `extra`."""
    rows = [
        ("date", dt.date.today().isoformat()),
        ("CPU", cpu_model()),
        ("cores (logical)", str(os.cpu_count())),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version()),
        ("numpy", np.__version__),
    ]
    return rows + list((extra or {}).items())


def markdown_table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | ---: |"]
    lines += [f"| {label} | {value} |" for label, value in rows]
    return "\n".join(lines)
