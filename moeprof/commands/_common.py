"""What every command shares: consoles, the error line, common options, output checks."""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

from moeprof.batching.plan import check_batch_size
from moeprof.errors import MoeprofError

__all__ = [
    "MoeprofError",
    "console",
    "err_console",
    "fail",
    "force_option",
    "info",
    "layers_option",
    "markdown_option",
    "note_written",
    "plot_option",
    "parse_batch_sizes",
    "parse_names",
    "parse_whole_numbers",
    "progress_bar",
    "traces_argument",
    "write_outputs",
]

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

force_option = typer.Option(False, "--force", "-f", help="Overwrite output files that exist.")
markdown_option = typer.Option(None, "--markdown", help="Write the markdown report here.")
plot_option = typer.Option(
    None, "--plot", help="Write a PNG plot of savings against batch size here."
)
layers_option = typer.Option(False, "--layers", help="Also show per-layer savings.")
# The TRACE argument of every verb that reads a trace: one file, or shards read as one trace.
traces_argument = typer.Argument(
    ...,
    metavar="TRACE...",
    help="Trace file (.moe); or several, a folder of .moe files, or a quoted glob: shards read "
    "as one trace (requests of different shards stay distinct).",
)


def as_options(message: str, options: dict[str, str]) -> str:
    """A library error worded for the command line: every parameter name that is an identifier
    of two or more words (`expert_bytes`) becomes its option (`--expert-bytes`). Library
    messages name parameters; one-word names (`device`) read the same either way."""
    names = [n for n in options if "_" in n]
    if not names:
        return message
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    return pattern.sub(lambda m: options[m.group(1)], message)


def fail(message: str, exit_code: int = 2) -> NoReturn:
    """The one error line: `moeprof: error: ...` on stderr, then exit."""
    line = " ".join(str(message).split())  # one line, whatever the message held
    sys.stderr.write(f"moeprof: error: {line}\n")
    sys.stderr.flush()
    sys.exit(exit_code)


def info(message: str) -> None:
    err_console.print(message)


def note_written(path: str | Path, what: str) -> None:
    err_console.print(f"[green]wrote[/green] {what}: {path}")


class _Rate:
    """A rich column: '{done} {unit}  {rate} {unit}/s' (built lazily; rich loads on first use)."""

    @staticmethod
    def column(unit: str) -> Any:
        from rich.progress import ProgressColumn, Task
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task: Task) -> Text:
                elapsed = task.elapsed or 0.0
                rate = task.completed / elapsed if elapsed > 0 else 0.0
                return Text(f"{task.completed:,.0f} {unit}  {rate:,.0f} {unit}/s")

        return RateColumn()


@contextlib.contextmanager
def progress_bar(
    description: str,
    *,
    unit: str = "",
    rate: bool = False,
    transient: bool = True,
    eta: bool = False,
) -> Iterator[Callable[..., None]]:
    """The one progress bar: rich, on stderr (a transient one only on a terminal).

    Yields ``update(done, total, label=None)``: each distinct ``label`` (default: `description`)
    is its own bar. Nothing is drawn before the first update, so work refused up front prints
    only its error line. ``rate=True`` shows the count and its rate in `unit` per second
    instead of done/total; ``eta=True`` adds the estimated time left.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn()]
    if rate:
        columns.append(_Rate.column(unit))
    else:
        columns.append(MofNCompleteColumn())
        if unit:
            columns.append(TextColumn(unit))
    columns.append(TimeElapsedColumn())
    if eta:
        columns += [TextColumn("eta"), TimeRemainingColumn()]
    bar = Progress(
        *columns,
        console=err_console,
        transient=transient,
        # A transient bar off a terminal is noise; a kept one leaves its final line as a record.
        disable=transient and not err_console.is_terminal,
    )
    tasks: dict[str, Any] = {}

    def update(done: int, total: int | None, label: str | None = None) -> None:
        name = description if label is None else label
        if not tasks:
            bar.start()
        if name not in tasks:
            tasks[name] = bar.add_task(name, total=total)
        bar.update(tasks[name], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()


def write_outputs(
    doc: dict[str, Any],
    *,
    json_out: Path | None = None,
    markdown_out: Path | None = None,
    plot_out: Path | None = None,
    title: str = "moeprof report",
) -> None:
    """Render every requested output of a results document, then write them all at once
    (temporary files, then renames): an error while producing any one leaves none written and
    none overwritten."""
    import json

    from moeprof import _io
    from moeprof.report.markdown import render_markdown

    rendered: list[tuple[Path, bytes, str]] = []
    if json_out is not None:
        rendered.append((json_out, (json.dumps(doc, indent=2) + "\n").encode(), "results JSON"))
    if markdown_out is not None:
        rendered.append(
            (markdown_out, render_markdown(doc, title=title).encode(), "markdown report")
        )
    if plot_out is not None:
        from moeprof.report.plot import render_plot

        rendered.append((plot_out, render_plot(doc), "plot"))
    _io.write_all([(path, data) for path, data, _ in rendered])
    for path, _, what in rendered:
        note_written(path, what)


# ---------------------------------------------------------------------- argument text


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


def parse_names(text: str) -> list[str]:
    """Comma-separated names, 'naive,dedup' -> ['naive', 'dedup'] (the library checks them)."""
    return [s.strip() for s in text.split(",") if s.strip()]
