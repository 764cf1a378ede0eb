"""`moeprof import`: routing captured by other tools (long tables, vLLM, SGLang) -> a trace file."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer

from moeprof.commands._common import err_console, force_option, note_written, progress_bar


def import_cmd(
    sources: list[Path] = typer.Argument(
        ...,
        metavar="SRC...",
        help="Files or folders (a folder: its files of the format, in name order).",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Trace file to write."),
    fmt: str | None = typer.Option(
        None,
        "--format",
        "-F",
        help="long-csv, long-jsonl, vllm or sglang (default: from the file endings).",
    ),
    request_col: str | None = typer.Option(
        None, "--request-col", help="Column(s) naming the request, comma-separated."
    ),
    position_col: str | None = typer.Option(
        None, "--position-col", help="Column with the token's position in its request."
    ),
    layer_col: str | None = typer.Option(None, "--layer-col", help="Column with the layer."),
    experts_col: str | None = typer.Option(
        None,
        "--experts-col",
        help="Column with the list of expert ids, or one column per slot, comma-separated.",
    ),
    weights_col: str | None = typer.Option(
        None, "--weights-col", help="Column(s) with the gate weights, like --experts-col."
    ),
    experts: int | None = typer.Option(
        None, "--experts", "-E", help="Routed experts per layer (default: largest id + 1)."
    ),
    expert_bytes: int | None = typer.Option(
        None, "--expert-bytes", help="Bytes of one routed expert (default: unknown)."
    ),
    model_config: Path | None = typer.Option(
        None,
        "--model-config",
        help="A Hugging Face config.json: expert count, sizes and MoE layer numbers.",
    ),
    phase: str | None = typer.Option(None, "--phase", help="Label every token prefill or decode."),
    force: bool = force_option,
) -> None:
    """Import routing captured by another tool into a moeprof trace.

    Example: moeprof import routing/ --format long-csv -o routing.moe --expert-bytes 17301504
    """
    from moeprof import _io
    from moeprof.importers import MoeprofImportWarning, import_trace

    _io.check_outputs([output], force=force)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MoeprofImportWarning)
        with progress_bar("reading") as progress:
            trace = import_trace(
                sources,
                fmt,
                experts=experts,
                expert_bytes=expert_bytes,
                model_config=model_config,
                phase=phase,
                progress=progress,
                request_col=request_col,
                position_col=position_col,
                layer_col=layer_col,
                experts_col=experts_col,
                weights_col=weights_col,
            )
    for w in caught:
        if issubclass(w.category, MoeprofImportWarning):
            err_console.print(f"[yellow]warning:[/yellow] {w.message}", highlight=False)
    trace.save(output)
    size = int(trace.expert_bytes[0])
    note_written(
        output,
        f"trace ({trace.n_tokens:,} tokens, {trace.n_requests:,} requests, "
        f"{trace.n_layers} MoE layers, top-{trace.top_k} of {int(trace.n_experts.max())}, "
        + (f"{size:,} bytes per expert)" if size > 0 else "expert size unknown)"),
    )


def register(app: typer.Typer) -> None:
    app.command("import")(import_cmd)
