"""What every command shares: consoles, the error line, common options, output checks."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

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
    "progress_bar",
]

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

force_option = typer.Option(False, "--force", "-f", help="Overwrite output files that exist.")
markdown_option = typer.Option(None, "--markdown", help="Write the markdown report here.")
plot_option = typer.Option(
    None, "--plot", help="Write a PNG plot of savings against batch size here."
)
layers_option = typer.Option(False, "--layers", help="Also show per-layer savings.")


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


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr, driven by (done, total) calls; hidden when not a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
