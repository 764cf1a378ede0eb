"""Running a sweep: experiments grouped by trace (each trace made or read once), run on an
executor (a local process pool or Ray tasks, moeprof/executors/), rows appended to
`results.jsonl` as they finish, `results.parquet` at the end (docs/sweep.md, "Running")."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprof._version import __version__
from moeprof.errors import MoeprofError, one_line
from moeprof.executors import Executor, check_executor, get_executor
from moeprof.executors.base import check_workers
from moeprof.sweep.analyses import REGISTRY
from moeprof.sweep.spec import Experiment, Sweep, TraceSource, synth_kwargs
from moeprof.trace import Trace

RESULTS_JSONL = "results.jsonl"
RESULTS_PARQUET = "results.parquet"


def trace_digest(trace: Trace) -> str:
    """sha256 of the routing a trace holds (what every analysis reads)."""
    h = hashlib.sha256()
    for array in (trace.expert_ids, trace.request_ids, trace.positions, trace.n_experts,
                  trace.expert_bytes, trace.steps, trace.phase):  # fmt: skip
        if array is not None:
            h.update(str((array.dtype, array.shape)).encode())
            h.update(array.tobytes())
    return h.hexdigest()


def _one_line(exc: BaseException) -> str:
    text = one_line(exc)
    return text if isinstance(exc, MoeprofError) else f"{type(exc).__name__}: {text}"


def make_trace(source: TraceSource) -> Trace:
    if source.kind == "path":
        from moeprof.trace import load_trace

        return load_trace(dict(source.params)["path"])
    from moeprof.synth import synthesize

    return synthesize(**synth_kwargs(dict(source.params)))


def run_source(sweep_name: str, experiments: list[Experiment]) -> list[dict[str, Any]]:
    """Rows of `experiments` (all on one trace): the trace once, each analysis setting once over
    its batch sizes. A failure becomes its experiments' rows with the one-line error."""
    base = {"sweep": sweep_name, "moeprof_version": __version__}
    start = time.perf_counter()
    try:
        trace = make_trace(experiments[0].source)
        digest: str | None = trace_digest(trace)
        trace_error = None
    except Exception as exc:  # any failure is this trace's experiments' row, not the sweep's end
        trace, digest, trace_error = None, None, _one_line(exc)
    trace_seconds = time.perf_counter() - start
    groups: dict[tuple[Any, ...], list[Experiment]] = {}
    for e in experiments:
        groups.setdefault((e.analysis, e.settings), []).append(e)
    rows = []
    for (analysis, settings), group in groups.items():
        start = time.perf_counter()
        metrics: dict[int, dict[str, Any]] = {}
        error = trace_error
        if trace is not None:
            try:
                sizes = sorted(e.batch_size for e in group)
                metrics = REGISTRY[analysis].run(trace, dict(settings), sizes)
            except Exception as exc:  # recorded on the row; the sweep goes on
                error = _one_line(exc)
        seconds = time.perf_counter() - start
        for e in group:
            row = base | e.columns() | {"trace_hash": digest or e.source.file_hash}
            found = metrics.get(e.batch_size)
            if error is None and found is None:
                error = f"{analysis} returned no row for batch size {e.batch_size}"
            row |= (found or {}) | {
                "error": error if found is None else None,
                "trace_seconds": trace_seconds,
                "analysis_seconds": seconds,
                "analysis_batch_sizes": len(group),
            }
            rows.append(row)
    return rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a results.jsonl; a last line cut short by an interruption is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def latest_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per key: the last stored (a retried failure replaces its error row)."""
    by_key: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_key.pop(row["key"], None)
        by_key[row["key"]] = row
    return list(by_key.values())


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {n: [r.get(n) for r in rows] for n in names}
    for name, values in columns.items():
        # A setting spelled both ways ('cache_experts: [2, 1k]') is text in the table.
        kinds = {str if isinstance(v, str) else bool if isinstance(v, bool) else float
                 for v in values if v is not None}  # fmt: skip
        if len(kinds) > 1:
            columns[name] = [None if v is None else str(v) for v in values]
    table = pa.table(columns)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class SweepRun:
    total: int
    skipped: int  # already stored
    ran: int
    failed: int
    rows: tuple[dict[str, Any], ...]  # every stored row of this sweep, one per key
    seconds: float


def pending(sweep: Sweep, out_dir: Path) -> tuple[list[Experiment], int]:
    """Experiments not yet stored without error in `out_dir`, and how many are."""
    done = {
        r["key"] for r in latest_rows(read_rows(out_dir / RESULTS_JSONL)) if r.get("error") is None
    }
    todo = [e for e in sweep.experiments if e.key not in done]
    return todo, len(sweep.experiments) - len(todo)


def _by_source(experiments: list[Experiment]) -> list[list[Experiment]]:
    groups: dict[TraceSource, list[Experiment]] = {}
    for e in experiments:
        groups.setdefault(e.source, []).append(e)
    return list(groups.values())


def failed_rows(sweep_name: str, experiments: list[Experiment], error: str) -> list[dict[str, Any]]:
    """Rows of experiments whose task died before it could make them (a worker killed, a node
    lost): each with the one-line error, retried by the next run like any failure."""
    base = {"sweep": sweep_name, "moeprof_version": __version__}
    return [
        base
        | e.columns()
        | {
            "trace_hash": e.source.file_hash,
            "error": error,
            "trace_seconds": None,
            "analysis_seconds": None,
            "analysis_batch_sizes": None,
        }  # fmt: skip
        for e in experiments
    ]


def _results(
    sweep: Sweep, tasks: list[list[Experiment]], executor: Executor
) -> Generator[list[dict[str, Any]], None, None]:
    """Each task's rows as it finishes, on `executor`; stopping early starts nothing more."""
    finished = executor.imap_unordered(
        functools.partial(run_source, sweep.name), tasks, return_exceptions=True
    )
    with contextlib.closing(finished):
        for index, rows in finished:
            if isinstance(rows, Exception):
                rows = failed_rows(sweep.name, tasks[index], _one_line(rows))
            yield rows


def run_sweep(
    sweep: Sweep,
    out_dir: Path,
    *,
    workers: int | None = None,
    executor: str = "local",
    address: str | None = None,
    force: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> SweepRun:
    """Run the experiments `out_dir` does not hold yet (all of them with `force`) on `executor`
    (`local`: a process pool of `workers`, default every core; `ray`: Ray tasks on the cluster at
    `address`, or on a local Ray runtime of `workers` CPUs), appending each finished trace's rows
    to results.jsonl, then write results.parquet (also when interrupted)."""
    # Refused before any file is touched (a missing Ray must not cost a --force'd folder).
    check_executor(executor)
    if workers is not None:
        check_workers(workers)
    if executor != "ray" and address is not None:
        raise MoeprofError("address is only for the ray executor")
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / RESULTS_JSONL
    if force:
        jsonl.unlink(missing_ok=True)
        (out_dir / RESULTS_PARQUET).unlink(missing_ok=True)
    todo, skipped = pending(sweep, out_dir)
    tasks = _by_source(todo)
    done = failed = 0
    if on_progress is not None:
        on_progress(0, len(todo))
    try:
        if tasks:
            # A local pool has no use for more processes than traces; a cluster sizes itself.
            sized = workers if executor == "ray" else min(check_workers(workers), len(tasks))
            with (
                get_executor(executor, workers=sized, address=address) as runner,
                jsonl.open("a", encoding="utf-8") as sink,
                # Closed first on Ctrl-C or an error: tasks not started are cancelled.
                contextlib.closing(_results(sweep, tasks, runner)) as results,
            ):
                for rows in results:
                    for row in rows:
                        sink.write(json.dumps(row, default=str) + "\n")
                    sink.flush()  # finished rows survive Ctrl-C and crashes
                    done += len(rows)
                    failed += sum(r["error"] is not None for r in rows)
                    if on_progress is not None:
                        on_progress(done, len(todo))
    finally:
        keys = {e.key for e in sweep.experiments}
        stored = [r for r in latest_rows(read_rows(jsonl)) if r["key"] in keys]
        if stored:
            write_parquet(stored, out_dir / RESULTS_PARQUET)
    return SweepRun(
        total=len(sweep.experiments),
        skipped=skipped,
        ran=done,
        failed=failed,
        rows=tuple(stored),
        seconds=time.perf_counter() - start,
    )
