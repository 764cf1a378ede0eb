"""Trace format v1: the routing of a set of requests through the MoE layers of one model.

The only module that knows the file format (specified in docs/trace-format.md). The container is
safetensors: an 8-byte little-endian header length, a JSON header naming each array's dtype, shape
and byte range, then the raw arrays. Metadata lives in the header's ``__metadata__`` (string
values only), under ``format``, ``format_version`` and ``moeprof`` (a JSON document).

Files are written with the safetensors library through a temporary file and a rename, and read
here with a memory map, so loading a trace costs no copy and the arrays are read-only views of the
file.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import mmap
import os
import platform
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moeprof import _io
from moeprof._version import __version__
from moeprof.errors import MoeprofError, is_whole_number

FORMAT_NAME = "moeprof-trace"
FORMAT_VERSION = 1

# Array name -> dtype in the file. expert_ids is uint8 or uint16 (see _ids_dtype).
_ARRAY_DTYPES: dict[str, np.dtype[Any]] = {
    "gate_weights": np.dtype(np.float16),
    "request_ids": np.dtype(np.int32),
    "positions": np.dtype(np.int32),
    "steps": np.dtype(np.int32),
    "phase": np.dtype(np.uint8),
    "token_ids": np.dtype(np.int32),
}
_OPTIONAL = ("gate_weights", "steps", "phase", "token_ids")
_ST_DTYPES = {"U8": np.uint8, "U16": np.uint16, "I32": np.int32, "F16": np.float16}
# Keys of the metadata document that the Trace object owns; everything else is free-form `meta`.
_OWNED_META = ("n_experts", "expert_bytes", "top_k", "n_tokens", "n_layers")

PHASE_PREFILL = 0
PHASE_DECODE = 1


def _ids_dtype(n_experts: np.ndarray) -> np.dtype[Any]:
    # The sentinel (= expert count) must fit too: uint8 holds counts up to 255.
    return np.dtype(np.uint8) if int(n_experts.max()) <= 255 else np.dtype(np.uint16)


def _per_layer(
    value: int | Sequence[int] | np.ndarray, n_layers: int, name: str, lo: int, hi: int
) -> np.ndarray:
    """One whole number in lo..hi, or one per layer, as int64 [L]; checked before any cast."""
    raw = np.asarray(value, dtype=object) if not isinstance(value, np.ndarray) else value
    if raw.ndim == 0:
        raw = np.full(n_layers, raw.item(), dtype=object)
    if raw.shape != (n_layers,):
        raise MoeprofError(f"{name} must be one int or one value per MoE layer ({n_layers})")
    values = raw.tolist()
    if not all(is_whole_number(v) for v in values):
        raise MoeprofError(f"{name} must be whole numbers, got {values[:8]!r}")
    if any(not lo <= int(v) <= hi for v in values):
        raise MoeprofError(f"{name} must be between {lo} and {hi} per layer")
    return np.asarray([int(v) for v in values], dtype=np.int64)


# Largest expert size accepted (1 TiB): keeps every byte product far from int64 overflow.
MAX_EXPERT_BYTES = 1 << 40


def _meta_problem(meta: Mapping[str, Any], n_layers: int) -> str | None:
    """Why the free-form metadata is unusable, or None. Readers rely on these types."""
    for key in ("model", "source", "library_versions"):
        if key in meta and meta[key] is not None and not isinstance(meta[key], dict):
            return f"metadata {key!r} must be an object"
    if "moe_layer_indices" in meta:
        indices = meta["moe_layer_indices"]
        if not isinstance(indices, (list, tuple)) or not all(
            is_whole_number(x) and 0 <= int(x) < 2**31 for x in indices
        ):
            return "moe_layer_indices must be a list of whole numbers 0..2^31-1"
        if len(indices) != n_layers:
            return f"moe_layer_indices names {len(indices)} layers, expert_ids has {n_layers}"
    shared = meta.get("shared_expert_bytes", 0)
    if not is_whole_number(shared) or not 0 <= int(shared) <= MAX_EXPERT_BYTES:
        return "shared_expert_bytes must be a whole number of bytes"
    return None


def out_of_range_id(ids: np.ndarray, n_experts: np.ndarray) -> str | None:
    """Why the first id above its layer's sentinel is invalid, or None.

    Compares before any cast, so uint64 ids beyond int64 cannot wrap into range.
    """
    if ids.size == 0 or int(ids.max()) <= int(n_experts.min()):
        return None
    if int(ids.max()) > 65535:  # beyond every layer's range
        over = ids > 65535
    else:
        over = ids.astype(np.int64) > n_experts[None, :, None]
    if not over.any():
        return None
    t, layer, _ = (int(x) for x in np.argwhere(over)[0])
    return (
        f"expert id {int(ids[t, layer].max())} at token {t}, layer {layer} is out of range: "
        f"layer {layer} has {int(n_experts[layer])} experts"
    )


def duplicate_expert(ids: np.ndarray, n_experts: np.ndarray) -> tuple[int, int, int] | None:
    """(token, layer, expert) of the first expert named twice by one token in one layer, or None.

    A token routes to distinct experts; a repeat would be counted twice as a request but once as
    unique, inflating savings. Sentinel slots ("no expert") may repeat.
    """
    top_k = ids.shape[2]
    if ids.size == 0 or top_k < 2:
        return None
    sentinel = n_experts.astype(ids.dtype)[None, :]
    if top_k <= 16:
        # Pairwise slot comparisons: K(K-1)/2 vector passes, cheaper than sorting tiny rows.
        dup = np.zeros(ids.shape[:2], dtype=bool)
        for i in range(top_k - 1):
            col = ids[:, :, i]
            hit = np.zeros_like(dup)
            for j in range(i + 1, top_k):
                hit |= col == ids[:, :, j]
            dup |= hit & (col != sentinel)
    else:
        srt = np.sort(ids, axis=2)
        same = (srt[:, :, 1:] == srt[:, :, :-1]) & (srt[:, :, 1:] != sentinel[:, :, None])
        dup = same.any(axis=2)
    if not dup.any():
        return None
    t, layer = (int(x) for x in np.argwhere(dup)[0])
    row = ids[t, layer].tolist()
    expert = next(e for e in row if row.count(e) > 1 and e != int(n_experts[layer]))
    return t, layer, int(expert)


# Engines run warm-up (profiling) passes before serving whose rows all carry one route: vLLM's
# come in thousands (2,048, 8,192 + 256). Real traffic does not repeat a route this often.
WARMUP_MIN_ROWS = 256


def warmup_tokens(expert_ids: np.ndarray, min_rows: int = WARMUP_MIN_ROWS) -> np.ndarray:
    """Tokens in a run of at least `min_rows` consecutive rows that repeat one route (the same
    set of experts) in some layer, bool [T]: likely an engine's warm-up passes."""
    n_tokens, n_layers, _ = expert_ids.shape
    found = np.zeros(n_tokens, dtype=bool)
    if n_tokens < min_rows:
        return found
    for layer in range(n_layers):
        route = np.sort(expert_ids[:, layer, :], axis=1)  # a set: slot order does not matter
        new_run = np.ones(n_tokens, dtype=bool)
        new_run[1:] = (route[1:] != route[:-1]).any(axis=1)
        run = np.cumsum(new_run) - 1
        found |= (np.bincount(run) >= min_rows)[run]
        release_pages(expert_ids)  # a mapped file's pages: one layer's read at a time
    return found


def token_ranges(mask: np.ndarray) -> list[tuple[int, int]]:
    """The runs of True in a bool array, as [start, stop) pairs."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def describe_warmup(mask: np.ndarray) -> str:
    """Which tokens `warmup_tokens` found, for a warning: 'rows 0..2,047 and 5,000..5,299'."""
    ranges = token_ranges(mask)
    shown = ", ".join(f"{a:,}..{b - 1:,}" for a, b in ranges[:4])
    more = f" and {len(ranges) - 4} more runs" if len(ranges) > 4 else ""
    return (
        f"{int(mask.sum()):,} tokens (rows {shown}{more}) repeat one route in runs of "
        f"{WARMUP_MIN_ROWS}+ rows, like an engine's warm-up passes"
    )


def library_versions() -> dict[str, str]:
    """Versions of what produced a trace, for provenance."""
    versions = {
        "moeprof": __version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    import sys

    for mod in ("torch", "transformers"):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, "__version__"):
            versions[mod] = str(m.__version__)
    return versions


def semantic_problem(
    ids: np.ndarray,
    n_experts: np.ndarray,
    request_ids: np.ndarray,
    positions: np.ndarray,
    phase: np.ndarray | None,
    meta: Mapping[str, Any],
) -> str | None:
    """Why well-shaped trace arrays do not form a valid trace, or None.

    The one set of content rules, shared by :meth:`Trace.from_arrays` and :func:`load_trace`:
    expert ids in range (checked before any cast), no expert twice per token and layer, rows in
    strictly increasing (request, position) order, phases 0 or 1, usable metadata. Takes integer
    arrays of any dtype. Only the order check depends on row order, so ``from_arrays`` can check
    the caller's ids in the caller's order (its messages name the caller's token index).
    """
    if ids.size and ids.dtype.kind == "i" and int(ids.min()) < 0:
        return "expert_ids must not be negative"
    problem = out_of_range_id(ids, n_experts)
    if problem:
        return problem
    if int(n_experts.max()) > np.iinfo(ids.dtype).max:
        # The sentinel must fit the compared dtype; ids are in range, so this cast is exact.
        ids = ids.astype(_ids_dtype(n_experts))
    dup = duplicate_expert(ids, n_experts)
    if dup:
        return _duplicate_message(*dup)
    if request_ids.size > 1:
        # Request-major: strictly increasing (request, position). O(T), cheap.
        r0, r1 = request_ids[:-1], request_ids[1:]
        p0, p1 = positions[:-1], positions[1:]
        ordered = (r1 > r0) | ((r1 == r0) & (p1 > p0))
        if not ordered.all():
            i = int(np.argmin(ordered))
            if r1[i] == r0[i] and p1[i] == p0[i]:
                return (
                    f"request {int(r0[i])} has two tokens at position {int(p0[i])}: rows must be "
                    "in strictly increasing (request, position) order"
                )
            return f"rows are not in (request, position) order at row {i + 1}"
    if phase is not None and phase.size:
        lo, hi = int(phase.min()), int(phase.max())
        if lo < PHASE_PREFILL or hi > PHASE_DECODE:
            return f"phase must be 0 (prefill) or 1 (decode), got values in {lo}..{hi}"
    return _meta_problem(meta, ids.shape[1])


def _duplicate_message(token: int, layer: int, expert: int) -> str:
    return (
        f"token {token} names expert {expert} twice in layer {layer}; a token's experts in a "
        "layer must be distinct"
    )


def _expert_ids_array(expert_ids: np.ndarray | Sequence[Any]) -> np.ndarray:
    """The caller's expert ids as an integer [tokens, layers, top_k] array (not yet cast)."""
    ids = np.asarray(expert_ids)
    if ids.ndim != 3:
        raise MoeprofError(f"expert_ids must have shape [tokens, layers, top_k], got {ids.shape}")
    if ids.shape[1] == 0 or ids.shape[2] == 0:
        raise MoeprofError("expert_ids must have at least one MoE layer and one top-k slot")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise MoeprofError(f"expert_ids must be integers, got {ids.dtype}")
    return ids


def _token_column(value: np.ndarray | Sequence[int], name: str, n_tokens: int) -> np.ndarray:
    """One per-token integer array of the caller's, shape-checked, in its own dtype."""
    arr = np.asarray(value)
    if arr.shape != (n_tokens,):
        raise MoeprofError(f"{name} must have shape [{n_tokens}], got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise MoeprofError(f"{name} must be integers, got {arr.dtype}")
    return arr


def _stored_column(arr: np.ndarray, name: str) -> np.ndarray:
    """A per-token array in its file dtype, range-checked first: a silent wrap would corrupt it."""
    if arr.size:
        info = np.iinfo(_ARRAY_DTYPES[name])
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise MoeprofError(
                f"{name} must lie in {info.min}..{info.max}, got values in {lo}..{hi}"
            )
    return arr.astype(_ARRAY_DTYPES[name])  # a copy: the trace never aliases caller arrays


def _gate_weights_array(value: np.ndarray | Sequence[Any], shape: tuple[int, ...]) -> np.ndarray:
    try:
        gw = np.asarray(value, dtype=np.float16)
    except (TypeError, ValueError):
        raise MoeprofError("gate_weights must be numbers") from None
    if gw.shape != shape:
        raise MoeprofError(f"gate_weights must have shape {shape}, got {gw.shape}")
    return gw


def _appearance_positions(request_ids: np.ndarray) -> np.ndarray:
    """Each row's rank among its request's rows, in the order given."""
    n_tokens = len(request_ids)
    order = np.argsort(request_ids, kind="stable")
    sorted_req = request_ids[order]
    first = np.searchsorted(sorted_req, sorted_req, side="left")
    pos = np.empty(n_tokens, dtype=np.int32)
    pos[order] = (np.arange(n_tokens) - first).astype(np.int32)
    return pos


def _full_meta(meta: Mapping[str, Any] | None, n_layers: int) -> dict[str, Any]:
    """The caller's free-form metadata with defaults; keys the Trace owns are dropped."""
    full_meta = {k: v for k, v in (meta or {}).items() if k not in _OWNED_META}
    full_meta.setdefault("moe_layer_indices", list(range(n_layers)))
    full_meta.setdefault("shared_expert_bytes", 0)
    full_meta.setdefault(
        "created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    full_meta.setdefault("library_versions", library_versions())
    return full_meta


class Trace:
    """Routing decisions: ``expert_ids[T, L, K]`` plus per-token arrays, in request-major order.

    Build one with :meth:`from_arrays`, read one with :func:`load_trace`. A slot holding the
    layer's expert count (the sentinel) means "no expert" and is skipped by analysis.
    """

    expert_ids: np.ndarray
    gate_weights: np.ndarray | None
    request_ids: np.ndarray
    positions: np.ndarray
    steps: np.ndarray | None
    phase: np.ndarray | None
    token_ids: np.ndarray | None
    n_experts: np.ndarray
    expert_bytes: np.ndarray
    meta: dict[str, Any]

    def __init__(
        self,
        *,
        expert_ids: np.ndarray,
        request_ids: np.ndarray,
        positions: np.ndarray,
        n_experts: np.ndarray,
        expert_bytes: np.ndarray,
        gate_weights: np.ndarray | None = None,
        steps: np.ndarray | None = None,
        phase: np.ndarray | None = None,
        token_ids: np.ndarray | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        # Internal: arrays are already validated and ordered. Use from_arrays() or load_trace().
        self.expert_ids = expert_ids
        self.request_ids = request_ids
        self.positions = positions
        self.gate_weights = gate_weights
        self.steps = steps
        self.phase = phase
        self.token_ids = token_ids
        self.n_experts = n_experts
        self.expert_bytes = expert_bytes
        self.meta = dict(meta or {})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(
        cls,
        expert_ids: np.ndarray | Sequence[Any],
        *,
        n_experts: int | Sequence[int] | np.ndarray,
        request_ids: np.ndarray | Sequence[int] | None = None,
        positions: np.ndarray | Sequence[int] | None = None,
        gate_weights: np.ndarray | Sequence[Any] | None = None,
        steps: np.ndarray | Sequence[int] | None = None,
        phase: np.ndarray | Sequence[int] | None = None,
        token_ids: np.ndarray | Sequence[int] | None = None,
        expert_bytes: int | Sequence[int] | np.ndarray | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Trace:
        """Validate arrays and put the rows in request-major order (by request, then position).

        ``n_experts`` and ``expert_bytes`` are one int or one value per MoE layer. Without
        ``request_ids`` all rows are one request; without ``positions`` each request's rows are
        numbered 0..n-1 in the order given. ``expert_bytes=None`` means the size is unknown (0).
        """
        ids = _expert_ids_array(expert_ids)
        n_tokens, n_layers, _ = ids.shape
        n_exp = _per_layer(n_experts, n_layers, "n_experts", 1, 65535)
        ebytes = (
            np.zeros(n_layers, dtype=np.int64)
            if expert_bytes is None
            else _per_layer(expert_bytes, n_layers, "expert_bytes", 0, MAX_EXPERT_BYTES)
        )
        req = (
            np.zeros(n_tokens, dtype=np.int32)
            if request_ids is None
            else _token_column(request_ids, "request_ids", n_tokens)
        )
        pos = (
            _appearance_positions(req)
            if positions is None
            else _token_column(positions, "positions", n_tokens)
        )
        optional = {"steps": steps, "phase": phase, "token_ids": token_ids}
        columns = {
            name: _token_column(value, name, n_tokens)
            for name, value in optional.items()
            if value is not None
        }
        gw = None if gate_weights is None else _gate_weights_array(gate_weights, ids.shape)
        full_meta = _full_meta(meta, n_layers)

        sort = np.lexsort((pos, req))
        order = sort if n_tokens and not np.array_equal(sort, np.arange(n_tokens)) else None
        if order is not None:
            req, pos = req[order], pos[order]
        # Only the order check reads row order: ids and phases are checked as the caller gave them.
        problem = semantic_problem(ids, n_exp, req, pos, columns.get("phase"), full_meta)
        if problem:
            raise MoeprofError(problem)
        ids = ids.astype(_ids_dtype(n_exp), copy=False)  # exact: every id is in range
        req, pos = _stored_column(req, "request_ids"), _stored_column(pos, "positions")
        stored = {name: _stored_column(arr, name) for name, arr in columns.items()}
        if order is not None:
            ids = ids[order]
            gw = None if gw is None else gw[order]
            stored = {name: arr[order] for name, arr in stored.items()}
        full_meta["moe_layer_indices"] = [int(x) for x in full_meta["moe_layer_indices"]]
        full_meta["shared_expert_bytes"] = int(full_meta["shared_expert_bytes"])

        def contiguous(name: str) -> np.ndarray | None:
            return np.ascontiguousarray(stored[name]) if name in stored else None

        return cls(
            expert_ids=np.ascontiguousarray(ids),
            request_ids=np.ascontiguousarray(req),
            positions=np.ascontiguousarray(pos),
            gate_weights=None if gw is None else np.ascontiguousarray(gw),
            steps=contiguous("steps"),
            phase=contiguous("phase"),
            token_ids=contiguous("token_ids"),
            n_experts=n_exp,
            expert_bytes=ebytes,
            meta=full_meta,
        )

    # ------------------------------------------------------------------ shape
    @property
    def n_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    @property
    def n_requests(self) -> int:
        if self.n_tokens == 0:
            return 0
        return int(np.count_nonzero(self.request_ids[1:] != self.request_ids[:-1]) + 1)

    @property
    def moe_layer_indices(self) -> list[int]:
        return [int(x) for x in self.meta.get("moe_layer_indices", range(self.n_layers))]

    @property
    def expert_bytes_known(self) -> bool:
        return bool((self.expert_bytes > 0).all())

    def __repr__(self) -> str:
        return (
            f"Trace(tokens={self.n_tokens}, requests={self.n_requests}, layers={self.n_layers}, "
            f"top_k={self.top_k}, experts={self.n_experts.tolist()})"
        )

    def without_tokens(self, drop: np.ndarray) -> Trace:
        """A copy without the tokens where `drop` (bool [T]) is True; metadata kept."""
        keep = ~np.asarray(drop, dtype=bool)
        if not keep.any():
            raise MoeprofError("no tokens would be left")

        def cut(arr: np.ndarray | None) -> np.ndarray | None:
            return None if arr is None else arr[keep]

        return Trace.from_arrays(
            self.expert_ids[keep],
            n_experts=self.n_experts,
            request_ids=self.request_ids[keep],
            positions=self.positions[keep],
            gate_weights=cut(self.gate_weights),
            steps=cut(self.steps),
            phase=cut(self.phase),
            token_ids=cut(self.token_ids),
            expert_bytes=self.expert_bytes,
            meta=self.meta,
        )

    def layer_column(self, layer: int) -> np.ndarray:
        """One layer's expert ids, a copy [T, K]. A layer's ids are strided through every row,
        so reading them touches every page of a mapped file: they are read in row chunks, each
        chunk's pages dropped before the next, so resident memory stays near the column's size
        instead of the file's."""
        ids = self.expert_ids
        out = np.empty((ids.shape[0], ids.shape[2]), dtype=ids.dtype)
        row_bytes = max(1, ids.shape[1] * ids.shape[2] * ids.itemsize)
        step = max(1, _LAYER_READ_BYTES // row_bytes)
        for start in range(0, ids.shape[0], step):
            out[start : start + step] = ids[start : start + step, layer, :]
            release_pages(ids)
        return out

    def release(self) -> None:
        """Drop the file pages this trace's arrays have read from resident memory (see
        :func:`release_pages`); the arrays stay valid. A no-op for a trace built in memory."""
        release_pages(self.expert_ids)

    def metadata(self) -> dict[str, Any]:
        """The full metadata document as stored in the file (JSON-serialisable)."""
        doc: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "n_tokens": self.n_tokens,
            "n_layers": self.n_layers,
            "top_k": self.top_k,
            "n_experts": self.n_experts.tolist(),
            "expert_bytes": self.expert_bytes.tolist(),
        }
        doc.update(self.meta)
        return doc

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays stored in the file, by name (optional ones only when present)."""
        out = {
            "expert_ids": self.expert_ids,
            "request_ids": self.request_ids,
            "positions": self.positions,
        }
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the trace atomically (temporary file + rename)."""
        from safetensors.numpy import save_file

        header_meta = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "moeprof": json.dumps(self.metadata(), sort_keys=True),
        }
        tensors = {k: np.ascontiguousarray(v) for k, v in self.arrays().items()}
        with _io.atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=header_meta)


def ids_placeholder(n_tokens: int, n_layers: int, top_k: int, dtype: Any) -> np.ndarray:
    """Expert ids of the right shape that take no memory (one row, zero stride): for a Trace of
    per-token columns that plans batches and never counts experts."""
    row = np.zeros((1, n_layers, top_k), dtype=dtype)
    return np.broadcast_to(row, (n_tokens, n_layers, top_k))


def _corrupt(path: Path, why: str) -> MoeprofError:
    return MoeprofError(f"{path}: not a readable moeprof trace ({why})")


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a trace file by memory map; arrays are read-only views of the file."""
    p = Path(path)
    if not p.exists():
        raise MoeprofError(f"trace file {p} not found")
    if p.is_dir():
        raise MoeprofError(f"{p} is a folder, not a trace file")
    header, doc, buf, data_start = _read_header(p)
    arrays = _map_arrays(p, header, buf, data_start)
    n_exp, ebytes = _check_layout(p, arrays, doc)
    ids = arrays["expert_ids"]
    problem = _chunked_semantic_problem(
        ids, n_exp, arrays["request_ids"], arrays["positions"], arrays.get("phase"), doc
    )
    release_pages(buf)
    if problem:
        raise _corrupt(p, problem)
    meta = {
        k: v
        for k, v in doc.items()
        if k not in _OWNED_META and k not in ("format", "format_version")
    }
    return Trace(
        expert_ids=ids,
        request_ids=arrays["request_ids"],
        positions=arrays["positions"],
        gate_weights=arrays.get("gate_weights"),
        steps=arrays.get("steps"),
        phase=arrays.get("phase"),
        token_ids=arrays.get("token_ids"),
        n_experts=n_exp,
        expert_bytes=ebytes,
        meta=meta,
    )


# Bytes of rows read at a time when one layer's column is copied out of a mapped file.
_LAYER_READ_BYTES = 32 << 20

# Rows of expert ids checked at a time when a file is loaded: the check's temporaries and the
# pages it reads stay bounded whatever the file's size (2 M rows of top-8 ids: about 50 MB).
_CHECK_CHUNK_DECISIONS = 1 << 24


def _chunked_semantic_problem(
    ids: np.ndarray,
    n_experts: np.ndarray,
    request_ids: np.ndarray,
    positions: np.ndarray,
    phase: np.ndarray | None,
    meta: Mapping[str, Any],
) -> str | None:
    """:func:`semantic_problem` over row chunks of a mapped file, releasing each chunk's pages,
    with the same message for the same file (token indices are the file's): an out-of-range id
    anywhere comes before a repeated expert anywhere, and both before the order of the rows."""
    n_tokens = ids.shape[0]
    step = max(1, _CHECK_CHUNK_DECISIONS // max(1, ids.shape[1] * ids.shape[2]))
    if n_tokens <= step:
        return semantic_problem(ids, n_experts, request_ids, positions, phase, meta)
    first_duplicate: str | None = None
    for start in range(0, n_tokens, step):
        chunk = ids[start : start + step]
        problem = out_of_range_id(chunk, n_experts)
        if problem is not None:
            release_pages(ids)
            return _shift_token_index(problem, start)
        if first_duplicate is None:
            dup = duplicate_expert(chunk, n_experts)
            if dup:
                first_duplicate = _duplicate_message(dup[0] + start, dup[1], dup[2])
        release_pages(ids)
    if first_duplicate is not None:
        return first_duplicate
    return semantic_problem(ids[:0], n_experts, request_ids, positions, phase, meta)


def _shift_token_index(problem: str, offset: int) -> str:
    """An out-of-range message of a chunk, naming the token by its row in the whole file."""
    return re.sub(r"at token (\d+),", lambda m: f"at token {int(m.group(1)) + offset},", problem)


def release_pages(obj: Any) -> None:
    """Drop the pages of the file map behind `obj` (an mmap, or an array viewing one) from this
    process's resident memory. They stay in the OS page cache and are read back on the next
    access, so the arrays stay valid; streaming readers call this after each chunk, which keeps
    resident memory bounded by the chunk, not the file. A no-op for arrays in memory."""
    while isinstance(obj, np.ndarray):
        obj = obj.base
    if isinstance(obj, memoryview):  # np.frombuffer(map) holds a memoryview of the map
        obj = obj.obj
    if isinstance(obj, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED") and not obj.closed:
        obj.madvise(mmap.MADV_DONTNEED)


def _read_header(p: Path) -> tuple[dict[str, Any], dict[str, Any], mmap.mmap, int]:
    """The safetensors header (array entries), the moeprof metadata document, a read-only map
    of the file and the offset where the data section starts."""
    size = p.stat().st_size
    if size < 8:
        raise _corrupt(p, "file too short")
    with open(p, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len <= 1 or 8 + header_len > size or header_len > 100_000_000:
            raise _corrupt(p, "bad header length")
        raw = fh.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: JSON, huge ints
            raise _corrupt(p, "header is not JSON") from None
        if not isinstance(header, dict):
            raise _corrupt(p, "header is not a JSON object")
        file_meta = header.pop("__metadata__", None) or {}
        if not isinstance(file_meta, dict) or file_meta.get("format") != FORMAT_NAME:
            raise _corrupt(p, "no moeprof metadata; is this a trace written by moeprof?")
        version_text = file_meta.get("format_version")
        if not isinstance(version_text, str) or not re.fullmatch("[0-9]{1,9}", version_text):
            raise _corrupt(p, "format version is not a whole number")
        version = int(version_text)
        if version > FORMAT_VERSION:
            raise MoeprofError(
                f"{p}: trace format version {version} is newer than this moeprof reads "
                f"(version {FORMAT_VERSION}); upgrade moeprof"
            )
        if version < 1:
            raise _corrupt(p, f"unknown format version {version}")
        try:
            doc = json.loads(file_meta["moeprof"])
        except (KeyError, TypeError, ValueError, RecursionError):
            raise _corrupt(p, "metadata document missing or not JSON") from None
        if not isinstance(doc, dict):
            raise _corrupt(p, "metadata document is not a JSON object")
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    return header, doc, buf, 8 + header_len


def _map_arrays(
    p: Path, header: dict[str, Any], buf: mmap.mmap, data_start: int
) -> dict[str, np.ndarray]:
    """Each header entry as a read-only view of the map; the arrays must tile the data section."""
    size = len(buf)
    arrays: dict[str, np.ndarray] = {}
    ranges: list[tuple[int, int]] = []
    for name, info in header.items():
        try:
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(p, f"bad entry for array {name!r}") from None
        # Whole JSON numbers only (no floats, no infinity); exact Python-int sizes, no wrap.
        if not all(is_whole_number(d) and d >= 0 for d in (*shape, begin, end)):
            raise _corrupt(p, f"array {name!r} has a bad shape or byte range")
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize:
            raise _corrupt(p, f"array {name!r} size does not match its shape")
        if data_start + end > size:
            raise _corrupt(p, "file is truncated")
        ranges.append((begin, end))
        try:
            arrays[name] = np.frombuffer(
                buf, dtype=dtype, count=count, offset=data_start + begin
            ).reshape(shape)
        except ValueError:  # e.g. an empty array with a dimension numpy cannot index
            raise _corrupt(p, f"array {name!r} has a bad shape") from None
    # No overlap, no gap, nothing after the end.
    ranges.sort()
    expected = 0
    for begin, end in ranges:
        if begin != expected:
            raise _corrupt(p, "array byte ranges overlap or leave gaps")
        expected = end
    if data_start + expected != size:
        raise _corrupt(p, "file size does not match its header (truncated or trailing bytes)")
    return arrays


def _check_layout(
    p: Path, arrays: dict[str, np.ndarray], doc: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Required arrays present, every array of the expected dtype and shape, and the per-layer
    values of the metadata; returns n_experts and expert_bytes as int64 [L]."""
    for required in ("expert_ids", "request_ids", "positions"):
        if required not in arrays:
            raise _corrupt(p, f"array {required!r} missing")
    ids = arrays["expert_ids"]
    if ids.ndim != 3 or ids.dtype not in (np.uint8, np.uint16):
        raise _corrupt(p, "expert_ids must be uint8/uint16 [tokens, layers, top_k]")
    n_tokens, n_layers, top_k = ids.shape
    if n_layers == 0 or top_k == 0:
        raise _corrupt(p, "expert_ids has no MoE layer or no top-k slot")
    per_layer = []
    for key, lo, hi in (("n_experts", 1, 65535), ("expert_bytes", 0, MAX_EXPERT_BYTES)):
        values = doc.get(key)
        if not isinstance(values, list):
            raise _corrupt(p, f"{key} must be a list of whole numbers in the metadata")
        try:
            per_layer.append(_per_layer(values, n_layers, key, lo, hi))
        except MoeprofError as exc:
            raise _corrupt(p, exc.message) from None
    n_exp, ebytes = per_layer
    # Fields that repeat what the arrays say must agree with them (an edited or damaged header).
    shape = {"n_tokens": n_tokens, "n_layers": n_layers, "top_k": top_k}
    for key, actual in (
        *shape.items(),
        ("format", FORMAT_NAME),
        ("format_version", FORMAT_VERSION),
    ):
        if key in doc and not (doc[key] == actual and type(doc[key]) is type(actual)):
            raise _corrupt(p, f"metadata {key} is {doc[key]!r:.40}, the arrays say {actual!r}")
    if ids.dtype != _ids_dtype(n_exp):
        raise _corrupt(p, f"expert_ids is {ids.dtype}, expected {_ids_dtype(n_exp)}")
    for name, arr in arrays.items():
        if name == "expert_ids":
            continue
        if name == "gate_weights":
            ok = arr.shape == ids.shape and arr.dtype == np.float16
        elif name in _ARRAY_DTYPES:
            ok = arr.shape == (n_tokens,) and arr.dtype == _ARRAY_DTYPES[name]
        else:
            raise _corrupt(p, f"unknown array {name!r}")
        if not ok:
            raise _corrupt(p, f"array {name!r} has the wrong shape or dtype")
    return n_exp, ebytes
