"""All figures as PNG bytes: savings against batch size (with the uniform-routing curve),
expert-cache hit rate and bytes per token against capacity, admission policies, and a sweep's
facets (each analysis's headline metric against batch size, one curve per parameter value)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from moeprof.report.rows import (
    build_report,
    cache_batch_sizes,
    is_cache,
    is_schedule,
    schedule_batch_sizes,
)

if TYPE_CHECKING:  # the sweep's summary loads only when a sweep is plotted
    from moeprof.sweep.summary import SweepSummary

_BYTE_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("bytes", 1))


def render_cache_plot(doc: dict[str, Any]) -> bytes:
    """Hit rate against capacity per strategy (left) and bytes per token (right, when the
    expert sizes are known); one line style per batch size."""
    from matplotlib.figure import Figure

    rows = [r for r in doc["results"] if r["strategy"] not in ("naive", "dedup")]
    with_bytes = any(r.get("bytes_per_token") is not None for r in rows)
    fig = Figure(figsize=(11 if with_bytes else 7, 4.2), dpi=120, layout="constrained")
    # Bytes per token in the binary unit that keeps the largest value readable.
    largest = max((float(r.get("bytes_per_token") or 0) for r in rows), default=0.0)
    unit, scale = next(((u, float(f)) for u, f in _BYTE_UNITS if largest >= f), _BYTE_UNITS[-1])
    axes = fig.subplots(1, 2 if with_bytes else 1, squeeze=False)[0]
    styles = ["o-", "s--", "^:", "d-.", "v-", "x--"]
    names = list(dict.fromkeys(r["strategy"] for r in rows))
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    for j, b in enumerate(cache_batch_sizes(doc)):
        for name in names:
            mine = sorted(
                (r for r in rows if r["strategy"] == name and int(r["batch_size"]) == b),
                key=lambda r: int(r["cache_experts"]),
            )
            if not mine:
                continue
            caps = [int(r["cache_experts"]) for r in mine]
            label = f"{name}, B={b}"
            style = styles[j % len(styles)]
            axes[0].plot(
                caps,
                [100 * float(r["hit_rate"]) for r in mine],
                style,
                color=colours[name],
                label=label,
            )
            if with_bytes:
                axes[1].plot(
                    caps,
                    [float(r["bytes_per_token"] or 0) / scale for r in mine],
                    style,
                    color=colours[name],
                    label=label,
                )
    model = (doc["trace"].get("model") or {}).get("id") or "unknown"
    axes[0].set_ylim(0, 100)
    axes[0].set_xlabel("C: experts retained per layer")
    axes[0].set_ylabel("hit rate (%)")
    axes[0].set_title(f"Expert cache hit rate — {model}")
    if with_bytes:
        axes[1].set_xlabel("C: experts retained per layer")
        axes[1].set_ylabel(f"{unit} loaded per token")
        axes[1].set_title("Bytes per token")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="lower right", fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def render_plot(doc: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if is_cache(doc):
        return render_cache_plot(doc)
    if is_schedule(doc):
        return render_schedule_plot(doc)
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


def render_schedule_plot(doc: dict[str, Any]) -> bytes:
    """Expert-load reduction against FIFO (y) over the mean waiting time each admission policy
    adds against FIFO (x): one point per policy and B, one marker per B."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    markers = ["o", "s", "^", "d", "v", "x"]
    names = list(dict.fromkeys(str(r["admission"]) for r in doc["results"]))
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    for j, b in enumerate(schedule_batch_sizes(doc)):
        rows = {str(r["admission"]): r for r in doc["results"] if int(r["batch_size"]) == b}
        base = rows.get("fifo")
        for name, r in rows.items():
            added = float(r["wait_mean"]) - (float(base["wait_mean"]) if base else 0.0)
            ax.plot(
                [added],
                [100 * float(r["reduction_vs_fifo"])],
                markers[j % len(markers)],
                color=colours[name],
                label=f"{name}, B={b}",
            )
    model = (doc["trace"].get("model") or {}).get("id") or "unknown"
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.axvline(0, color="gray", linewidth=0.8)
    ax.set_xlabel("mean waiting time added against FIFO (steps)")
    ax.set_ylabel("expert loads saved against FIFO (%)")
    ax.set_title(f"Admission policies — {model}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def render_sweep_plot(summary: SweepSummary) -> bytes:
    """One panel per analysis of the sweep: its headline metric (averaged over every other axis)
    against batch size, one curve per value of `summary.curve_by`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from moeprof.errors import MoeprofError

    if not summary.panels:
        raise MoeprofError("no experiment without error to plot")
    n = len(summary.panels)
    fig = Figure(figsize=(5.2 * n, 4.2), dpi=120, layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    styles = ["o-", "s--", "^:", "d-.", "v-", "x--"]
    for ax, panel in zip(axes, summary.panels):
        sizes = sorted({b for c in panel.curves for b in c.batch_sizes})
        for i, curve in enumerate(panel.curves):
            ax.plot(
                curve.batch_sizes,
                [100 * m for m in curve.means],
                styles[i % len(styles)],
                color=f"C{i % 10}",
                label=curve.label,
            )
        if len(sizes) > 1 and max(sizes) / max(min(sizes), 1) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.set_ylim(0, 100)
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"{panel.metric_label} (%)")
        by = f", by {panel.curve_by}" if panel.curve_by else ""
        ax.set_title(f"{panel.analysis}: {panel.metric_label}{by}")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
