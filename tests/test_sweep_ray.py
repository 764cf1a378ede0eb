"""The Ray executor (docs/sweep.md, "Executors") on one local Ray runtime shared by the module:
its results and errors against the local pool's, sweep rows identical to the pool's, resume,
Ctrl-C, failures, and a second process joining the runtime by its address."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import local_ray_runtime

from moeprof.executors import get_executor
from moeprof.sweep import load_sweep, parse_sweep, run_sweep

TRACES = Path(__file__).resolve().parent.parent / "traces"
TIMING = ("trace_seconds", "analysis_seconds")

SMALL = """
    name: small
    traces:
      - synth: {experts: [4, 8], top_k: 2, locality: [0.0, 0.7], requests: 3, tokens: 10,
                layers: 2, seed: 5}
    analyses:
      - analyze: {batch_sizes: [1, 4, 64], policy: tokens}
      - cache: {strategy: [lru, belady], cache_experts: [1, 1k], batch_sizes: [2], policy: tokens}
"""


def jsonl(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def by_key_without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(
        ({k: v for k, v in r.items() if k not in TIMING} for r in rows), key=lambda r: r["key"]
    )


@pytest.fixture(scope="module")
def pool_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """SMALL's rows from the local process pool, made before Ray starts its threads (the pool
    forks this process)."""
    folder = tmp_path_factory.mktemp("pool")
    run_sweep(parse_sweep(textwrap.dedent(SMALL), folder / "s.yaml"), folder / "out", workers=2)
    return jsonl(folder / "out")


@pytest.fixture(scope="module")
def ray_runtime(pool_rows: list[dict[str, Any]]) -> Iterator[Any]:
    """One local Ray runtime for the module (starting one takes seconds): every executor below
    finds it initialised, reuses it and leaves it running."""
    with local_ray_runtime() as ray:
        yield ray


def test_ray_results_and_errors_are_the_pools(ray_runtime: Any) -> None:
    items = ["12", "-3", "x", "40"]
    with get_executor("ray") as tasks:
        assert tasks.map(abs, [-5, 0, 7, -2]) == [5, 0, 7, 2]
        with pytest.raises(ValueError) as raised:
            tasks.map(int, items)
        got = dict(tasks.imap_unordered(int, items, return_exceptions=True))
    # The task's own exception, not Ray's wrapper of it.
    assert type(raised.value) is ValueError
    assert str(raised.value) == "invalid literal for int() with base 10: 'x'"
    failed = got.pop(2)
    assert type(failed) is ValueError and str(failed) == str(raised.value)
    assert got == {0: 12, 1: -3, 3: 40}
    assert ray_runtime.is_initialized()  # reused, so not shut down


def test_ray_closing_early_starts_nothing_more(ray_runtime: Any, tmp_path: Path) -> None:
    # A task that leaves a file when it starts, then takes 0.5 s (a shell: nothing from this
    # test module has to be importable on the Ray workers).
    markers = [tmp_path / f"m{i}" for i in range(16)]
    commands = [["sh", "-c", f"touch {m}; sleep 0.5"] for m in markers]
    with get_executor("ray", workers=2) as tasks:
        finished = tasks.imap_unordered(subprocess.call, commands)
        index, code = next(finished)
        finished.close()
    assert code == 0 and markers[index].exists()
    time.sleep(1.0)  # anything still submitted would have started by now
    assert sum(m.exists() for m in markers) <= 2 + 1  # the window of 2, and at most one more


def test_ray_rows_equal_the_pools(
    ray_runtime: Any, pool_rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    run = run_sweep(parse_sweep(textwrap.dedent(SMALL), tmp_path / "s.yaml"), tmp_path / "out",
                    executor="ray")  # fmt: skip
    assert (run.total, run.ran, run.failed, run.skipped) == (28, 28, 0, 0)
    ray_rows = jsonl(tmp_path / "out")
    assert all(isinstance(r[t], float) for r in ray_rows for t in TIMING)
    assert by_key_without_timing(ray_rows) == by_key_without_timing(pool_rows)


def test_ray_resume_runs_nothing_twice_and_ctrl_c_keeps_rows(
    ray_runtime: Any, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(SMALL))

    def stop_after_first_trace(done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(load_sweep(path), out, executor="ray", on_progress=stop_after_first_trace)
    assert len(jsonl(out)) == 7  # one trace's experiments, stored
    rest = run_sweep(load_sweep(path), out, executor="ray")
    assert (rest.ran, rest.skipped) == (21, 7)
    again = run_sweep(load_sweep(path), out, executor="ray")
    assert (again.ran, again.skipped) == (0, 28)
    path.write_text(textwrap.dedent(SMALL.replace("[1, 4, 64]", "[1, 4, 64, 8]")))
    more = run_sweep(load_sweep(path), out, executor="ray")
    assert (more.ran, more.skipped, len(more.rows)) == (4, 28, 32)
    keys = [r["key"] for r in jsonl(out)]
    assert len(keys) == len(set(keys)) == 32


def test_ray_failures_are_rows_and_the_rest_go_on(ray_runtime: Any, tmp_path: Path) -> None:
    (tmp_path / "bad.moe").write_bytes(b"not a trace")
    shutil.copy(TRACES / "mixtral-like.moe", tmp_path / "good.moe")
    path = tmp_path / "broken.yaml"
    path.write_text(
        textwrap.dedent("""
        name: broken
        traces:
          - synth: {experts: [2, 8], top_k: 4, requests: 2, tokens: 8, layers: 1}
          - path: "*.moe"
        analyses:
          - analyze: {batch_sizes: [1, 8]}
    """)
    )
    run = run_sweep(load_sweep(path), tmp_path / "ray", executor="ray")
    assert (run.total, run.ran, run.failed) == (8, 8, 4)
    one = run_sweep(load_sweep(path), tmp_path / "one", workers=1)
    # The same errors, word for word, as in one process (each one line).
    assert by_key_without_timing(list(run.rows)) == by_key_without_timing(list(one.rows))
    errors = {(r.get("trace.experts") or Path(r["trace.path"]).name): r["error"] for r in run.rows}
    assert "top-k" in errors[2] and errors[8] is None and errors["good.moe"] is None
    assert errors["bad.moe"] and "\n" not in errors["bad.moe"]
    again = run_sweep(load_sweep(path), tmp_path / "ray", executor="ray")
    assert (again.ran, again.skipped, again.failed) == (4, 4, 4)  # failures are retried


def test_ray_at_the_command_line(ray_runtime: Any, tmp_path: Path, run_cli) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(SMALL))
    result = run_cli("sweep", path, "-o", tmp_path / "out", "--executor", "ray")
    assert result.exit_code == 0, result.stderr
    assert "28 run (0 failed), 0 already stored" in result.stdout
    assert "WARNING" not in result.stderr and "INFO" not in result.stderr


def test_a_second_process_joins_the_runtime_by_its_address(
    ray_runtime: Any, pool_rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    """`--ray-address`: a new driver connects to a running cluster (this module's runtime), runs
    there and leaves it running."""
    address = ray_runtime.get_runtime_context().gcs_address
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(SMALL))
    command = [sys.executable, "-m", "moeprof", "sweep", str(path), "-o", str(tmp_path / "out"),
               "--executor", "ray", "--ray-address", address]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "28 run (0 failed)" in done.stdout
    assert by_key_without_timing(jsonl(tmp_path / "out")) == by_key_without_timing(pool_rows)
    assert ray_runtime.is_initialized()
    assert ray_runtime.cluster_resources().get("CPU") == 2  # the cluster is still up


def test_pool_rows_are_not_empty(pool_rows: list[dict[str, Any]]) -> None:
    # The comparisons above are only as good as the reference: 28 rows with their numbers.
    assert len(pool_rows) == 28 and all(r["error"] is None for r in pool_rows)
    assert all(
        isinstance(r["memory_savings"], float) for r in pool_rows if r["analysis"] == "analyze"
    )
    assert all(isinstance(r["loads"], int) for r in pool_rows if r["analysis"] == "cache")
