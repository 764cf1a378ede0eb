"""The markdown report: the same rows as the terminal view, as text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moeprof.formatting import human_bytes, pct
from moeprof.report.model import ReportModel, build_report


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A GitHub-flavoured table; `align` holds one of 'l'/'r' per column (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def batch_table_rows(model: ReportModel) -> tuple[list[str], list[list[str]]]:
    header = [
        "Batch Size",
        "Batches",
        "Avg Memory Savings",
        "Avg Bandwidth Savings",
        "Max Reuse Factor",
        "Bytes Saved",
        "Uniform Expectation",
    ]
    rows = [
        [
            r.size_text,
            f"{r.n_batches:,}",
            pct(r.memory_savings),
            pct(r.bandwidth_savings),
            f"{r.max_reuse_factor:.3f} (L{r.max_reuse_layer})",
            human_bytes(r.bytes_saved) if model.summary.expert_bytes_known else "—",
            pct(r.uniform_memory_savings),
        ]
        for r in model.batch_rows
    ]
    return header, rows


def summary_items(model: ReportModel) -> list[tuple[str, str]]:
    s = model.summary
    bm, bb = s.best_memory, s.best_bandwidth
    return [
        ("Maximum memory savings", f"{pct(bm.memory_savings)} at {bm.label}"),
        (
            "Maximum bandwidth savings",
            f"{pct(bb.bandwidth_savings)} at {bb.label}"
            + (f" ({human_bytes(bb.bytes_saved)} saved)" if s.expert_bytes_known else ""),
        ),
        (
            "Average reuse factor",
            f"{s.average_reuse_factor:.3f} (mean over routed layers and batch sizes)",
        ),
        (
            "Expert traffic without dedup",
            f"{bm.requests:,} expert loads"
            + (f", {human_bytes(bm.bytes_requested)}" if s.expert_bytes_known else ""),
        ),
        ("Batching policy", s.policy),
        ("Model", s.model + (f" ({s.architecture})" if s.architecture != "—" else "")),
        ("Source", s.source),
        ("Tokens / requests", f"{s.tokens:,} / {s.requests:,}"),
        ("MoE layers × experts, top-k", f"{s.moe_layers} × {s.experts}, top-{s.top_k}"),
        ("Routed expert size", s.expert_bytes),
        ("Trace created", s.created),
    ]


def layer_table_rows(model: ReportModel) -> tuple[list[str], list[list[str]]]:
    header = ["Layer"] + [
        "recorded" if r.recorded else f"B={r.batch_size}" for r in model.batch_rows
    ]
    # "—": the layer routed no token (every slot empty), so it has no savings.
    rows = [
        [label] + ["—" if v is None else pct(v) for v in vals] for label, vals in model.layer_rows
    ]
    return header, rows


def render_markdown(doc: dict[str, Any], title: str = "moeprof report") -> str:
    """The whole report for one results dict (the results JSON)."""
    model = build_report(doc)
    parts = [f"# {title}", "", "## Executive Summary", ""]
    parts += [f"- **{k}:** {v}" for k, v in summary_items(model)]
    header, rows = batch_table_rows(model)
    parts += ["", "## Savings by Batch Size", "", md_table(header, rows), ""]
    parts += [
        "Memory savings count expert loads avoided; bandwidth savings weigh them by each layer's "
        "expert bytes. *Max Reuse Factor* is the best layer's 1 − unique/requests (L = MoE layer). "
        "*Uniform Expectation* is the memory savings if every token picked its experts uniformly "
        "at random, for the same batches.",
        "",
        "## Savings per Layer",
        "",
    ]
    header, rows = layer_table_rows(model)
    parts += [md_table(header, rows), ""]
    from moeprof.report.replay import replay_markdown  # imports md_table from here

    replay_section = replay_markdown(doc)
    if replay_section:
        parts += [replay_section.rstrip("\n"), ""]
    parts += ["## Recommendations", ""]
    parts += [f"{i}. {text}" for i, text in enumerate(model.recommendations, 1)]
    parts += ["", "## Technical Analysis", ""]
    parts += [f"- {line}" for line in model.technical]
    return "\n".join(parts) + "\n"
