"""Number formatting shared by every layer that shows numbers (reports, replay messages, CLI)."""

from __future__ import annotations


def pct(x: float) -> str:
    """A fraction as a percentage with one decimal: 0.1234 -> '12.3%'."""
    return f"{100.0 * x:.1f}%"


def human_bytes(n: float) -> str:
    """Binary units, 3 significant figures: 1536 -> '1.50 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024.0 or unit == "PiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.3g} {unit}" if abs(value) >= 100 else f"{value:.2f} {unit}"
        value /= 1024.0
    raise AssertionError("unreachable")
