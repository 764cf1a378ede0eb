"""`moeprof analyze`: dedup savings by batch size, per layer, under a batching policy."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from moeprof.batching import check_batch_size, policy_help
from moeprof.commands._common import (
    MoeprofError,
    console,
    force_option,
    layers_option,
    markdown_option,
    plot_option,
    write_outputs,
)


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def parse_whole_numbers(text: str, noun: str) -> list[int]:
    """Comma-separated whole numbers, in the order given; errors call each one a `noun`."""
    items = [s.strip() for s in text.split(",")]
    if not any(items):
        raise MoeprofError(f"no {noun}s given")
    if not all(items):
        # '1,,2' is more likely a slip than a wish for 1 and 2: say so rather than guess.
        raise MoeprofError(
            f"{noun}s {_clip(text)!r} have an empty item (two commas in a row, or one at an end)"
        )
    for item in items:
        if not re.fullmatch(r"[+-]?[0-9]{1,19}", item):
            raise MoeprofError(f"{noun} {item!r} is not a whole number")
    return [int(item) for item in items]


def parse_batch_sizes(text: str) -> list[int]:
    """`--batch-sizes` text, '1,2,4' -> sorted distinct positive ints; else a MoeprofError."""
    return sorted({check_batch_size(b) for b in parse_whole_numbers(text, "batch size")})


def analyze_cmd(
    trace_path: Path = typer.Argument(..., metavar="TRACE", help="Trace file (.moe)."),
    batch_sizes: str = typer.Option(
        "1,2,4,8,16,32,64", "--batch-sizes", "-b", help="Comma-separated batch sizes."
    ),
    policy: str = typer.Option("tokens", "--policy", "-p", help=policy_help()),
    json_out: Path | None = typer.Option(None, "--json", help="Write the results JSON here."),
    markdown_out: Path | None = markdown_option,
    plot_out: Path | None = plot_option,
    layers: bool = layers_option,
    force: bool = force_option,
) -> None:
    """Count per-batch expert loads with and without deduplication, for each batch size.

    Example: moeprof analyze traces/demo.moe --batch-sizes 1,8,64 --json out.json
    """
    from moeprof import _io
    from moeprof.analyze import analyze
    from moeprof.batching import get_policy
    from moeprof.report.terminal import render_terminal
    from moeprof.trace import load_trace

    get_policy(policy)
    sizes = parse_batch_sizes(batch_sizes)
    _io.check_outputs([json_out, markdown_out, plot_out], force=force)
    trace = load_trace(trace_path)
    doc = analyze(trace, sizes, policy=policy).to_dict()
    doc["trace"]["path"] = str(trace_path)
    console.print(render_terminal(doc, layers=layers))
    write_outputs(doc, json_out=json_out, markdown_out=markdown_out, plot_out=plot_out)


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze_cmd)
