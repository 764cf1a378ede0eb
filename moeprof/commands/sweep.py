"""`moeprof sweep`: every experiment of a sweep file, in a local process pool or as Ray tasks,
resumable (docs/sweep.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from moeprof.commands._common import MoeprofError, console, info, progress_bar
from moeprof.executors import EXECUTORS, executor_help

_DRY_RUN_ROWS = 5


def sweep_cmd(
    sweep_file: Path = typer.Argument(..., metavar="FILE", help="Sweep file (.yaml)."),
    out_dir: Path | None = typer.Option(
        None, "--output", "-o", help="Results folder (default: sweep-results/NAME)."
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        "-w",
        help="Tasks run at once, one trace configuration each (default: every core; with "
        "--ray-address, every CPU of the cluster).",
    ),
    executor: str = typer.Option(
        "local", "--executor", "-e", help=executor_help(), metavar="|".join(EXECUTORS)
    ),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        metavar="ADDR",
        help="A running Ray cluster (HOST:6379, or auto) for --executor ray; default: a local "
        "Ray runtime.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the number of experiments and a few of them; run nothing."
    ),
    force: bool = typer.Option(
        False, "--force", "-f", help="Discard the results already in the folder and run all."
    ),
    curve_by: str | None = typer.Option(
        None,
        "--curve-by",
        help="Report plot: the swept parameter whose values are the curves (default: the "
        "strongest lever).",
    ),
) -> None:
    """Run a grid of traces x analysis settings x batch sizes; a rerun skips stored results.

    Example: moeprof sweep sweeps/seed.yaml -o out/seed --workers 2

    On a Ray cluster: moeprof sweep sweeps/seed.yaml --executor ray --ray-address HOST:6379
    """
    import json

    from moeprof.executors import check_executor
    from moeprof.sweep import load_sweep, run_sweep
    from moeprof.sweep.runner import RESULTS_JSONL, RESULTS_PARQUET, pending

    if workers is not None and workers < 1:
        raise MoeprofError(f"--workers must be 1 or more, got {workers}")
    check_executor(executor)  # before reading anything: an unknown name, or Ray not installed
    if ray_address is not None and executor != "ray":
        raise MoeprofError("--ray-address is only for --executor ray")
    sweep = load_sweep(sweep_file)
    from moeprof.sweep.summary import resolve_curve_by

    # A wrong name fails before anything runs.
    resolve_curve_by(curve_by, [e.columns() for e in sweep.experiments])
    out = out_dir if out_dir is not None else Path("sweep-results") / sweep.name
    if out.exists() and not out.is_dir():
        raise MoeprofError(f"{out} exists and is not a folder")
    if dry_run:
        todo, stored = pending(sweep, out) if not force else (list(sweep.experiments), 0)
        traces = len({e.source for e in sweep.experiments})
        console.print(
            f"{sweep.name}: {len(sweep.experiments)} experiments on {traces} trace "
            f"configurations; {stored} already stored in {out}, {len(todo)} to run"
        )
        for e in todo[:_DRY_RUN_ROWS]:
            console.print(json.dumps(e.columns(), default=str), markup=False, soft_wrap=True)
        return
    with progress_bar(f"sweep {sweep.name}", unit="experiments", eta=True) as update:
        run = run_sweep(
            sweep,
            out,
            workers=workers,
            executor=executor,
            address=ray_address,
            force=force,
            on_progress=update,
        )
    console.print(
        f"{sweep.name}: {run.total} experiments: {run.ran} run ({run.failed} failed), "
        f"{run.skipped} already stored; {run.seconds:.1f} s"
    )
    if run.rows:
        from moeprof.commands.report import write_sweep_report

        # The folder belongs to the sweep: its report is rewritten after every run.
        write_sweep_report(
            list(run.rows),
            markdown_out=out / "report.md",
            plot_out=out / "report.png",
            curve_by=curve_by,
            plot_if_any=True,
        )
    if run.failed:
        first = next(r for r in run.rows if r.get("error") is not None)
        info(f"{run.failed} experiments failed; the first: {first['error']}")
    info(f"rows: {out / RESULTS_JSONL} and {out / RESULTS_PARQUET}")


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep_cmd)
