"""One logical trace from several trace files: a fleet's dumps (one per engine rank, or per hour)
or a long recording cut into shards (docs/scale.md, "Sharded traces").

The logical trace is the shards concatenated in file-name order. Requests stay distinct across
shards (each shard's requests are numbered after the previous shard's), and so do recorded
engine steps (each shard's steps follow the previous shard's), so a batch never mixes two
shards' recorded steps. ``moeprof merge`` writes exactly this concatenation, and every analysis of
the shards equals the same analysis of the merged file.

Shards are read by memory map. :meth:`Shards.read_ids` and :meth:`Shards.layer_ids` copy the rows
asked for and drop the pages read from resident memory, so streaming readers stay bounded by
their chunk; :meth:`Shards.to_trace` concatenates everything in memory (for the analyses that
need the whole trace at once).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moeprof.errors import MoeprofError
from moeprof.trace import Trace, ids_placeholder, load_trace

TRACE_SUFFIX = ".moe"
_GLOB_CHARS = frozenset("*?[")
# Metadata that must agree between shards of one logical trace (besides the array layout).
_SAME_META = ("moe_layer_indices", "shared_expert_bytes", "model")


def shard_paths(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The trace files `spec` names, in order: a file, a folder (its ``*.moe`` files by name), a
    glob pattern (its matches by name), or a list of those (in the order given)."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise MoeprofError("no trace files given")
    paths: list[Path] = []
    for item in specs:
        text = os.fspath(item)
        p = Path(text)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix == TRACE_SUFFIX and q.is_file())
            if not found:
                raise MoeprofError(f"folder {p} holds no {TRACE_SUFFIX} trace files")
            paths.extend(found)
        elif not p.exists() and _GLOB_CHARS & set(text):
            found = sorted(Path(m) for m in glob.glob(text) if Path(m).is_file())
            if not found:
                raise MoeprofError(f"no trace files match {text!r}")
            paths.extend(found)
        else:
            paths.append(p)  # load_trace words a missing file
    seen: set[Path] = set()
    for p in paths:
        if p.resolve() in seen:
            raise MoeprofError(f"trace file {p} is named twice")
        seen.add(p.resolve())
    return paths


def first_difference(a: Trace, b: Trace) -> str | None:
    """The first way `b` cannot continue `a` as one logical trace (model, layer layout, expert
    counts or sizes, top-k), worded for a message; None when they match."""
    fields: list[tuple[str, Any, Any]] = [
        ("MoE layers", a.n_layers, b.n_layers),
        ("top-k", a.top_k, b.top_k),
        ("experts per layer", a.n_experts.tolist(), b.n_experts.tolist()),
        ("expert bytes per layer", a.expert_bytes.tolist(), b.expert_bytes.tolist()),
    ]
    fields += [(key, a.meta.get(key), b.meta.get(key)) for key in _SAME_META]
    for name, left, right in fields:
        if left != right:
            return f"{name} {_short(right)} (the first shard has {_short(left)})"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Shards:
    """Trace files read as one logical trace (see the module docstring)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = tuple(paths)
        self.traces = tuple(load_trace(p) for p in self.paths)
        first = self.traces[0]
        for path, trace in zip(self.paths[1:], self.traces[1:]):
            why = first_difference(first, trace)
            if why:
                raise MoeprofError(
                    f"{path} is not a shard of the same trace as {self.paths[0]}: it has {why}"
                )
        self.bounds = np.concatenate(([0], np.cumsum([t.n_tokens for t in self.traces])))
        self.n_experts = first.n_experts
        self.expert_bytes = first.expert_bytes
        self._columns: Trace | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.bounds[-1])

    @property
    def n_layers(self) -> int:
        return self.traces[0].n_layers

    @property
    def top_k(self) -> int:
        return self.traces[0].top_k

    @property
    def n_shards(self) -> int:
        return len(self.traces)

    def meta(self) -> dict[str, Any]:
        """The first shard's metadata, plus the shards' file names (one entry per file)."""
        meta = dict(self.traces[0].meta)
        if self.n_shards > 1:
            meta["source"] = self._source()
            meta["shards"] = [
                {"file": p.name, "n_tokens": t.n_tokens} for p, t in zip(self.paths, self.traces)
            ]
        return meta

    def _source(self) -> Any:
        """The shards' `source` as one run's: a recording's shards each count their own forward
        passes, and the run's totals (prompts completed, seconds, an interruption) are in the
        shard written last; the shard number describes one file, not the whole."""
        given_sources = [t.meta.get("source") for t in self.traces]
        sources = [x for x in given_sources if isinstance(x, dict)]
        if len(sources) != len(given_sources):
            return given_sources[0]
        merged = {k: v for k, v in sources[0].items() if k != "shard"}
        passes = [x.get("forward_passes") for x in sources]
        if all(isinstance(n, int) for n in passes):
            merged["forward_passes"] = sum(int(n) for n in passes if n is not None)
        for key in ("prompts_completed", "seconds", "interrupted"):
            given = [x[key] for x in sources if key in x]
            if given:
                merged[key] = given[-1]
        return merged

    # ------------------------------------------------------------------ per-token columns
    def _request_ids(self) -> np.ndarray:
        """Each shard's requests numbered after the previous shard's, int32 [T]: requests of
        different shards stay distinct and rows stay in (request, position) order."""
        parts, offset = [], 0
        for trace in self.traces:
            req = np.asarray(trace.request_ids)
            if req.size == 0:
                continue
            new = np.empty(req.shape[0], dtype=bool)
            new[0] = True
            np.not_equal(req[1:], req[:-1], out=new[1:])
            dense = np.cumsum(new, dtype=np.int64) - 1
            parts.append(dense + offset)
            offset += int(dense[-1]) + 1
        if offset > np.iinfo(np.int32).max:
            raise MoeprofError(f"the shards hold {offset:,} requests, more than a trace can number")
        return _concat(parts, np.int32)

    def _steps(self) -> np.ndarray | None:
        """Each shard's recorded steps after the previous shard's (None unless every shard has
        them): batches never mix two shards' steps."""
        if any(t.steps is None for t in self.traces):
            return None
        parts, offset = [], 0
        for trace in self.traces:
            steps = np.asarray(trace.steps, dtype=np.int64)
            if steps.size == 0:
                continue
            lo = int(steps.min())
            parts.append(steps - lo + offset)
            offset += int(steps.max()) - lo + 1
        if offset > np.iinfo(np.int32).max:
            raise MoeprofError(f"the shards span {offset:,} steps, more than a trace can number")
        return _concat(parts, np.int32)

    def _column(self, name: str) -> np.ndarray | None:
        """A per-row column concatenated (None unless every shard has it)."""
        values = [getattr(t, name) for t in self.traces]
        if any(v is None for v in values):
            return None
        return np.concatenate(values)

    def columns(self) -> Trace:
        """The logical trace's per-token columns (requests, positions, steps, phases) with a
        placeholder for the expert ids that takes no memory (a zero-stride view of the right
        shape): enough to plan batches, never to count experts. Built once (O(T))."""
        if self._columns is None:
            self._columns = self._build_columns()
        return self._columns

    def _build_columns(self) -> Trace:
        ids_dtype = self.traces[0].expert_ids.dtype
        return Trace(
            expert_ids=ids_placeholder(self.n_tokens, self.n_layers, self.top_k, ids_dtype),
            request_ids=self._request_ids(),
            positions=_concat([t.positions for t in self.traces], np.int32),
            steps=self._steps(),
            phase=self._column("phase"),
            n_experts=self.n_experts,
            expert_bytes=self.expert_bytes,
            meta=self.meta(),
        )

    # ------------------------------------------------------------------ expert ids
    def read_ids(self, start: int, stop: int) -> np.ndarray:
        """Expert ids of logical rows [start, stop), a copy [stop - start, L, K]; the pages read
        are dropped from resident memory."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise MoeprofError(f"rows {start}..{stop} are outside the trace's {self.n_tokens:,}")
        parts = []
        first = int(np.searchsorted(self.bounds, start, side="right")) - 1
        for s in range(max(first, 0), self.n_shards):
            lo, hi = int(self.bounds[s]), int(self.bounds[s + 1])
            if lo >= stop:
                break
            trace = self.traces[s]
            parts.append(np.array(trace.expert_ids[max(start, lo) - lo : min(stop, hi) - lo]))
            trace.release()
        if not parts:
            return np.zeros((0, self.n_layers, self.top_k), self.traces[0].expert_ids.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def layer_ids(self, layer: int) -> np.ndarray:
        """One layer's expert ids over the whole logical trace, a copy [T, K], read in row chunks
        whose pages are dropped as it goes (:meth:`Trace.layer_column`). A layer is 1/L of the
        trace."""
        parts = [trace.layer_column(layer) for trace in self.traces]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def release(self) -> None:
        for trace in self.traces:
            trace.release()

    def to_trace(self) -> Trace:
        """The logical trace in memory (what ``moeprof merge`` writes). A single shard is
        returned as loaded (memory-mapped, no copy)."""
        if self.n_shards == 1:
            return self.traces[0]
        columns = self.columns()
        return Trace(
            expert_ids=np.concatenate([t.expert_ids for t in self.traces]),
            gate_weights=self._column("gate_weights"),
            token_ids=self._column("token_ids"),
            request_ids=columns.request_ids,
            positions=columns.positions,
            steps=columns.steps,
            phase=columns.phase,
            n_experts=self.n_experts,
            expert_bytes=self.expert_bytes,
            meta=columns.meta,
        )


def _concat(parts: Sequence[np.ndarray], dtype: type[np.generic]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.asarray(p) for p in parts]).astype(dtype, copy=False)


def open_shards(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> Shards:
    """The trace files `spec` names (see :func:`shard_paths`) as one logical trace."""
    return Shards(shard_paths(spec))


def load_traces(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> Trace:
    """A trace file, or the shards `spec` names concatenated in memory, as one :class:`Trace`."""
    return open_shards(spec).to_trace()
