"""Binary softmax record streams (``RTRACE01``): the router's full probabilities per (token, layer).

Layout, little-endian throughout (docs/import.md "Softmax record streams"):

- header, 16 bytes: the magic ``RTRACE01`` (8 bytes), int32 expert count E, int32 version (1);
- then records of 8 + 4E bytes: int32 token index, int32 layer index, float32 softmax[E].

The records are read in bulk (one structured ``np.frombuffer``); the top-k of each record is taken
with the ``top_k`` option, ids in descending probability order (ties: the lower id first), and
the chosen probabilities become the gate weights. Each file is one request (the stream has no
request field); token indices are the positions. Every token must have one record for every
layer present in the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moeprof.errors import MoeprofError
from moeprof.importers.common import ImportFormat, Progress, TokenRouting

MAGIC = b"RTRACE01"
VERSION = 1
HEADER = np.dtype([("magic", "S8"), ("n_experts", "<i4"), ("version", "<i4")])
MAX_EXPERTS = 65535  # a trace holds at most this many experts per layer
_PROB_SLACK = 1e-5  # float32 rounding a softmax value may carry above 1
_TOPK_CELLS = 1 << 24  # scores sorted per chunk: bounded memory whatever the stream's size


def record_dtype(n_experts: int) -> np.dtype:
    """One record of a stream with `n_experts` experts."""
    return np.dtype([("token", "<i4"), ("layer", "<i4"), ("probs", "<f4", (n_experts,))])


def check_top_k(top_k: int | None, n_experts: int, path: Path) -> int:
    if top_k is None:
        raise MoeprofError(f"{path}: holds router scores; top_k says how many experts to route")
    if not 1 <= int(top_k) <= n_experts:
        raise MoeprofError(f"top_k must be between 1 and {n_experts} (the experts), got {top_k}")
    return int(top_k)


def top_k_by_score(scores: np.ndarray, top_k: int) -> np.ndarray:
    """int64 [..., top_k]: indices of the `top_k` highest scores along the last axis, highest
    first; equal scores keep the lower index first (a stable sort of the negated scores)."""
    flat = scores.reshape(-1, scores.shape[-1])
    out = np.empty((flat.shape[0], top_k), dtype=np.int64)
    step = max(1, _TOPK_CELLS // max(flat.shape[1], 1))
    for start in range(0, flat.shape[0], step):  # chunks of rows, not a loop per row
        block = flat[start : start + step]
        out[start : start + step] = np.argsort(-block, axis=1, kind="stable")[:, :top_k]
    return out.reshape(*scores.shape[:-1], top_k)


def _records(path: Path) -> tuple[np.ndarray, int]:
    """The file's records (a structured array over its bytes) and its expert count."""
    data = path.read_bytes()
    if len(data) < HEADER.itemsize:
        raise MoeprofError(
            f"{path}: {len(data)} bytes, shorter than the {HEADER.itemsize}-byte rtrace header"
        )
    head = np.frombuffer(data, dtype=HEADER, count=1)[0]
    if bytes(head["magic"]) != MAGIC or data[:8] != MAGIC:
        raise MoeprofError(f"{path}: not an rtrace stream (starts {data[:8]!r}, not {MAGIC!r})")
    n_experts, version = int(head["n_experts"]), int(head["version"])
    if version != VERSION:
        raise MoeprofError(f"{path}: rtrace version {version}; moeprof reads version {VERSION}")
    if not 1 <= n_experts <= MAX_EXPERTS:
        raise MoeprofError(
            f"{path}: the header's expert count {n_experts} is outside 1..{MAX_EXPERTS}"
        )
    rec = record_dtype(n_experts)
    body = len(data) - HEADER.itemsize
    n_records, extra = divmod(body, rec.itemsize)
    if extra:
        raise MoeprofError(
            f"{path}: record {n_records} is truncated ({extra} of {rec.itemsize} bytes at byte "
            f"{HEADER.itemsize + n_records * rec.itemsize:,})"
        )
    if n_records == 0:
        raise MoeprofError(f"{path}: the stream holds no records")
    return np.frombuffer(data, dtype=rec, count=n_records, offset=HEADER.itemsize), n_experts


def _where(path: Path, records: np.ndarray, i: int) -> str:
    rec = records[i]
    return f"{path}: record {i} (token {int(rec['token'])}, layer {int(rec['layer'])})"


def _check_records(path: Path, records: np.ndarray) -> None:
    token, layer, probs = records["token"], records["layer"], records["probs"]
    for values, what in ((token, "token index"), (layer, "layer index")):
        if (values < 0).any():
            i = int(np.argmax(values < 0))
            raise MoeprofError(f"{_where(path, records, i)}: negative {what} {int(values[i])}")
    bad = ~np.isfinite(probs) | (probs < 0) | (probs > 1 + _PROB_SLACK)
    if bad.any():
        i, e = (int(x) for x in np.argwhere(bad)[0])
        raise MoeprofError(
            f"{_where(path, records, i)}: probability {float(probs[i, e])} of expert {e} is "
            "not a probability (0..1)"
        )


def _tokens_by_layer(path: Path, records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(layer numbers, token indices, record of each [token, layer]), every cell filled once."""
    layer_numbers, layer = np.unique(records["layer"], return_inverse=True)
    tokens, token = np.unique(records["token"], return_inverse=True)
    layer, token = layer.reshape(-1), token.reshape(-1)
    n_tokens, n_layers = tokens.shape[0], layer_numbers.shape[0]
    cell = token.astype(np.int64) * n_layers + layer
    order = np.argsort(cell, kind="stable")
    again = cell[order][1:] == cell[order][:-1]
    if again.any():
        j = int(np.argmax(again))
        raise MoeprofError(
            f"{_where(path, records, int(order[j + 1]))}: a second record for this token and "
            f"layer (first: record {int(order[j])})"
        )
    per_layer = np.bincount(layer, minlength=n_layers)
    if (per_layer != n_tokens).any():
        short = int(np.argmax(per_layer != n_tokens))
        present = np.zeros((n_tokens, n_layers), dtype=bool)
        present[token, layer] = True
        lacking = int(np.argmax(~present[:, short]))
        raise MoeprofError(
            f"{path}: layer {int(layer_numbers[short])} has {int(per_layer[short])} records for "
            f"{n_tokens} tokens (token {int(tokens[lacking])} has none); every token needs one "
            "record per layer"
        )
    at = np.empty((n_tokens, n_layers), dtype=np.int64)
    at[token, layer] = np.arange(records.shape[0])
    return layer_numbers, tokens, at


def read_rtrace(
    files: Sequence[Path],
    *,
    top_k: int | None,
    n_experts: int | None = None,
    progress: Progress | None = None,
) -> TokenRouting:
    """Read rtrace streams (one request per file, in the order given), routing each (token,
    layer) to its `top_k` most probable experts."""
    ids_parts: list[np.ndarray] = []
    weight_parts: list[np.ndarray] = []
    pos_parts: list[np.ndarray] = []
    req_parts: list[np.ndarray] = []
    first: tuple[Path, int, list[int]] | None = None
    k = 0
    for f, path in enumerate(files):
        records, n_exp = _records(path)
        if n_experts is not None and n_exp != n_experts:
            raise MoeprofError(
                f"{path}: the stream has {n_exp} experts, n_experts says {n_experts}"
            )
        if first is None:
            k = check_top_k(top_k, n_exp, path)
        elif n_exp != first[1]:
            raise MoeprofError(f"{path}: {n_exp} experts, but {first[0]} has {first[1]}")
        _check_records(path, records)
        layer_numbers, tokens, at = _tokens_by_layer(path, records)
        layers = [int(x) for x in layer_numbers]
        if first is None:
            first = (path, n_exp, layers)
        elif layers != first[2]:
            raise MoeprofError(f"{path}: layers {layers}, but {first[0]} has {first[2]}")
        probs = records["probs"][at]  # [tokens, layers, experts], token-major
        chosen = top_k_by_score(probs, k)
        ids_parts.append(chosen)
        weight_parts.append(np.take_along_axis(probs, chosen, axis=2).astype(np.float64))
        pos_parts.append(tokens.astype(np.int64))
        req_parts.append(np.full(tokens.shape[0], f, dtype=np.int64))
        if progress is not None:
            progress(f + 1, len(files))
    if first is None:
        raise MoeprofError("no rtrace files given")
    request_ids = np.concatenate(req_parts)
    positions = np.concatenate(pos_parts)

    def locate(token: int, layer: int) -> str:
        return f"{files[int(request_ids[token])]}: token {int(positions[token])}, layer {layer}"

    return TokenRouting(
        expert_ids=np.concatenate(ids_parts),
        request_ids=request_ids,
        positions=positions,
        request_labels=[p.name for p in files],
        layer_numbers=first[2],
        gate_weights=np.concatenate(weight_parts),
        n_experts_hint=first[1],
        locate=locate,
        details={"rtrace_version": VERSION, "top_k_from": "softmax", "top_k": k},
    )


class RtraceFormat(ImportFormat):
    name = "rtrace"
    suffixes = (".rtrace",)
    help = "binary RTRACE01 softmax records per (token, layer); needs --top-k"
    options = ("top_k",)

    def read(
        self,
        files: Sequence[Path],
        *,
        n_experts: int | None,
        progress: Progress | None,
        **columns: Any,
    ) -> TokenRouting:
        return read_rtrace(
            files, top_k=columns.get("top_k"), n_experts=n_experts, progress=progress
        )
