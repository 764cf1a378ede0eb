"""`moeprof <verb>`: parse arguments, call one library function, render. Errors are mapped once here.

Each verb lives in its own module under moeprof/commands/ with a `register(app)` function; modules
are discovered, so adding a verb touches no other file. Heavy imports (torch, transformers) stay
inside the command functions.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Sequence

import click
import typer

from moeprof import __version__
from moeprof.commands import _common

app = typer.Typer(
    name="moeprof",
    help=(
        "Trace-driven profiler for Mixture-of-Experts inference with experts offloaded to host "
        "memory: how much expert deduplication, caching and batching save, counted from real "
        "routing and measured on the real link."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moeprof {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """moeprof: record → analyze → replay → report."""


def _register_commands() -> None:
    import moeprof.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"moeprof.commands.{info.name}")
        module.register(app)


_register_commands()


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: one line on stderr and exit 2 for bad input; 130 on Ctrl-C."""
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = command.main(args=args, prog_name="moeprof", standalone_mode=False)
    except _common.MoeprofError as exc:
        _common.fail(exc.message, exc.exit_code)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(0)
    except click.UsageError as exc:
        hint = f" (see 'moeprof {exc.ctx.command.name} --help')" if exc.ctx and exc.ctx.parent else ""
        _common.fail(exc.format_message() + hint, 2)
    except click.ClickException as exc:
        _common.fail(exc.format_message(), exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _common.fail("interrupted", 130)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(rv if isinstance(rv, int) else 0)
