"""`moeprof merge`: shards of one trace concatenated into one file."""

from __future__ import annotations

from pathlib import Path

import typer

from moeprof.commands._common import MoeprofError, force_option, note_written


def merge_cmd(
    shards: list[Path] = typer.Argument(
        ...,
        metavar="SHARDS...",
        help="Trace files, a folder of .moe files, or a quoted glob, concatenated in the order "
        "given (a folder's or glob's files by name).",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Trace file to write (.moe)."),
    force: bool = force_option,
) -> None:
    """Concatenate shards of one trace (one per engine rank, or per hour) into one trace file.

    Requests of different shards stay distinct, and so do their recorded steps; shards of
    different models or layer layouts are refused, naming the first difference. Every analysis
    of the merged file equals the same analysis of the shards.

    Example: moeprof merge 'run-*.moe' -o run.moe
    """
    from moeprof import _io
    from moeprof.shards import Shards, shard_paths

    paths = shard_paths(shards)
    if any(p.resolve() == output.resolve() for p in paths if p.exists()):
        raise MoeprofError(f"--output {output} is one of the shards; write to another file")
    _io.check_outputs([output], force=force)
    merged = Shards(paths)
    trace = merged.to_trace()
    trace.save(output)
    note_written(output, f"trace of {trace.n_tokens:,} tokens from {merged.n_shards} shard(s)")


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_cmd)
