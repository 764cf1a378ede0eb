"""`moeprof import`: routing captured by other tools (long tables, vLLM, SGLang) -> a trace file."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer
from rich.markup import escape

from moeprof.commands._common import (
    MoeprofError,
    as_options,
    err_console,
    force_option,
    note_written,
    progress_bar,
)


def parse_where(text: str) -> tuple[str, str]:
    """`--where COL=VALUE` -> (column, value); the value may hold '=' itself."""
    column, sep, value = text.partition("=")
    if not sep or not column.strip():
        raise MoeprofError(f"--where takes COL=VALUE, got {text!r}")
    return column.strip(), value


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
        help="long-csv, long-jsonl, vllm, sglang, rtrace or npz-idx (default: from the file "
        "endings; an .npz holding idx or logits is npz-idx).",
    ),
    request_col: str | None = typer.Option(
        None,
        "--request-col",
        help="Column(s) naming the request, comma-separated; none: each file is one request.",
    ),
    position_col: str | None = typer.Option(
        None,
        "--position-col",
        help="Column with the token's position in its request; none: order of appearance.",
    ),
    layer_col: str | None = typer.Option(None, "--layer-col", help="Column with the layer."),
    experts_col: str | None = typer.Option(
        None,
        "--experts-col",
        help="Column with the list of expert ids, or one column per slot, comma-separated.",
    ),
    weights_col: str | None = typer.Option(
        None,
        "--weights-col",
        help="Column(s) with the gate weights, like --experts-col; none: no weights.",
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
    where: list[str] | None = typer.Option(
        None,
        "--where",
        metavar="COL=VALUE",
        help="Keep only rows whose column equals the value (repeatable, e.g. type=route).",
    ),
    request_scope: str = typer.Option(
        "file",
        "--request-scope",
        help="file: request ids name requests within each file; global: the same id in "
        "several files is one request (e.g. one file per layer).",
    ),
    step_from_resets: bool = typer.Option(
        False,
        "--step-from-resets",
        help="The position column restarts every forward pass: each restart begins a new step "
        "(replayed by --policy recorded); positions become the order in the log.",
    ),
    drop_warmup: bool = typer.Option(
        False,
        "--drop-warmup",
        help="Remove runs of 256+ rows that repeat one route (engine warm-up passes).",
    ),
    top_k: int | None = typer.Option(
        None,
        "--top-k",
        help="Experts each token routes to, taken from router scores (rtrace; npz-idx logits).",
    ),
    phase: str | None = typer.Option(None, "--phase", help="Label every token prefill or decode."),
    force: bool = force_option,
) -> None:
    """Import routing captured by another tool into a moeprof trace.

    Example: moeprof import routing/ --format long-csv -o routing.moe --expert-bytes 17301504
    """
    from moeprof import _io
    from moeprof.importers import MoeprofImportWarning, import_trace

    filters = [parse_where(item) for item in where or []]
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
                where=filters,
                request_scope=None if request_scope == "file" else request_scope,
                step_from_resets=step_from_resets,
                drop_warmup=drop_warmup,
                # Only when given: formats without router scores take no top_k.
                **({"top_k": top_k} if top_k is not None else {}),
            )
    options = {
        name: "--" + name.replace("_", "-")
        for name in ("request_scope", "drop_warmup", "step_from_resets", "model_config")
    }
    for w in caught:
        if issubclass(w.category, MoeprofImportWarning):
            text = escape(as_options(str(w.message), options))
            err_console.print(f"[yellow]warning:[/yellow] {text}", highlight=False)
    trace.save(output)
    size = int(trace.expert_bytes[0])
    note_written(
        output,
        f"trace ({trace.n_tokens:,} tokens, {trace.n_requests:,} requests, "
        f"{trace.n_layers} MoE layers, top-{trace.top_k} of {int(trace.n_experts.max())}, "
        + (f"{size:,} bytes per expert" if size > 0 else "expert size unknown")
        + _skipped(trace.meta.get("source", {}))
        + ")",
    )


def _skipped(source: dict) -> str:
    """What the import set aside, for the summary line."""
    parts = []
    if source.get("metadata_records"):
        parts.append(f"{source['metadata_records']:,} metadata records skipped")
    if source.get("dropped_warmup_tokens"):
        parts.append(f"{source['dropped_warmup_tokens']:,} warm-up tokens dropped")
    return "".join(f", {p}" for p in parts)


def register(app: typer.Typer) -> None:
    app.command("import")(import_cmd)
