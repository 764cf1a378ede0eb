"""`analyze` and `cache` of a sharded trace on an executor: a map over shards (or layers) run by
worker processes or Ray tasks, and a reduce of exact counts on the driver (docs/scale.md,
"Distributed runs"). Results equal the in-process ones field for field.

- :func:`analyze_sharded`: one task per shard file. A task opens its file by path, reads it in
  chunks, maps each chunk (:func:`moeprof.stream.map_range`) and merges them
  (:func:`moeprof.stream.merge`) with a window of each plan's index that covers only its rows
  (:meth:`moeprof.stream.PlanIndex.window`). It returns one :class:`moeprof.stream.Partial`: the
  counts of the batches complete in the shard, and the batches that span shards as sets of
  experts. The driver merges the partials in row order as they arrive (holding out-of-order ones
  back) and finishes once.
- :func:`cache_sharded`: one task per MoE layer (under the per-layer budget each layer's
  retention is independent of the others). A task opens the shard files by path, plans the
  batches from their per-token columns, reads its layer's expert ids and simulates every batch
  size, strategy and capacity (:func:`moeprof.cache.count_layer`); the driver assembles the
  :class:`moeprof.cache.CacheResult`.

Tasks carry file paths, never expert ids: every worker must read the shard files at the same
absolute path (a shared file system on a cluster). A task checks that its files still hold what
the driver planned (size and token count) and fails with one line otherwise.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from moeprof.analyze import AnalysisResult, analyze
from moeprof.batching import check_batch_sizes, get_policy
from moeprof.cache import (
    DEFAULT_CACHE_STRATEGIES,
    CacheResult,
    LayerCounts,
    check_cache_settings,
    count_layer,
    layer_plans,
    layers_result,
)
from moeprof.errors import MoeprofError, one_line
from moeprof.executors import Executor
from moeprof.shards import Shards
from moeprof.stream import (
    Partial,
    PlanIndex,
    check_chunk_tokens,
    default_chunk_tokens,
    finish,
    map_range,
    merge,
    plan_indexes,
    streams,
)
from moeprof.trace import Trace, load_trace

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ShardFile:
    """A shard as a task finds it: its absolute path and what the driver read there."""

    path: str
    n_bytes: int
    n_tokens: int
    # A rewrite of the same size (a new trace of the same shape) changes the modification time.
    mtime_ns: int


def shard_files(shards: Shards) -> tuple[ShardFile, ...]:
    """The shard files of `shards` by absolute path (workers may run in another folder)."""
    files = []
    for p, trace in zip(shards.paths, shards.traces):
        n_bytes, mtime_ns = _file_stamp(p)
        files.append(ShardFile(str(Path(p).resolve()), n_bytes, trace.n_tokens, mtime_ns))
    return tuple(files)


def _file_stamp(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a shard file where the task runs."""
    try:
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime_ns
    except FileNotFoundError:
        raise MoeprofError(
            f"shard file {path} not found where its task ran ({socket.gethostname()}); every "
            "worker must read the shard files at the same path"
        ) from None
    except OSError as exc:
        raise MoeprofError(f"shard file {path} cannot be read: {exc.strerror or exc}") from None


def _check_unchanged(file: ShardFile, n_tokens: int | None = None) -> None:
    size, mtime_ns = _file_stamp(file.path)
    if (
        size != file.n_bytes
        or mtime_ns != file.mtime_ns
        or (n_tokens is not None and n_tokens != file.n_tokens)
    ):
        raise MoeprofError(
            f"shard file {file.path} changed after the run was planned ({size:,} bytes, planned "
            f"{file.n_bytes:,}; modified since); run again"
        )


def _open_file(file: ShardFile) -> Trace:
    _check_unchanged(file)
    trace = load_trace(file.path)
    _check_unchanged(file, trace.n_tokens)
    return trace


@functools.lru_cache(maxsize=1)
def _cached_shards(files: tuple[ShardFile, ...]) -> Shards:
    shards = Shards([Path(f.path) for f in files])
    for file, trace in zip(files, shards.traces):
        _check_unchanged(file, trace.n_tokens)
    return shards


def _open_shards(files: tuple[ShardFile, ...]) -> Shards:
    """The shards as one trace, opened once per worker process for all the layer tasks it runs
    (opening checks every file: a full read); a file deleted or rewritten since is refused."""
    for file in files:
        _check_unchanged(file)
    return _cached_shards(files)


def _run(
    executor: Executor,
    fn: Callable[[T], R],
    tasks: Sequence[T],
    on_progress: Callable[[int, int], None] | None,
) -> Iterator[R]:
    """Each task's result as it finishes (any order); ``on_progress(tasks done, tasks)`` after
    each. A task's MoeprofError ends the run as it is; any other failure (a worker lost, out of
    memory) as one line naming it."""
    iterator = executor.imap_unordered(fn, tasks)
    done = 0
    try:
        while True:
            try:
                _, result = next(iterator)
            except StopIteration:
                return
            except MoeprofError:
                raise
            except Exception as exc:
                raise MoeprofError(
                    f"a {executor.name} task failed: {type(exc).__name__}: {one_line(exc)}"
                ) from None
            done += 1
            yield result
            if on_progress is not None:
                on_progress(done, len(tasks))
    finally:  # an error or the caller stopping: nothing more starts
        iterator.close()


# ---------------------------------------------------------------------- analyze


@dataclass(frozen=True)
class ShardTask:
    """One shard's map: its file, where its rows start in the logical trace, and what its rows
    need of each plan's index."""

    file: ShardFile
    start: int
    n_experts: np.ndarray
    top_k: int
    indexes: tuple[PlanIndex, ...]  # windows of rows [start, start + file.n_tokens)
    chunk: int  # rows read and mapped at a time


def map_shard(task: ShardTask) -> Partial:
    """The partial of one shard's rows, read from its file by path `task.chunk` rows at a time
    (memory bounded by the chunk and the batches left open)."""
    trace = _open_file(task.file)
    if trace.top_k != task.top_k or not np.array_equal(trace.n_experts, task.n_experts):
        raise MoeprofError(f"shard file {task.file.path} changed after the run was planned")
    whole: Partial | None = None
    n = trace.n_tokens
    for lo in range(0, n, task.chunk):
        hi = min(lo + task.chunk, n)
        ids = np.array(trace.expert_ids[lo:hi])
        trace.release()
        part = map_range(task.start + lo, task.start + hi, ids, task.n_experts, task.indexes)
        del ids
        whole = part if whole is None else merge(whole, part, task.indexes, task.top_k)
    assert whole is not None  # tasks are made for shards with rows only
    return whole


def analyze_sharded(
    shards: Shards,
    batch_sizes: Iterable[int],
    policy: str,
    executor: Executor,
    *,
    chunk_tokens: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> AnalysisResult:
    """:func:`moeprof.analyze.analyze` of the logical trace of `shards`, one task per shard file
    on `executor` (the caller owns it). Tasks read their shard `chunk_tokens` rows at a time
    (None: :func:`moeprof.stream.default_chunk_tokens`; 0: the whole shard at once).
    ``on_progress(tasks done, tasks)``. Traces whose expert counts need the sorted path (no
    bitsets) are analysed in this process, in memory."""
    batching = get_policy(policy)
    sizes = check_batch_sizes(batch_sizes)
    n_tokens = shards.n_tokens
    if n_tokens == 0:
        raise MoeprofError("the trace is empty (no tokens)")
    if not streams(shards):
        result = analyze(shards.to_trace(), sizes, policy)
        if on_progress is not None:
            on_progress(1, 1)
        return result
    chunk = (
        default_chunk_tokens(n_tokens, shards.n_layers, shards.n_experts)
        if chunk_tokens is None
        else check_chunk_tokens(chunk_tokens)
    )
    columns = shards.columns()
    n_requests = columns.n_requests
    plans, indexes = plan_indexes(columns, batching, sizes)
    del columns
    tasks = []
    for file, lo, hi in zip(shard_files(shards), shards.bounds[:-1], shards.bounds[1:]):
        start, stop = int(lo), int(hi)
        if stop > start:
            windows = tuple(index.window(start, stop) for index in indexes)
            tasks.append(
                ShardTask(
                    file, start, shards.n_experts, shards.top_k, windows, chunk or stop - start
                )
            )
    try:
        whole = _merge_in_order(
            _run(executor, map_shard, tasks, on_progress), indexes, shards.top_k
        )
    except MemoryError:
        raise MoeprofError(
            f"out of memory merging {len(tasks)} shards of {n_tokens:,} tokens; "
            "try fewer batch sizes at a time"
        ) from None
    return finish(whole, plans, shards, batching, n_requests)


def _merge_in_order(parts: Iterable[Partial], indexes: Sequence[PlanIndex], top_k: int) -> Partial:
    """The partials of consecutive row ranges, arriving in any order, merged in row order: a
    partial that arrives before its predecessor waits (merging is associative, so the result
    does not depend on the arrival order)."""
    waiting: dict[int, Partial] = {}
    whole: Partial | None = None
    next_start = 0
    for part in parts:
        waiting[part.start] = part
        while next_start in waiting:
            ready = waiting.pop(next_start)
            whole = ready if whole is None else merge(whole, ready, indexes, top_k)
            next_start = ready.stop
    if whole is None or waiting:
        raise MoeprofError(f"partials of rows from {sorted(waiting)} never joined the others")
    return whole


# ---------------------------------------------------------------------- cache


@dataclass(frozen=True)
class LayerTask:
    """One layer's simulations: the shard files and the checked settings a worker needs."""

    files: tuple[ShardFile, ...]
    layer: int
    policy: str
    sizes: tuple[int, ...]
    phase: str
    simulated: tuple[str, ...]
    caps: tuple[int, ...]
    warm: bool
    count: str
    popularity: np.ndarray | None  # static's profile of this layer (None: the layer's own)


def count_layer_task(task: LayerTask) -> LayerCounts:
    """One layer's counts, its expert ids read from the shard files by path and its batches
    planned from their per-token columns."""
    shards = _open_shards(task.files)
    columns, keep, plans = layer_plans(shards.columns(), task.policy, task.sizes, task.phase)
    ids = shards.layer_ids(task.layer)
    return count_layer(
        task.layer,
        ids if keep is None else ids[keep],
        columns,
        plans,
        task.simulated,
        task.caps,
        warm=task.warm,
        count=task.count,
        popularity=task.popularity,
    )


def cache_sharded(
    shards: Shards,
    strategies: Sequence[str] = DEFAULT_CACHE_STRATEGIES,
    capacities: Sequence[int] = (0, 1, 2, 4),
    batch_sizes: Sequence[int] = (1, 8),
    policy: str = "decode",
    executor: Executor | None = None,
    *,
    budget: str = "per-layer",
    count: str = "batch",
    warm: bool = False,
    phase: str = "all",
    popularity_from: Trace | None = None,
    capacity_spellings: dict[int, str] | None = None,
    link_gbps: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> CacheResult:
    """:func:`moeprof.cache.simulate_cache` of the logical trace of `shards` under the per-layer
    budget, one task per MoE layer on `executor` (the caller owns it);
    ``on_progress(layers done, layers)``. A global pool (``budget="global"``) spans every layer
    in execution order and does not split into layer tasks: it is refused here."""
    if executor is None:
        raise MoeprofError("cache_sharded needs an executor")
    if budget != "per-layer":
        raise MoeprofError(
            f"budget {budget!r} simulates one pool over every layer in execution order and does "
            "not split into layer tasks: run it without an executor"
        )
    settings = check_cache_settings(
        shards,
        strategies,
        capacities,
        batch_sizes,
        policy,
        budget=budget,
        count=count,
        warm=warm,
        phase=phase,
        popularity_from=popularity_from,
        capacity_unit="experts",
        capacity_spellings=capacity_spellings,
        link_gbps=link_gbps,
    )
    columns, _, plans = layer_plans(shards.columns(), policy, settings.sizes, phase)
    profile = settings.profile()
    files = shard_files(shards)
    tasks = [
        LayerTask(
            files=files,
            layer=layer,
            policy=policy,
            sizes=settings.sizes,
            phase=phase,
            simulated=settings.simulated,
            caps=settings.caps,
            warm=settings.warm,
            count=settings.count,
            popularity=None if profile is None else profile[layer],
        )
        for layer in range(shards.n_layers)
    ]
    per_layer = list(_run(executor, count_layer_task, tasks, on_progress))
    return layers_result(shards, settings, columns, plans, per_layer)
