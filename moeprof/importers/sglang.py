"""SGLang expert-distribution recorder dumps in ``per_token`` mode.

SGLang (``--expert-distribution-recorder-mode per_token``, then ``/start_expert_distribution_record``,
``/stop_...`` and ``/dump_expert_distribution_record``) writes one ``torch.save`` file per rank,
``expert_distribution_recorder_<time>_<rank>.pt``, holding
``{"records": [...], "last_physical_to_logical_map": int tensor [layers, physical experts]}``.
Each record is one forward pass: ``forward_pass_id``, ``rank``, ``input_ids`` and ``positions``
(one per token), ``extend_seq_lens`` (tokens per sequence in an extend pass, else None),
``forward_mode`` (1 extend, 2 decode, 3 mixed, ...) and ``topk_ids_of_layer``, an int32 tensor
[all model layers, tokens, 8] of physical expert ids, -1 where a layer is dense or a slot unused.

Files are read with ``torch.load(weights_only=True)`` (no code runs). Physical ids become logical
ids through the map; layers that never route are dropped (their numbers are kept as the model
layer of each MoE layer); unused slots are trimmed. The forward pass becomes the token's ``step``
(so ``--policy recorded`` replays the real schedule) and the mode its phase.

The dump does not name requests, so they are rebuilt from positions and SGLang's scheduling
(:func:`link_sequences`): a pass is cut into sequences (by ``extend_seq_lens``; one token per
sequence in a decode pass); a sequence at position 0 opens a request; a decode token at p > 0
continues a running request that stands at p, in batch order (SGLang keeps the running batch in
order and appends newly prefilled requests); a prefill chunk at p > 0 continues a request still in
prefill; a decode pass runs every running request, so one missing from it has finished. This is
exact unless positions collide: a request whose prompt hit the prefix cache starts at p > 0 and
may join a request standing at p, and when two requests decode in lockstep (same positions) and
the first in batch order finishes, the second's later tokens go to the first. Record with
``--disable-radix-cache`` for exact request boundaries; the ``recorded`` policy (one batch per
forward pass) does not depend on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moeprof.errors import MoeprofError
from moeprof.importers.common import ImportFormat, Progress, TokenRouting
from moeprof.trace import PHASE_DECODE, PHASE_PREFILL

MODE_EXTEND, MODE_DECODE, MODE_MIXED, MODE_IDLE, MODE_TARGET_VERIFY = 1, 2, 3, 4, 5


_INT64_MAX = (1 << 63) - 1


def _as_array(value: Any, path: Path, j: int, name: str, ndim: int | None = None) -> np.ndarray:
    """An integer tensor, list or int as a numpy integer array; anything else a MoeprofError."""
    import torch

    where = f"{path}: record {j}: {name}" if j >= 0 else f"{path}: {name}"
    if value is None:
        raise MoeprofError(f"{where} is missing")
    try:
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided or value.is_nested or value.is_meta:
                raise MoeprofError(f"{where} must be a dense tensor, got a {value.layout} one")
            if (
                value.is_quantized
                or value.dtype.is_floating_point
                or value.dtype.is_complex
                or value.dtype == torch.bool
            ):
                raise MoeprofError(f"{where} must hold integers, got {value.dtype}")
            arr = value.detach().cpu().numpy()
        elif isinstance(value, (int, list, tuple, np.ndarray)) and not isinstance(value, bool):
            arr = np.asarray(value)
            if arr.size == 0 and arr.dtype.kind == "f":
                arr = arr.astype(np.int64)
        else:
            raise MoeprofError(f"{where} must be integers, got {type(value).__name__}")
    except MoeprofError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError, RecursionError) as exc:
        raise MoeprofError(
            f"{where} is not a list of integers ({str(exc)[:100] or type(exc).__name__})"
        ) from None
    if arr.dtype == object:
        raise MoeprofError(f"{where} must hold integers within int64")
    if arr.dtype.kind not in "iu":
        raise MoeprofError(f"{where} must hold integers, got {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and arr.size and arr.max() > _INT64_MAX:
        raise MoeprofError(f"{where} holds {int(arr.max())}, beyond int64")
    if ndim is not None and arr.ndim != ndim:
        raise MoeprofError(f"{where} must have {ndim} dimension(s), got shape {list(arr.shape)}")
    return arr.astype(np.int64, copy=False)


def _as_int(value: Any, path: Path, j: int, name: str) -> int:
    """One integer (an int or a one-element integer tensor) within int64."""
    arr = _as_array(value, path, j, name)
    if arr.size != 1:
        raise MoeprofError(
            f"{path}: record {j}: {name} must be one integer, got shape {list(arr.shape)}"
        )
    return int(arr.reshape(-1)[0])


def _load(path: Path) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    import torch

    try:
        dump = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        # The weights-only unpickler fails on damaged bytes with whatever error the opcode at
        # hand raises (KeyError, IndexError, ...); every one means "not a readable dump".
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        why = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise MoeprofError(f"{path}: not a readable torch.save dump ({why})") from None
    mapping = None
    if isinstance(dump, dict):
        if "records" not in dump:
            raise MoeprofError(
                f"{path}: no 'records' in the dump; was the recorder in per_token mode?"
            )
        records = dump["records"]
        raw_map = dump.get("last_physical_to_logical_map")
        if raw_map is not None:
            mapping = _as_array(raw_map, path, -1, "last_physical_to_logical_map")
            if mapping.ndim != 2:
                raise MoeprofError(
                    f"{path}: last_physical_to_logical_map must be [layers, experts]"
                )
            if mapping.size and int(mapping.min()) < -1:
                raise MoeprofError(
                    f"{path}: last_physical_to_logical_map holds {int(mapping.min())}; "
                    "logical expert ids are -1 or more"
                )
    else:
        records = dump
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise MoeprofError(f"{path}: 'records' must be a list of per-pass dicts")
    return records, mapping


def _file_tokens(path: Path, records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-token arrays of one file (all its passes in order) and each token's sequence start."""
    topk, pos, tok, pass_of, index_of, mode_of, starts = [], [], [], [], [], [], []
    pass_modes: list[int] = []
    n_layers: int | None = None
    for j, rec in enumerate(records):
        if "topk_ids_of_layer" not in rec:
            raise MoeprofError(
                f"{path}: record {j} has no topk_ids_of_layer; was the recorder in per_token mode?"
            )
        ids = _as_array(rec["topk_ids_of_layer"], path, j, "topk_ids_of_layer")
        if ids.ndim != 3:
            raise MoeprofError(
                f"{path}: record {j}: topk_ids_of_layer must be integers [layers, tokens, slots]"
            )
        if n_layers is not None and ids.shape[0] != n_layers:
            raise MoeprofError(
                f"{path}: record {j} has {ids.shape[0]} layers, earlier ones {n_layers}"
            )
        n_layers = ids.shape[0]
        n = ids.shape[1]
        if n == 0:
            continue
        positions = _as_array(rec.get("positions"), path, j, "positions", ndim=1)
        if positions.shape[0] != n:
            raise MoeprofError(f"{path}: record {j}: {positions.shape[0]} positions for {n} tokens")
        if int(positions.min()) < 0:
            raise MoeprofError(f"{path}: record {j}: positions must not be negative")
        input_ids = rec.get("input_ids")
        in_ids = (
            _as_array(input_ids, path, j, "input_ids", ndim=1) if input_ids is not None else None
        )
        if in_ids is not None and in_ids.shape[0] != n:
            in_ids = None
        raw_mode = rec.get("forward_mode")
        mode = 0 if raw_mode is None else _as_int(raw_mode, path, j, "forward_mode")
        raw_id = rec.get("forward_pass_id")
        pass_id = j if raw_id is None else _as_int(raw_id, path, j, "forward_pass_id")
        start = np.zeros(n, dtype=bool)
        start[0] = True
        raw_lens = rec.get("extend_seq_lens")
        seq_lens = (
            None
            if raw_lens is None
            else _as_array(raw_lens, path, j, "extend_seq_lens").reshape(-1)
        )
        if seq_lens is not None and seq_lens.size and int(seq_lens.min()) < 0:
            raise MoeprofError(f"{path}: record {j}: extend_seq_lens must not be negative")
        if mode == MODE_DECODE:
            start[:] = True
        elif (
            seq_lens is not None
            and seq_lens.size
            and int(seq_lens.max()) <= n
            and int(np.sum(seq_lens)) == n
        ):
            bounds = np.cumsum(seq_lens)[:-1]
            start[bounds[bounds < n]] = True
        else:
            start[1:] = positions[1:] != positions[:-1] + 1
        inner = ~start
        inner[0] = False
        if (positions[1:][inner[1:]] != positions[:-1][inner[1:]] + 1).any():
            raise MoeprofError(
                f"{path}: record {j}: positions inside a sequence are not consecutive"
            )
        topk.append(np.transpose(ids, (1, 0, 2)).astype(np.int64))
        pos.append(positions.astype(np.int64))
        tok.append(in_ids.astype(np.int64) if in_ids is not None else np.full(n, -1, np.int64))
        pass_of.append(np.full(n, pass_id, dtype=np.int64))
        index_of.append(np.full(n, len(pass_modes), dtype=np.int64))
        pass_modes.append(mode)
        mode_of.append(np.full(n, mode, dtype=np.int64))
        starts.append(start)
    if not topk:
        raise MoeprofError(f"{path}: the dump holds no tokens")
    return {
        "ids": np.concatenate(topk),
        "positions": np.concatenate(pos),
        "token_ids": np.concatenate(tok),
        "pass_id": np.concatenate(pass_of),
        "pass_index": np.concatenate(index_of),
        "pass_mode": np.asarray(pass_modes, dtype=np.int64),
        "mode": np.concatenate(mode_of),
        "seq_start": np.concatenate(starts),
        "n_records": np.asarray(len(records)),
    }


def _rank_in_group(group: np.ndarray) -> np.ndarray:
    """Rank of each element among equal `group` values, in the array's order (group sorted)."""
    first = np.searchsorted(group, group, side="left")
    return np.arange(group.shape[0]) - first


def _match(
    c: np.ndarray, c_start: np.ndarray, o: np.ndarray, o_next: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pair consumers `c` (batch order) with open entries `o` (batch order) waiting at their start:
    the k-th consumer starting at p takes the k-th entry waiting at p. Returns (consumers, entries).
    """
    if c.size == 0 or o.size == 0:
        return c[:0], o[:0]
    o_sorted = np.argsort(o_next, kind="stable")
    o, o_next = o[o_sorted], o_next[o_sorted]
    c_sorted = np.argsort(c_start, kind="stable")
    c, c_start = c[c_sorted], c_start[c_sorted]
    o_code = o_next * (n + 1) + _rank_in_group(o_next)
    c_code = c_start * (n + 1) + _rank_in_group(c_start)
    hit = np.minimum(np.searchsorted(o_code, c_code), o_code.shape[0] - 1)
    ok = o_code[hit] == c_code
    return c[ok], o[hit[ok]]


def link_sequences(
    seq_pass: np.ndarray, seq_start: np.ndarray, seq_len: np.ndarray, pass_mode: np.ndarray
) -> np.ndarray:
    """Request (dense, by first appearance) of each sequence; sequences in pass-then-batch order.

    ``seq_pass`` numbers passes 0, 1, 2, ... and ``pass_mode`` holds each pass's forward mode.
    Open requests wait at their next position, in SGLang's batch order (the order they last ran
    an extend pass in). A sequence starting at 0 opens a request. A decode token (every token of
    a decode pass, a one-token sequence of a mixed pass) at p > 0 continues an open request
    waiting at p; an extend chunk at p > 0 continues a request still in prefill (one that has not
    decoded), those of the latest pass first. The k-th such sequence of a pass takes the k-th such request; one
    left over opens a request. A decode or mixed pass runs every running request, so absent
    ones have finished.
    """
    n = seq_pass.shape[0]
    request = np.empty(n, dtype=np.int64)
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(seq_pass)) + 1, [n]))
    span = 1 << 20  # batch slots per pass in the order key
    open_req = np.zeros(0, dtype=np.int64)
    open_next = np.zeros(0, dtype=np.int64)
    open_key = np.zeros(0, dtype=np.int64)
    open_decoding = np.zeros(0, dtype=bool)
    n_requests = 0
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        f = int(seq_pass[a])
        mode = int(pass_mode[f])
        start, length = seq_start[a:b], seq_len[a:b]
        decode_like = np.full(b - a, mode in (MODE_DECODE, MODE_TARGET_VERIFY))
        if mode == MODE_MIXED:
            decode_like = (length == 1) & (start > 0)
        req = np.full(b - a, -1, dtype=np.int64)
        key = f * span + np.arange(b - a, dtype=np.int64)
        by_order = np.argsort(open_key, kind="stable")
        # A prefill chunk continues a request of the latest extend pass first, in batch order.
        latest_first = np.lexsort((open_key % span, -(open_key // span)))
        free = np.ones(open_req.shape[0], dtype=bool)
        for role in (True, False):
            cons = np.flatnonzero((start > 0) & (decode_like == role))
            order = by_order if role else latest_first
            cand = order[free[order] & (role | ~open_decoding[order])]
            got_c, got_o = _match(cons, start[cons], cand, open_next[cand], n)
            req[got_c] = open_req[got_o]
            free[got_o] = False
            if role:  # a decode token keeps its request's place in the batch order
                key[got_c] = open_key[got_o]
        new = req < 0
        req[new] = n_requests + np.arange(int(new.sum()), dtype=np.int64)
        n_requests += int(new.sum())
        request[a:b] = req
        # A decode or mixed pass runs every running request (and no prefill is half done
        # then), so the absent ones have finished.
        still = np.zeros_like(free) if mode in (MODE_DECODE, MODE_MIXED) else free
        open_req = np.concatenate((open_req[still], req))
        open_next = np.concatenate((open_next[still], start + length))
        open_key = np.concatenate((open_key[still], key))
        open_decoding = np.concatenate((open_decoding[still], decode_like))
    return request


def read_sglang(files: Sequence[Path], *, progress: Progress | None = None) -> TokenRouting:
    """Read per_token dumps (one per rank); requests never span files."""
    per_file: list[dict[str, np.ndarray]] = []
    n_layers: int | None = None
    n_logical: int | None = None
    for i, path in enumerate(files):
        records, mapping = _load(path)
        arrays = _file_tokens(path, records)
        ids = arrays["ids"]
        if n_layers is not None and ids.shape[1] != n_layers:
            raise MoeprofError(f"{path}: {ids.shape[1]} layers, {files[0]} has {n_layers}")
        n_layers = ids.shape[1]
        if mapping is not None:
            if mapping.shape[0] != n_layers:
                raise MoeprofError(
                    f"{path}: the physical-to-logical map has {mapping.shape[0]} layers, "
                    f"the records {n_layers}"
                )
            if int(ids.max()) >= mapping.shape[1]:
                raise MoeprofError(
                    f"{path}: physical expert id {int(ids.max())} is beyond the map's "
                    f"{mapping.shape[1]} physical experts"
                )
            valid = ids >= 0
            layer_index = np.broadcast_to(np.arange(n_layers)[None, :, None], ids.shape)
            ids = np.where(valid, mapping[layer_index, np.where(valid, ids, 0)], -1)
            n_logical = max(n_logical or 0, int(mapping.max()) + 1)
        arrays["ids"] = ids
        per_file.append(arrays)
        if progress is not None:
            progress(i + 1, len(files))
    assert n_layers is not None

    ids = np.concatenate([a["ids"] for a in per_file])
    routed = ids >= 0
    moe_layers = np.flatnonzero(routed.any(axis=(0, 2)))
    used_slots = np.flatnonzero(routed.any(axis=(0, 1)))
    if moe_layers.size == 0:
        raise MoeprofError("the dumps hold no routed expert ids")
    ids = ids[:, moe_layers, : int(used_slots.max()) + 1]

    requests: list[np.ndarray] = []
    labels: list[str] = []
    for f, arrays in enumerate(per_file):
        start = arrays["seq_start"]
        seq_first = np.flatnonzero(start)
        seq_len = np.diff(np.append(seq_first, start.shape[0])).astype(np.int64)
        seq_req = link_sequences(
            arrays["pass_index"][seq_first],
            arrays["positions"][seq_first],
            seq_len,
            arrays["pass_mode"],
        )
        offset = len(labels)
        n_req = int(seq_req.max()) + 1
        labels.extend(
            f"{files[f].name}#{r}" if len(per_file) > 1 else f"#{r}" for r in range(n_req)
        )
        requests.append(np.repeat(seq_req, seq_len) + offset)
    mode = np.concatenate([a["mode"] for a in per_file])
    positions = np.concatenate([a["positions"] for a in per_file])
    # Decode passes (and one-token continuations inside mixed passes) are decode tokens.
    start_all = np.concatenate([a["seq_start"] for a in per_file])
    seq_id = np.cumsum(start_all) - 1
    seq_sizes = np.bincount(seq_id)
    single = seq_sizes[seq_id] == 1
    is_decode = (
        (mode == MODE_DECODE)
        | (mode == MODE_TARGET_VERIFY)
        | ((mode == MODE_MIXED) & single & (positions > 0))
    )
    token_ids = np.concatenate([a["token_ids"] for a in per_file])
    return TokenRouting(
        expert_ids=ids,
        request_ids=np.concatenate(requests),
        positions=positions,
        request_labels=labels,
        layer_numbers=[int(x) for x in moe_layers],
        steps=np.concatenate([a["pass_id"] for a in per_file]),
        phase=np.where(is_decode, PHASE_DECODE, PHASE_PREFILL).astype(np.uint8),
        token_ids=token_ids if (token_ids >= 0).all() else None,
        n_experts_hint=n_logical,
        details={
            "records": int(sum(int(a["n_records"]) for a in per_file)),
            "model_layers_in_dump": n_layers,
        },
    )


class SglangFormat(ImportFormat):
    name = "sglang"
    suffixes = (".pt", ".pth")
    help = "expert-distribution recorder dumps (per_token)"

    def read(
        self,
        files: Sequence[Path],
        *,
        n_experts: int | None,
        progress: Progress | None,
        **columns: Any,
    ) -> TokenRouting:
        return read_sglang(files, progress=progress)
