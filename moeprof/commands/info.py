"""`moeprof info`: what a trace holds."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from moeprof.commands._common import console


def register(app: typer.Typer) -> None:
    @app.command("info")
    def info_cmd(
        trace_path: Path = typer.Argument(..., metavar="TRACE", help="Trace file."),
        as_json: bool = typer.Option(False, "--json", help="Print the metadata as JSON."),
    ) -> None:
        """Show a trace's shape, model, source and metadata."""
        from rich.table import Table

        from moeprof.analyze import trace_summary
        from moeprof.formatting import human_bytes
        from moeprof.trace import load_trace

        trace = load_trace(trace_path)
        doc = trace_summary(trace)
        doc["file_bytes"] = trace_path.stat().st_size
        if as_json:
            console.print_json(json.dumps(doc))
            return
        table = Table(title=str(trace_path), title_justify="left", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        model = doc.get("model") or {}
        source = doc.get("source") or {}
        n_exp = trace.n_experts.tolist()
        ebytes = trace.expert_bytes.tolist()
        rows = [
            ("format", f"moeprof-trace v{doc['format_version']}"),
            ("model", f"{model.get('id') or 'unknown'} ({model.get('architecture') or '—'})"),
            ("source", str(source.get("kind") or "unknown")),
            ("tokens", f"{trace.n_tokens:,}"),
            ("requests", f"{trace.n_requests:,}"),
            ("MoE layers", f"{trace.n_layers} (model layers {trace.moe_layer_indices})"),
            ("experts per layer", str(n_exp[0]) if len(set(n_exp)) == 1 else str(n_exp)),
            ("top-k", str(trace.top_k)),
            (
                "routed expert size",
                "unknown"
                if min(ebytes) <= 0
                else (human_bytes(ebytes[0]) if len(set(ebytes)) == 1 else str(ebytes)),
            ),
            ("shared-expert bytes", f"{int(doc.get('shared_expert_bytes') or 0):,}"),
            (
                "arrays",
                ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in trace.arrays().items()),
            ),
            ("steps recorded", "yes" if trace.steps is not None else "no"),
            ("created", str(doc.get("created", "—"))),
            ("file size", human_bytes(doc["file_bytes"])),
        ]
        for key, value in rows:
            table.add_row(key, value)
        console.print(table)
