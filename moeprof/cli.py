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
from typing import Any

import typer
from typer.exceptions import TyperException

from moeprof._version import __version__
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


def _options_of(group: Any, args: list[str]) -> dict[str, str]:
    """The invoked verb's parameters: Python name -> its long option (`expert_bytes` ->
    `--expert-bytes`), for wording library errors as command-line options."""
    sub = next((a for a in args if not a.startswith("-")), None)
    found = getattr(group, "commands", {}).get(sub) if sub is not None else None
    if found is None:
        return {}
    options: dict[str, str] = {}
    for param in found.params:
        longs = [o for o in getattr(param, "opts", []) if o.startswith("--")]
        if param.name and longs:
            options[param.name] = longs[0]
    return options


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: one line on stderr and exit 2 for bad input; 130 on Ctrl-C."""
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = command.main(args=args, prog_name="moeprof", standalone_mode=False)
    except _common.MoeprofError as exc:
        _common.fail(_common.as_options(exc.message, _options_of(command, args)), exc.exit_code)
    except TyperException as exc:  # typer's (vendored click) usage errors
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            sys.exit(0)
        hint = ""
        if ctx is not None and ctx.parent is not None and ctx.command.name:
            hint = f" (see 'moeprof {ctx.command.name} --help')"
        _common.fail(exc.format_message() + hint, 2 if ctx is not None else exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _common.fail("interrupted", 130)
    except BrokenPipeError:
        sys.exit(0)
    except OSError as exc:
        # A path the system refuses (name too long, permission denied, ...): the user's to fix.
        where = f"{exc.filename}: " if exc.filename else ""
        _common.fail(f"{where}{exc.strerror or exc}", 2)
    if rv == 130:  # typer turns Ctrl-C inside a command into a return value of 130
        _common.fail("interrupted", 130)
    sys.exit(rv if isinstance(rv, int) else 0)
