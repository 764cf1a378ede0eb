"""All figures: savings against batch size, with the uniform-routing curve, as PNG bytes."""

from __future__ import annotations

import io
from typing import Any

from moeprof.report.rows import build_report


def render_plot(doc: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    report = build_report(doc)
    sizes = [r.batch_size for r in report.batch_rows]
    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.add_subplot()
    ax.plot(
        sizes, [100 * r.memory_savings for r in report.batch_rows], "o-", label="memory savings"
    )
    differs = any(abs(r.bandwidth_savings - r.memory_savings) > 1e-9 for r in report.batch_rows)
    if report.summary.expert_bytes_known and differs:  # equal sizes: the curves coincide
        ax.plot(
            sizes,
            [100 * r.bandwidth_savings for r in report.batch_rows],
            "s--",
            label="bandwidth savings",
        )
    ax.plot(
        sizes,
        [100 * r.uniform_memory_savings for r in report.batch_rows],
        ":",
        color="gray",
        label="uniform routing (expected)",
    )
    if len(sizes) > 1 and max(sizes) / max(min(sizes), 1) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.set_ylim(0, 100)
    ax.set_xlabel(f"batch size (policy: {report.summary.policy})")
    ax.set_ylabel("savings (%)")
    ax.set_title(f"Expert deduplication savings — {report.summary.model}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
