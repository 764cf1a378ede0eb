"""Executors (moeprof/executors/, docs/sweep.md "Executors"): the local process pool against a
plain loop, exceptions, early closing, the registry, and Ray's absence or an unreachable cluster.
Nothing here starts a Ray runtime; the tests that need one are in tests/test_sweep_ray.py."""

from __future__ import annotations

import os
import re
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moeprof import MoeprofError
from moeprof.executors import EXECUTORS, check_executor, get_executor
from moeprof.executors.ray_ import check_reachable
from moeprof.sweep import Experiment, parse_sweep, run_sweep


def square_or_fail(x: int) -> int:
    if x == 3:
        raise ValueError(f"three is refused ({x})")
    return x * x


def mark_then_sleep(marker: Path) -> str:
    """Leaves a file saying the task started, then takes a while."""
    marker.write_text(str(os.getpid()))
    time.sleep(0.3)
    return marker.name


def interrupted(x: int) -> int:
    raise KeyboardInterrupt


# ---------------------------------------------------------------------- local


@pytest.mark.parametrize("workers", [1, 2])
def test_local_map_and_imap_give_every_result_once(workers: int) -> None:
    items = [5, 0, 7, 2, 9, 4]
    with get_executor("local", workers=workers) as pool:
        assert pool.map(abs, [-i for i in items]) == items  # item order, whatever finished first
        got = list(pool.imap_unordered(square_or_fail, [i for i in items if i != 3]))
    assert sorted(got) == sorted((i, x * x) for i, x in enumerate(items))


def test_local_pool_runs_in_other_processes_and_one_worker_in_this_one(tmp_path: Path) -> None:
    markers = [tmp_path / f"m{i}" for i in range(4)]
    with get_executor("local", workers=2) as pool:
        pool.map(mark_then_sleep, markers)
    pids = {int(m.read_text()) for m in markers}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    with get_executor("local", workers=1) as one:
        one.map(mark_then_sleep, markers[:2])
    assert {int(m.read_text()) for m in markers[:2]} == {os.getpid()}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_task_raises_its_own_exception_or_is_returned(workers: int) -> None:
    with get_executor("local", workers=workers) as pool:
        with pytest.raises(ValueError, match=r"^three is refused \(3\)$"):
            pool.map(square_or_fail, [1, 2, 3, 4])
        got = dict(pool.imap_unordered(square_or_fail, [1, 2, 3, 4], return_exceptions=True))
    failed = got.pop(2)
    assert type(failed) is ValueError and str(failed) == "three is refused (3)"
    assert got == {0: 1, 1: 4, 3: 16}  # the others went on


def test_keyboard_interrupt_in_a_task_is_never_returned_as_a_result() -> None:
    with get_executor("local", workers=1) as pool, pytest.raises(KeyboardInterrupt):
        list(pool.imap_unordered(interrupted, [1, 2], return_exceptions=True))


def test_closing_early_starts_nothing_more(tmp_path: Path) -> None:
    markers = [tmp_path / f"m{i}" for i in range(24)]
    start = time.perf_counter()
    with get_executor("local", workers=2) as pool:
        finished = pool.imap_unordered(mark_then_sleep, markers)
        next(finished)
        finished.close()
    # Two processes, 0.3 s a task: all 24 would take 3.6 s. The first result comes after 0.3 s;
    # closing waits for the tasks running and the few the pool had already queued to its
    # processes (max_workers + 1), cancelling the rest.
    assert time.perf_counter() - start < 2.5
    assert sum(m.exists() for m in markers) <= 2 + 3 + 1


def test_registry_names_and_bad_arguments() -> None:
    assert EXECUTORS == ("local", "ray")
    with pytest.raises(MoeprofError, match=r"^unknown executor 'dask'; choose one of local, ray$"):
        get_executor("dask")
    for bad in (0, -1, True, 1.5):
        with pytest.raises(MoeprofError, match="workers must be 1 or more"):
            get_executor("local", workers=bad)  # type: ignore[arg-type]
    with pytest.raises(MoeprofError, match="address is only for the ray executor"):
        get_executor("local", address="10.0.0.1:6379")


# ---------------------------------------------------------------------- without Ray


SMALL = """
    name: small
    traces:
      - synth: {experts: [4, 8], top_k: 2, requests: 3, tokens: 10, layers: 2, seed: 5}
    analyses:
      - analyze: {batch_sizes: [1, 4], policy: tokens}
"""


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import ray` fails, as where the extra is not installed."""
    monkeypatch.setitem(sys.modules, "ray", None)


def test_ray_missing_is_one_clear_error(no_ray: None) -> None:
    with pytest.raises(
        MoeprofError, match=r"the ray executor needs Ray .*pip install 'moeprof\[ray\]'"
    ):
        check_executor("ray")
    with pytest.raises(MoeprofError, match="needs Ray"):
        get_executor("ray", workers=2)


def test_ray_missing_at_the_command_line_runs_nothing(
    no_ray: None, tmp_path: Path, run_cli
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(SMALL))
    out = tmp_path / "out"
    result = run_cli("sweep", path, "-o", out, "--executor", "ray")
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert re.fullmatch(
        r"moeprof: error: the ray executor needs Ray \(.+\): pip install 'moeprof\[ray\]'", line
    )
    assert not out.exists()
    # --force must not cost the stored rows either.
    run_sweep(parse_sweep(textwrap.dedent(SMALL), path), out, workers=1)
    before = (out / "results.jsonl").read_bytes()
    forced = run_cli("sweep", path, "-o", out, "--executor", "ray", "--force")
    assert forced.exit_code == 2 and (out / "results.jsonl").read_bytes() == before


def test_bad_executor_options_at_the_command_line(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(SMALL))
    for args, message in [
        (("--executor", "dask"), "unknown executor 'dask'; choose one of local, ray"),
        (("--ray-address", "10.0.0.1:6379"), "--ray-address is only for --executor ray"),
    ]:
        result = run_cli("sweep", path, "-o", tmp_path / "out", *args)
        assert result.exit_code == 2 and result.stdout == ""
        assert result.stderr.splitlines() == [f"moeprof: error: {message}"]
    assert not (tmp_path / "out").exists()


def test_failed_tasks_become_error_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A task that dies (a worker killed, a node lost) leaves its experiments as error rows, under
    the keys and columns a finished task would have; a rerun retries them (simulated in one
    process)."""
    from moeprof.sweep import runner

    sweep = parse_sweep(textwrap.dedent(SMALL), tmp_path / "s.yaml")
    real = runner.run_source

    def dies_on_experts_8(name: str, experiments: list[Experiment]) -> list[dict[str, object]]:
        if dict(experiments[0].source.params)["experts"] == 8:
            raise RuntimeError("worker died\nwith a long story")
        return real(name, experiments)

    monkeypatch.setattr(runner, "run_source", dies_on_experts_8)
    run = run_sweep(sweep, tmp_path / "out", workers=1)
    assert (run.ran, run.failed) == (4, 2)
    failed = [r for r in run.rows if r["error"] is not None]
    assert {r["error"] for r in failed} == {"RuntimeError: worker died with a long story"}
    assert {r["trace.experts"] for r in failed} == {8}
    ok_columns = {k for r in run.rows if r["error"] is None for k in r}
    metrics = {"memory_savings", "unique", "max_reuse_factor"}
    assert all(ok_columns - set(r) >= metrics and set(r) - ok_columns == set() for r in failed)
    assert all({"policy", "batch_size", "trace.seed", "trace_seconds"} <= set(r) for r in failed)
    assert {r["key"] for r in run.rows} == {e.key for e in sweep.experiments}
    monkeypatch.setattr(runner, "run_source", real)
    again = run_sweep(sweep, tmp_path / "out", workers=1)
    assert (again.ran, again.skipped, again.failed) == (2, 2, 0)


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_cluster_is_refused_in_seconds() -> None:
    address = f"127.0.0.1:{_closed_port()}"
    start = time.perf_counter()
    with pytest.raises(MoeprofError, match=rf"^cannot reach a Ray cluster at {address}: "):
        check_reachable(address)
    assert time.perf_counter() - start < 6  # Ray's own retries would take minutes
    for bad in ("nowhere", "host:port", "10.0.0.1"):
        with pytest.raises(MoeprofError, match="is not HOST:PORT"):
            check_reachable(bad)


def test_an_unreachable_cluster_at_the_command_line(tmp_path: Path, run_cli) -> None:
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()  # else the executor would reuse it and ignore the address
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(SMALL))
    address = f"127.0.0.1:{_closed_port()}"
    result = run_cli(
        "sweep", path, "-o", tmp_path / "out", "--executor", "ray", "--ray-address", address
    )
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"moeprof: error: cannot reach a Ray cluster at {address}: ")
    assert not ray.is_initialized()
    assert not (tmp_path / "out" / "results.jsonl").exists()
