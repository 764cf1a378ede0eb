"""Layer-major routing arrays in an ``.npz``: ``idx`` [L, T, k] or ``logits`` [L, T, E], plus
``seq_bounds``.

- ``idx``: integer expert ids per (MoE layer, token, slot) in the router's rank order; -1 = no
  expert in that slot.
- ``logits``: float router scores per (MoE layer, token, expert); each (layer, token) routes to
  its ``top_k`` highest scores (the ``top_k`` option), highest first, ties to the lower id; the
  gate weights are the chosen experts' softmax probabilities over all E experts.
- ``seq_bounds`` (optional): request boundaries over the T tokens, either cumulative offsets
  ``[0, t1, t2, ..., T]`` (R + 1 values, increasing) or ``[R, 2]`` (start, end) pairs that tile
  0..T in order. Without it the file is one request.

Nothing else may be in the file. Files share ``.npz`` with vLLM's arrays (:mod:`.vllm`);
:meth:`NpzIdxFormat.claims` tells them apart by the member names. Positions count from 0 within
each request; layers are the file's MoE layers in order.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moeprof.errors import MoeprofError
from moeprof.importers.common import READ_ERRORS as _READ_ERRORS
from moeprof.importers.common import ImportFormat, Progress, TokenRouting
from moeprof.importers.rtrace import MAX_EXPERTS, check_top_k, top_k_by_score

IDX, LOGITS, BOUNDS = "idx", "logits", "seq_bounds"
ROUTING_KEYS = (IDX, LOGITS)
MAX_MEMBER_BYTES = 1 << 33  # what one member may unpack to (a zip bomb is refused, not read)


def member_names(path: Path) -> list[str] | None:
    """The array names in an .npz file, or None when it is not a readable zip."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [i.filename.removesuffix(".npy") for i in zf.infolist() if not i.is_dir()]
    except _READ_ERRORS:
        return None


def _load(path: Path) -> dict[str, np.ndarray]:
    """Every member, read without unpickling, its unpacked size checked first."""
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                name = info.filename.removesuffix(".npy")
                if name not in (*ROUTING_KEYS, BOUNDS) or not info.filename.endswith(".npy"):
                    raise MoeprofError(
                        f"{path}: holds {info.filename!r}; an npz-idx file holds only "
                        f"{IDX!r} or {LOGITS!r}, plus {BOUNDS!r}"
                    )
                if info.file_size > MAX_MEMBER_BYTES:
                    raise MoeprofError(
                        f"{path}: {name!r} unpacks to {info.file_size:,} bytes, more than the "
                        f"{MAX_MEMBER_BYTES:,} moeprof reads from one member"
                    )
                with zf.open(info) as fp:
                    arrays[name] = np.lib.format.read_array(fp, allow_pickle=False)
    except MoeprofError:
        raise
    except _READ_ERRORS as exc:
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise MoeprofError(f"{path}: not a readable .npz file ({why})") from None
    return arrays


def _routing_array(path: Path, arrays: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
    found = [k for k in ROUTING_KEYS if k in arrays]
    if len(found) != 1:
        raise MoeprofError(
            f"{path}: an npz-idx file holds {IDX!r} [layers, tokens, k] or {LOGITS!r} "
            f"[layers, tokens, experts], " + ("not both" if found else "found neither")
        )
    key = found[0]
    arr = arrays[key]
    if arr.ndim != 3:
        dims = "[layers, tokens, k]" if key == IDX else "[layers, tokens, experts]"
        raise MoeprofError(f"{path}: {key!r} must have shape {dims}, got {list(arr.shape)}")
    if 0 in arr.shape:
        raise MoeprofError(f"{path}: {key!r} is empty (shape {list(arr.shape)})")
    kinds = "iu" if key == IDX else "f"
    if arr.dtype.kind not in kinds:
        want = "integer expert ids" if key == IDX else "float router scores"
        raise MoeprofError(f"{path}: {key!r} must hold {want}, got {arr.dtype}")
    return key, arr


def _check_idx(path: Path, idx: np.ndarray, top_k: int | None) -> np.ndarray:
    """Token-major int64 [T, L, k], -1 where a slot is empty."""
    if top_k is not None and int(top_k) != idx.shape[2]:
        raise MoeprofError(
            f"{path}: 'idx' routes {idx.shape[2]} experts per token; top_k {top_k} applies "
            "to 'logits' only"
        )
    for bad, why in (
        (idx >= MAX_EXPERTS, f"is out of range (a trace holds at most {MAX_EXPERTS} experts)"),
        (idx < -1, "is negative (-1 is an empty slot)"),
    ):
        if bad.any():
            layer, token, slot = (int(x) for x in np.argwhere(bad)[0])
            raise MoeprofError(
                f"{path}: 'idx'[{layer}, {token}, {slot}]: expert id "
                f"{int(idx[layer, token, slot])} {why}"
            )
    ids = idx.astype(np.int64)
    srt = np.sort(ids, axis=2)
    dup = (srt[:, :, 1:] == srt[:, :, :-1]) & (srt[:, :, 1:] >= 0)
    if dup.any():
        layer, token, slot = (int(x) for x in np.argwhere(dup)[0])
        raise MoeprofError(
            f"{path}: 'idx'[{layer}, {token}]: expert id {int(srt[layer, token, slot])} appears "
            "twice"
        )
    return np.ascontiguousarray(ids.transpose(1, 0, 2))


def _from_logits(
    path: Path, logits: np.ndarray, top_k: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Token-major ids and softmax gate weights [T, L, top_k] from [L, T, E] scores."""
    if logits.shape[2] > MAX_EXPERTS:
        raise MoeprofError(
            f"{path}: 'logits' scores {logits.shape[2]} experts, more than {MAX_EXPERTS}"
        )
    k = check_top_k(top_k, logits.shape[2], path)
    bad = np.isnan(logits) | (logits == np.inf)
    if bad.any():
        layer, token, e = (int(x) for x in np.argwhere(bad)[0])
        raise MoeprofError(
            f"{path}: 'logits'[{layer}, {token}, {e}] is {float(logits[layer, token, e])}; "
            "scores must be finite (or -inf for a masked expert)"
        )
    if np.isneginf(logits).all(axis=2).any():
        layer, token = (int(x) for x in np.argwhere(np.isneginf(logits).all(axis=2))[0])
        raise MoeprofError(f"{path}: 'logits'[{layer}, {token}] masks every expert (all -inf)")
    scores = logits.transpose(1, 0, 2).astype(np.float64)
    ids = top_k_by_score(scores, k)
    shifted = np.exp(scores - scores.max(axis=2, keepdims=True))
    probs = shifted / shifted.sum(axis=2, keepdims=True)
    return ids, np.take_along_axis(probs, ids, axis=2)


def _bounds(path: Path, arrays: dict[str, np.ndarray], n_tokens: int) -> np.ndarray:
    """Start of each request, with n_tokens appended ([0, t1, ..., T])."""
    if BOUNDS not in arrays:
        return np.array([0, n_tokens], dtype=np.int64)
    raw = arrays[BOUNDS]
    if raw.dtype.kind not in "iu":
        raise MoeprofError(f"{path}: {BOUNDS!r} must hold integer token offsets, got {raw.dtype}")
    shape = list(raw.shape)
    if raw.ndim == 2 and raw.shape[1] == 2 and raw.shape[0] >= 1:
        pairs = raw.astype(np.int64)
        if not (pairs[1:, 0] == pairs[:-1, 1]).all():
            i = int(np.argmax(pairs[1:, 0] != pairs[:-1, 1])) + 1
            raise MoeprofError(
                f"{path}: {BOUNDS!r} request {i} starts at {int(pairs[i, 0])}, not where request "
                f"{i - 1} ends ({int(pairs[i - 1, 1])}); (start, end) pairs must tile the tokens"
            )
        offsets = np.append(pairs[:, 0], pairs[-1, 1])
    elif raw.ndim == 1 and raw.shape[0] >= 2:
        offsets = raw.astype(np.int64)
    else:
        raise MoeprofError(
            f"{path}: {BOUNDS!r} has shape {shape}; give offsets [0, ..., {n_tokens}] "
            "(requests + 1 values) or [requests, 2] (start, end) pairs"
        )
    if int(offsets[0]) != 0 or int(offsets[-1]) != n_tokens:
        raise MoeprofError(
            f"{path}: {BOUNDS!r} runs from {int(offsets[0])} to {int(offsets[-1])}; it must "
            f"cover tokens 0..{n_tokens} (the routing's token count)"
        )
    if (np.diff(offsets) <= 0).any():
        i = int(np.argmax(np.diff(offsets) <= 0))
        raise MoeprofError(
            f"{path}: {BOUNDS!r} request {i} spans {int(offsets[i])}..{int(offsets[i + 1])}; "
            "every request needs at least one token, in order"
        )
    return offsets


def read_npz_idx(
    files: Sequence[Path],
    *,
    top_k: int | None = None,
    n_experts: int | None = None,
    progress: Progress | None = None,
) -> TokenRouting:
    """Read npz-idx files in the order given; requests follow each file's ``seq_bounds``."""
    ids_parts: list[np.ndarray] = []
    weight_parts: list[np.ndarray | None] = []
    req_parts: list[np.ndarray] = []
    pos_parts: list[np.ndarray] = []
    labels: list[str] = []
    first: tuple[Path, str, int, int] | None = None  # path, array, layers, its last dimension
    for f, path in enumerate(files):
        arrays = _load(path)
        key, arr = _routing_array(path, arrays)
        shape = (key, arr.shape[0], arr.shape[2])
        if first is None:
            first = (path, *shape)
        elif shape != first[1:]:
            raise MoeprofError(
                f"{path}: {key!r} of shape [{shape[1]}, tokens, {shape[2]}], but {first[0]} "
                f"has {first[1]!r} of shape [{first[2]}, tokens, {first[3]}]"
            )
        if key == LOGITS and n_experts is not None and arr.shape[2] != n_experts:
            raise MoeprofError(
                f"{path}: 'logits' scores {arr.shape[2]} experts, n_experts says {n_experts}"
            )
        if key == IDX:
            ids, weights = _check_idx(path, arr, top_k), None
        else:
            ids, weights = _from_logits(path, arr, top_k)
        offsets = _bounds(path, arrays, ids.shape[0])
        sizes = np.diff(offsets)
        request = np.repeat(np.arange(sizes.shape[0]), sizes)
        req_parts.append(request + len(labels))
        pos_parts.append(np.arange(ids.shape[0], dtype=np.int64) - offsets[request])
        labels.extend(f"{path.name}:{r}" for r in range(sizes.shape[0]))
        ids_parts.append(ids)
        weight_parts.append(weights)
        if progress is not None:
            progress(f + 1, len(files))
    if first is None:
        raise MoeprofError("no npz-idx files given")
    request_ids = np.concatenate(req_parts)
    positions = np.concatenate(pos_parts)

    def locate(token: int, layer: int) -> str:
        return f"{labels[int(request_ids[token])]}: position {int(positions[token])}, layer {layer}"

    weights_known = [w for w in weight_parts if w is not None]
    return TokenRouting(
        expert_ids=np.concatenate(ids_parts),
        request_ids=request_ids.astype(np.int64),
        positions=positions,
        request_labels=labels,
        gate_weights=np.concatenate(weights_known) if weights_known else None,
        n_experts_hint=first[3] if first[1] == LOGITS else None,
        locate=locate,
        details={"routing_array": first[1], **({"top_k": top_k} if first[1] == LOGITS else {})},
    )


class NpzIdxFormat(ImportFormat):
    name = "npz-idx"
    suffixes = (".npz",)
    help = "idx [layers, tokens, k] or logits (with --top-k) plus seq_bounds, in one .npz"
    options = ("top_k",)

    def claims(self, path: Path) -> bool:
        """Whether an .npz file is this format's (it holds idx or logits), not vLLM's."""
        names = member_names(path)
        return names is not None and any(k in names for k in ROUTING_KEYS)

    def read(
        self,
        files: Sequence[Path],
        *,
        n_experts: int | None,
        progress: Progress | None,
        **columns: Any,
    ) -> TokenRouting:
        return read_npz_idx(
            files, top_k=columns.get("top_k"), n_experts=n_experts, progress=progress
        )
