"""`moeprof replay`: re-execute a trace's expert loads per residency strategy and measure them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from moeprof.batching import policy_help
from moeprof.commands._common import (
    console,
    force_option,
    info,
    parse_batch_sizes,
    parse_names,
    parse_whole_numbers,
    progress_bar,
    traces_argument,
    write_outputs,
)
from moeprof.strategies import DEFAULT_STRATEGIES, REGISTRY, strategy_help


def parse_layers(text: str | None) -> list[int] | None:
    """`--layers` text, '3,1' -> [3, 1]; None: every layer (the range is checked by replay)."""
    return None if text is None else parse_whole_numbers(text, "MoE layer")


def _cache_help() -> str:
    users = ", ".join(s.name for s in REGISTRY.values() if s.uses_cache)
    return f"{users}: experts kept on the device per layer across batches."


def replay_cmd(
    trace_paths: list[Path] = traces_argument,
    device: str = typer.Option(
        "cpu",
        "--device",
        "-d",
        help="cuda (or cuda:N) for real PCIe copies; cpu for the "
        "CPU backend (host copies, no NVML).",
    ),
    strategies: str = typer.Option(
        ",".join(DEFAULT_STRATEGIES), "--strategies", "-s", help=strategy_help()
    ),
    batch_sizes: str = typer.Option(
        "8,64", "--batch-sizes", "-b", help="Comma-separated batch sizes."
    ),
    policy: str = typer.Option("tokens", "--policy", "-p", help=policy_help()),
    cache_experts: int = typer.Option(0, "--cache-experts", "-C", help=_cache_help()),
    max_batches: int | None = typer.Option(
        None, "--max-batches", help="Replay only the first N batches of each batch size."
    ),
    layers: str | None = typer.Option(
        None, "--layers", help="Comma-separated MoE layer indices to replay (default: all)."
    ),
    expert_bytes: int | None = typer.Option(
        None,
        "--expert-bytes",
        help="Replay blocks of N bytes instead of the trace's expert size (full-size bytes "
        "are projected in the results).",
    ),
    compute: bool = typer.Option(
        False,
        "--compute",
        help="Also run each loaded expert's SwiGLU FFN on its tokens, "
        "overlapping copies with compute, and report per-batch latency.",
    ),
    hidden_size: int | None = typer.Option(
        None,
        "--hidden-size",
        help="--compute: model hidden size (default: trace metadata, else 4096).",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results JSON here."),
    markdown_out: Path | None = typer.Option(
        None, "--markdown", help="Write the markdown report here."
    ),
    force: bool = force_option,
) -> None:
    """Copy each batch's experts host->device per strategy, timed, with NVML on the link.

    Example: moeprof replay demo.moe --device cuda --batch-sizes 8,64 --expert-bytes 16777216 --json replay.json
    """
    from moeprof import _io
    from moeprof.batching import get_policy
    from moeprof.replay import ReplayInterrupted, replay
    from moeprof.report.terminal import render_terminal
    from moeprof.shards import load_traces
    from moeprof.strategies import check_strategies

    get_policy(policy)
    sizes = parse_batch_sizes(batch_sizes)
    chosen = check_strategies(parse_names(strategies))
    replayed_layers = parse_layers(layers)
    _io.check_outputs([json_out, markdown_out], force=force)
    trace = load_traces(trace_paths)

    def show_and_write(doc: dict[str, Any]) -> None:
        doc["trace"]["path"] = ", ".join(str(p) for p in trace_paths)
        console.print(render_terminal(doc))  # includes the replay tables
        write_outputs(
            doc, json_out=json_out, markdown_out=markdown_out, title="moeprof replay report"
        )

    try:
        with progress_bar("replay", unit="batches") as update:
            result = replay(
                trace,
                device=device,
                strategies=chosen,
                batch_sizes=sizes,
                policy=policy,
                cache_experts=cache_experts,
                max_batches=max_batches,
                layers=replayed_layers,
                expert_bytes=expert_bytes,
                compute=compute,
                hidden_size=hidden_size,
                on_progress=lambda label, done, total: update(done, total, label),
            )
    except ReplayInterrupted as exc:
        if exc.partial is not None and exc.partial.runs:
            info("[yellow]interrupted[/yellow]: writing the runs that finished")
            show_and_write(exc.partial.to_dict())
        raise KeyboardInterrupt from None
    show_and_write(result.to_dict())


def register(app: typer.Typer) -> None:
    app.command("replay")(replay_cmd)
