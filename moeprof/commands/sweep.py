"""`moeprof sweep`: every experiment of a sweep file, in a local process pool, resumable
(docs/sweep.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from moeprof.commands._common import MoeprofError, console, info, progress_bar
from moeprof.formatting import pct

_DRY_RUN_ROWS = 5


def sweep_cmd(
    sweep_file: Path = typer.Argument(..., metavar="FILE", help="Sweep file (.yaml)."),
    out_dir: Path | None = typer.Option(
        None, "--output", "-o", help="Results folder (default: sweep-results/NAME)."
    ),
    workers: int | None = typer.Option(
        None, "--workers", "-w", help="Worker processes (default: every core)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the number of experiments and a few of them; run nothing."
    ),
    force: bool = typer.Option(
        False, "--force", "-f", help="Discard the results already in the folder and run all."
    ),
) -> None:
    """Run a grid of traces x analysis settings x batch sizes; a rerun skips stored results.

    Example: moeprof sweep sweeps/seed.yaml -o out/seed --workers 2
    """
    import json

    from moeprof.sweep import load_sweep, run_sweep, savings_by_batch_size
    from moeprof.sweep.runner import RESULTS_JSONL, RESULTS_PARQUET, pending

    if workers is not None and workers < 1:
        raise MoeprofError(f"--workers must be 1 or more, got {workers}")
    sweep = load_sweep(sweep_file)
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
    with progress_bar(f"sweep {sweep.name}", unit="experiments") as update:
        run = run_sweep(sweep, out, workers=workers, force=force, on_progress=update)
    console.print(
        f"{sweep.name}: {run.total} experiments: {run.ran} run ({run.failed} failed), "
        f"{run.skipped} already stored; {run.seconds:.1f} s"
    )
    table = savings_by_batch_size(list(run.rows))
    if table:
        console.print("batch size  experiments  avg memory savings  max reuse factor")
        for b, (n, mean, best) in table.items():
            console.print(f"{b:>10}  {n:>11}  {pct(mean):>18}  {best:>16.3f}")
    if run.failed:
        first = next(r for r in run.rows if r.get("error") is not None)
        info(f"{run.failed} experiments failed; the first: {first['error']}")
    info(f"rows: {out / RESULTS_JSONL} and {out / RESULTS_PARQUET}")


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep_cmd)
