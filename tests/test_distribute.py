"""Distributed `analyze` and `cache` over a sharded trace (moeprof.distribute): on the local
process pool and on Ray tasks, results equal the in-process analysis of the merged trace field
for field, and the counts equal per-batch Python sets and a plain-Python cache simulation.

Process pools fork this process, so every test that starts one runs before the module's Ray
runtime starts (the Ray tests are last, behind a fixture that runs the pool first)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import local_ray_runtime, reference_loads

import moeprof
from moeprof.batching import get_policy
from moeprof.cache import simulate_cache
from moeprof.distribute import analyze_sharded, cache_sharded
from moeprof.errors import MoeprofError
from moeprof.executors import Executor, get_executor
from moeprof.shards import Shards, open_shards
from moeprof.trace import PHASE_DECODE, PHASE_PREFILL, Trace, load_trace

POLICIES = ("tokens", "decode", "recorded", "serve")
SIZES = (1, 2, 3, 8, 64)
# Uneven shards: one of a single row, one cut inside a request.
CUTS = (0, 1, 57, 58, 190)
CACHE_STRATEGIES = ("naive", "dedup", "lru", "lfu", "static", "belady")
CACHE_CAPS = (2, 5)


def fleet_trace(seed: int = 0) -> Trace:
    """Requests of uneven lengths stored request after request, each with a short prefill then
    decode steps (a step per position after its arrival), sentinels (empty slots) and expert
    counts over 64 (several bitset words)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 30, 16)
    lengths[[2, 9]] = 70  # two long requests: decode steps pair them with many others
    requests = np.repeat(np.arange(lengths.shape[0]), lengths)
    positions = np.concatenate([np.arange(n) for n in lengths])
    arrival = np.repeat(rng.integers(0, 20, lengths.shape[0]), lengths)
    n_tokens = requests.shape[0]
    n_experts = (70, 9, 130)
    top_k = 3
    ids = np.empty((n_tokens, len(n_experts), top_k), dtype=np.uint16)
    for layer, e in enumerate(n_experts):
        # Skewed popularity: batches share experts, so dedup and caches have work to do.
        chosen = np.argsort(rng.random((n_tokens, e)) * (1 + np.arange(e)), axis=1)[:, :top_k]
        empty = rng.random((n_tokens, top_k)) < 0.1
        ids[:, layer, :] = np.where(empty, e, chosen)
    return Trace.from_arrays(
        ids,
        n_experts=list(n_experts),
        request_ids=requests,
        positions=positions,
        steps=arrival + positions,
        phase=np.where(positions < 3, PHASE_PREFILL, PHASE_DECODE),
        expert_bytes=[1000 + i for i in range(len(n_experts))],
    )


def write_shards(folder: Path, trace: Trace, cuts: tuple[int, ...] = CUTS) -> Shards:
    bounds = [*cuts, trace.n_tokens]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        keep = np.zeros(trace.n_tokens, dtype=bool)
        keep[a:b] = True
        trace.without_tokens(~keep).save(folder / f"rank-{i}.moe")
    return open_shards(folder)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Shards:
    return write_shards(tmp_path_factory.mktemp("fleet"), fleet_trace())


@pytest.fixture(scope="module")
def merged(shards: Shards) -> Trace:
    return shards.to_trace()


def sets_per_layer(trace: Trace, batches: list[list[int]]) -> tuple[list[int], list[int]]:
    """Requests and Σ distinct experts per layer, from Python sets, batch by batch."""
    ids = trace.expert_ids.tolist()
    empty = trace.n_experts.tolist()
    requests = [0] * trace.n_layers
    unique = [0] * trace.n_layers
    for rows in batches:
        for layer in range(trace.n_layers):
            routed = [e for row in rows for e in ids[row][layer] if e != empty[layer]]
            requests[layer] += len(routed)
            unique[layer] += len(set(routed))
    return requests, unique


def spanning_batches(shards: Shards, trace: Trace, policy: str, size: int) -> int:
    plan = get_policy(policy).plan(trace, size)
    shard_of = [
        set(np.searchsorted(shards.bounds, plan.rows(b), side="right").tolist())
        for b in range(plan.n_batches)
    ]
    return sum(len(s) > 1 for s in shard_of)


def analyze_all(shards: Shards, executor: Executor, chunk: int | None) -> dict[str, list[dict]]:
    return {
        policy: analyze_sharded(shards, SIZES, policy, executor, chunk_tokens=chunk).to_dict()
        for policy in POLICIES
    }


def cache_all(shards: Shards, executor: Executor) -> dict[tuple[str, str], dict]:
    out = {}
    for policy in ("decode", "tokens"):
        for phase in ("all", "decode"):
            out[policy, phase] = cache_sharded(
                shards, CACHE_STRATEGIES, CACHE_CAPS, (1, 4), policy, executor, phase=phase
            ).to_dict()
    return out


def in_process_cache(merged: Trace, policy: str, phase: str) -> dict:
    return simulate_cache(
        merged, CACHE_STRATEGIES, CACHE_CAPS, (1, 4), policy, phase=phase
    ).to_dict()


# ---------------------------------------------------------------------- the test data


def test_the_data_has_batches_that_span_shards(shards: Shards, merged: Trace) -> None:
    assert np.diff(shards.bounds).tolist() == [1, 56, 1, 132, merged.n_tokens - 190]
    for size in (2, 8):
        assert spanning_batches(shards, merged, "decode", size) >= 10
    assert spanning_batches(shards, merged, "serve", 8) >= 1
    # Recorded steps never mix two shards (shards number their steps apart).
    assert spanning_batches(shards, merged, "recorded", 0) == 0


# ---------------------------------------------------------------------- local executor


def test_local_pool_equals_the_merged_trace_and_python_sets(shards: Shards, merged: Trace) -> None:
    want = {p: moeprof.analyze(merged, SIZES, policy=p).to_dict() for p in POLICIES}
    with get_executor("local", workers=2) as pool:
        for chunk in (None, 5, 0):  # whole shards, and shards read in chunks inside their task
            assert analyze_all(shards, pool, chunk) == want, chunk
    for policy in POLICIES:
        plans = get_policy(policy).plans(merged, list(SIZES))
        for plan, row in zip(plans, want[policy]["results"]):
            batches = [plan.rows(b).tolist() for b in range(plan.n_batches)]
            requests, unique = sets_per_layer(merged, batches)
            assert [layer["requests"] for layer in row["layers"]] == requests
            assert [layer["unique"] for layer in row["layers"]] == unique


def test_in_process_executor_and_progress(shards: Shards, merged: Trace) -> None:
    seen: list[tuple[int, int]] = []
    with get_executor("local", workers=1) as one:
        got = analyze_sharded(
            shards, (4,), "decode", one, on_progress=lambda d, t: seen.append((d, t))
        )
    assert got.to_dict() == moeprof.analyze(merged, (4,), policy="decode").to_dict()
    assert seen == [(i, shards.n_shards) for i in range(1, shards.n_shards + 1)]


def test_local_pool_cache_equals_simulate_cache_and_reference(
    shards: Shards, merged: Trace
) -> None:
    with get_executor("local", workers=2) as pool:
        got = cache_all(shards, pool)
        warm_access = cache_sharded(
            shards, ("lru", "belady"), (3,), (2,), "decode", pool, warm=True, count="access"
        ).to_dict()
    for (policy, phase), doc in got.items():
        assert doc == in_process_cache(merged, policy, phase), (policy, phase)
    assert (
        warm_access
        == simulate_cache(
            merged, ("lru", "belady"), (3,), (2,), "decode", warm=True, count="access"
        ).to_dict()
    )
    # Loads against the plain-Python cache simulation (cold, counted per batch).
    plan = get_policy("decode").plan(merged, 4)
    batches = [plan.rows(b).tolist() for b in range(plan.n_batches)]
    rows = got["decode", "all"]["results"]
    for name in ("lru", "lfu", "static", "belady"):
        for cap in CACHE_CAPS:
            (row,) = [
                r
                for r in rows
                if (r["strategy"], r["batch_size"], r["cache_experts"]) == (name, 4, cap)
            ]
            for layer in range(merged.n_layers):
                issued = reference_loads(merged, batches, name, layer, cap)
                loads = sum(copied for batch in issued for _, copied, _ in batch)
                assert row["layers"][layer]["loads"] == loads, (name, cap, layer)


def test_single_file_is_one_task(tmp_path: Path) -> None:
    trace = fleet_trace(3)
    trace.save(tmp_path / "one.moe")
    single = open_shards(tmp_path / "one.moe")
    seen: list[tuple[int, int]] = []
    with get_executor("local", workers=2) as pool:
        got = analyze_sharded(
            single, (2, 8), "decode", pool, on_progress=lambda d, t: seen.append((d, t))
        )
    assert got.to_dict() == moeprof.analyze(trace, (2, 8), policy="decode").to_dict()
    assert seen == [(1, 1)]


def test_refusals(shards: Shards) -> None:
    with get_executor("local", workers=1) as one:
        with pytest.raises(MoeprofError, match="budget 'global'"):
            cache_sharded(shards, ("lru",), (2,), (1,), "decode", one, budget="global")
        with pytest.raises(MoeprofError, match="chunk_tokens"):
            analyze_sharded(shards, (1,), "tokens", one, chunk_tokens=-1)
        with pytest.raises(MoeprofError, match="batch size"):
            analyze_sharded(shards, (0,), "tokens", one)


def test_a_file_rewritten_after_planning_is_refused(tmp_path: Path) -> None:
    opened = write_shards(tmp_path, fleet_trace(4), cuts=(0, 90))
    other = fleet_trace(5)
    keep = np.zeros(other.n_tokens, dtype=bool)
    keep[:30] = True
    other.without_tokens(~keep).save(opened.paths[1])  # fewer rows than planned
    with get_executor("local", workers=1) as one:
        with pytest.raises(MoeprofError, match="changed after the run was planned"):
            analyze_sharded(opened, (2,), "decode", one)
        with pytest.raises(MoeprofError, match="changed after the run was planned"):
            cache_sharded(opened, ("lru",), (2,), (2,), "decode", one)


def test_a_same_size_rewrite_after_a_run_is_not_served_from_the_worker_cache(
    tmp_path: Path,
) -> None:
    """Layer tasks keep the shards open between tasks; a file rewritten with other routing of
    the same shape (same size, same tokens) must be read again, not served from that cache."""
    opened = write_shards(tmp_path, fleet_trace(4), cuts=(0, 90))
    with get_executor("local", workers=1) as one:  # in-process: the cache is this process's
        first = cache_sharded(opened, ("lru",), (2,), (2,), "decode", one)
        original = load_trace(opened.paths[1])
        ids = np.array(original.expert_ids)
        n_exp = original.n_experts.astype(ids.dtype)[None, :, None]
        routed = ids != n_exp
        rotated = np.where(routed, (ids.astype(np.int64) + 1) % n_exp, ids).astype(ids.dtype)
        Trace(
            expert_ids=rotated,
            request_ids=np.array(original.request_ids),
            positions=np.array(original.positions),
            steps=None if original.steps is None else np.array(original.steps),
            phase=None if original.phase is None else np.array(original.phase),
            n_experts=original.n_experts,
            expert_bytes=original.expert_bytes,
            meta=original.meta,
        ).save(opened.paths[1])
        reopened = open_shards(list(opened.paths))
        second = cache_sharded(reopened, ("lru",), (2,), (2,), "decode", one)
        expected = simulate_cache(reopened.to_trace(), ("lru",), (2,), (2,), "decode")
    assert second.to_dict() == expected.to_dict()
    assert second.to_dict() != first.to_dict()


# ---------------------------------------------------------------------- the command line


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_cli_executor_output_equals_in_process(tmp_path: Path, shards: Shards, run_cli) -> None:
    folder = shards.paths[0].parent
    for verb, extra in (
        ("analyze", ["-b", "1,4,16", "-p", "decode"]),
        ("cache", ["-C", "0,2", "-b", "1,4", "-p", "decode", "--gpu-memory", "40000"]),
    ):
        docs = []
        for run in ([], ["--executor", "local", "--workers", "2"]):
            out = tmp_path / f"{verb}-{len(run)}.json"
            res = run_cli(verb, folder, *extra, *run, "--json", out)
            assert res.exit_code == 0, res.stderr
            docs.append(_json(out))
        assert docs[0] == docs[1], verb


@pytest.mark.parametrize("verb", ("analyze", "cache"))
@pytest.mark.parametrize(
    ("args", "words"),
    (
        (["--executor", "ray"], "needs Ray"),
        (["--ray-address", "10.0.0.1:6379"], "--ray-address is only for --executor ray"),
        (["--executor", "local", "--ray-address", "auto"], "only for --executor ray"),
        (["--executor", "local", "--workers", "0"], "--workers must be 1 or more"),
        (["--workers", "2"], "--workers goes with --executor"),
        (["--executor", "dask"], "unknown executor"),
    ),
)
def test_cli_executor_options_refused_before_reading(
    tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch, verb: str, args: list[str], words: str
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    out = tmp_path / "o.json"
    # The trace does not exist: the options are refused before anything is read.
    res = run_cli(verb, tmp_path / "missing.moe", *args, "--json", out)
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and words in res.stderr, res.stderr
    assert not out.exists()


def test_cli_cache_refuses_global_budget_and_prefetch(
    tmp_path: Path, shards: Shards, run_cli
) -> None:
    for extra in (["--budget", "global"], ["--prefetch", "prev-token"]):
        res = run_cli("cache", shards.paths[0], "--executor", "local", *extra)
        assert res.exit_code == 2
        assert res.stderr.count("\n") == 1 and "per-layer budget" in res.stderr


def _delete_after_planning(monkeypatch: pytest.MonkeyPatch, victim: int) -> None:
    """Delete shard `victim` right after the driver lists the files for its tasks."""
    import moeprof.distribute as distribute

    listed = distribute.shard_files

    def files_then_delete(shards: Shards) -> Any:
        files = listed(shards)
        Path(files[victim].path).unlink()
        return files

    monkeypatch.setattr(distribute, "shard_files", files_then_delete)


@pytest.mark.parametrize("verb", ("analyze", "cache"))
def test_cli_worker_error_is_one_line(
    tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch, verb: str
) -> None:
    write_shards(tmp_path, fleet_trace(6), cuts=(0, 50, 120))
    _delete_after_planning(monkeypatch, 1)
    out = tmp_path / "out.json"
    res = run_cli(verb, tmp_path, "--executor", "local", "--workers", "2", "--json", out)
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1, res.stderr
    assert "rank-1.moe not found where its task ran" in res.stderr
    assert not out.exists()


# ---------------------------------------------------------------------- Ray (last: see above)


@pytest.fixture(scope="module")
def pool_results(shards: Shards) -> dict[str, Any]:
    """The local pool's results, made before Ray starts its threads (the pool forks)."""
    with get_executor("local", workers=2) as pool:
        return {"analyze": analyze_all(shards, pool, 7), "cache": cache_all(shards, pool)}


@pytest.fixture(scope="module")
def ray_runtime(pool_results: dict[str, Any]) -> Iterator[Any]:
    """One local Ray runtime for the module: every executor below reuses it."""
    with local_ray_runtime() as ray:
        yield ray


def test_ray_equals_the_merged_trace(
    ray_runtime: Any, shards: Shards, merged: Trace, pool_results: dict[str, Any]
) -> None:
    with get_executor("ray") as tasks:
        analyzed = analyze_all(shards, tasks, 7)
        cached = cache_all(shards, tasks)
    assert analyzed == {p: moeprof.analyze(merged, SIZES, policy=p).to_dict() for p in POLICIES}
    for key, doc in cached.items():
        assert doc == in_process_cache(merged, *key), key
    assert analyzed == pool_results["analyze"] and cached == pool_results["cache"]


def test_ray_worker_error_is_the_tasks_one_line(
    ray_runtime: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = write_shards(tmp_path, fleet_trace(7), cuts=(0, 40))
    _delete_after_planning(monkeypatch, 0)
    with get_executor("ray") as tasks:
        with pytest.raises(MoeprofError, match="rank-0.moe not found where its task ran"):
            analyze_sharded(opened, (2,), "decode", tasks)
