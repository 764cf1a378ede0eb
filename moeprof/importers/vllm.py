"""vLLM routed-experts arrays: one request per file.

vLLM (``enable_return_routed_experts``) returns each request's routing as int16 arrays of shape
[tokens, num_moe_layers, top_k]: ``RequestOutput.prompt_routed_experts`` for the prompt and
``CompletionOutput.routed_experts`` for the generated tokens (the last generated token never
runs through the model, so it has no row). Save them per request with numpy:

- ``.npy``: one array [tokens, layers, top_k] (``np.save(path, output.outputs[0].routed_experts)``);
- ``.npz``: ``np.savez(path, prompt_routed_experts=..., routed_experts=...)``; the prompt rows
  come first (phase prefill) and the generated rows after them (phase decode). Optional
  ``prompt_token_ids`` / ``token_ids`` arrays attach vocabulary ids where their lengths match.

Layers are the model's MoE layers in order (``--model-config`` gives their model layer numbers);
a negative id means no expert in that slot. Positions count from 0 within each file.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from moeprof.errors import MoeprofError
from moeprof.importers.common import READ_ERRORS as _READ_ERRORS
from moeprof.importers.common import ImportFormat, Progress, TokenRouting, warn
from moeprof.trace import PHASE_DECODE, PHASE_PREFILL

PROMPT_KEY = "prompt_routed_experts"
OUTPUT_KEY = "routed_experts"
_TOKEN_KEYS = {PROMPT_KEY: ("prompt_token_ids",), OUTPUT_KEY: ("token_ids", "output_token_ids")}
_ALL_TOKEN_KEYS = {k for keys in _TOKEN_KEYS.values() for k in keys}


MAX_DECISIONS = 1 << 28  # expert ids (and token ids) one file may hold
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK"
_HEADER_SLACK = 1 << 20  # bytes a member may hold beyond its data (its header)


class _Budget:
    """Values one file may still hold (counted before anything is read)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.left = MAX_DECISIONS

    def take(self, count: int, name: str) -> None:
        if count > self.left:
            raise MoeprofError(
                f"{self.path}: {name} holds {count} values, more than the "
                f"{MAX_DECISIONS} one file may hold; split the requests into more files"
            )
        self.left -= count


def _read_npy(
    fp: IO[bytes], size: int, path: Path, name: str, budget: _Budget, what: str = "expert ids"
) -> np.ndarray:
    """One .npy stream of `size` bytes: header checked against the bytes there before reading."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise MoeprofError(f"{path}: {name} has .npy format version {version}, not 1.0 or 2.0")
        header = fp.tell()
    except MoeprofError:
        raise
    except _READ_ERRORS as exc:  # MemoryError among them
        raise MoeprofError(f"{path}: {name} has no valid .npy header ({str(exc)[:120]})") from None
    if dtype.hasobject:
        raise MoeprofError(
            f"{path}: cannot read it without unpickling ({name} holds Python objects); "
            "save the int16 array itself"
        )
    if dtype.kind not in "iu":  # (timedelta64 counts as an integer to numpy)
        raise MoeprofError(f"{path}: {name} must hold integer {what}, got {dtype}")
    if any(d < 0 for d in shape):
        raise MoeprofError(f"{path}: {name} has a negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes > size - header:
        raise MoeprofError(
            f"{path}: {name} declares shape {list(shape)} ({nbytes} bytes), but only "
            f"{max(size - header, 0)} bytes follow its header; the file is truncated or damaged"
        )
    budget.take(count, name)
    try:
        data = fp.read(nbytes)
    except _READ_ERRORS as exc:  # MemoryError among them
        raise MoeprofError(f"{path}: cannot read {name} ({str(exc)[:120]})") from None
    if len(data) != nbytes:
        raise MoeprofError(f"{path}: {name} is truncated ({len(data)} of {nbytes} bytes)")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _check_array(arr: np.ndarray, path: Path, name: str) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.integer):
        raise MoeprofError(f"{path}: {name} must hold integer expert ids, got {arr.dtype}")
    if arr.ndim != 3:
        raise MoeprofError(
            f"{path}: {name} must have shape [tokens, moe_layers, top_k], got {list(arr.shape)}"
        )
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and arr.size and arr.max() > 2**62:
        raise MoeprofError(f"{path}: {name} holds expert id {int(arr.max())}, out of range")
    return arr.astype(np.int64, copy=False)


class _Npz:
    """The .npy members of an .npz (zip) file, read one at a time with their sizes checked."""

    def __init__(self, zf: zipfile.ZipFile, path: Path, budget: _Budget) -> None:
        self.zf, self.path, self.budget = zf, path, budget
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            if info.is_dir():
                continue
            key = info.filename.removesuffix(".npy")
            self.members[key] = info
        self.files = list(self.members)

    def __getitem__(self, key: str) -> np.ndarray:
        info = self.members[key]
        if not info.filename.endswith(".npy"):
            raise MoeprofError(f"{self.path}: member {info.filename!r} is not a .npy array")
        limit = MAX_DECISIONS * 8 + _HEADER_SLACK
        if info.file_size > limit:
            raise MoeprofError(
                f"{self.path}: member {info.filename!r} unpacks to {info.file_size} bytes, more "
                f"than the {limit} moeprof reads from one file"
            )
        try:
            with self.zf.open(info) as fp:
                what = "token ids" if key in _ALL_TOKEN_KEYS else "expert ids"
                return _read_npy(fp, info.file_size, self.path, repr(key), self.budget, what)
        except MoeprofError:
            raise
        except _READ_ERRORS as exc:
            raise MoeprofError(
                f"{self.path}: cannot read member {info.filename!r} ({str(exc)[:120]})"
            ) from None


def _load(path: Path) -> tuple[list[np.ndarray], list[int | None], list[np.ndarray | None]]:
    """The file's routing parts in token order, with their phase and token ids (None if unknown)."""
    budget = _Budget(path)
    try:
        with open(path, "rb") as fp:
            magic = fp.read(6)
            if magic == _NPY_MAGIC:
                fp.seek(0)
                size = os.fstat(fp.fileno()).st_size
                arr = _read_npy(fp, size, path, "the array", budget)
                return [_check_array(arr, path, "the array")], [None], [None]
            if not magic.startswith(_ZIP_MAGIC):
                raise MoeprofError(
                    f"{path}: not a numpy .npy/.npz file (save the int16 array itself with "
                    "np.save or np.savez)"
                )
            with zipfile.ZipFile(fp) as zf:
                return _load_npz(_Npz(zf, path, budget), path)
    except MoeprofError:
        raise
    except MemoryError:
        raise MoeprofError(f"{path}: not enough memory to read it") from None
    except _READ_ERRORS as exc:
        raise MoeprofError(
            f"{path}: not a readable numpy .npy/.npz file ({str(exc)[:120]})"
        ) from None


def _load_npz(
    loaded: _Npz, path: Path
) -> tuple[list[np.ndarray], list[int | None], list[np.ndarray | None]]:
    keys = list(loaded.files)
    if PROMPT_KEY not in keys and OUTPUT_KEY not in keys:
        if len(keys) != 1:
            raise MoeprofError(
                f"{path}: expected arrays {PROMPT_KEY!r} and/or {OUTPUT_KEY!r}, found "
                f"{', '.join(keys) or 'none'}"
            )
        return [_check_array(loaded[keys[0]], path, keys[0])], [None], [None]
    both = PROMPT_KEY in keys and OUTPUT_KEY in keys
    parts, phases, tokens = [], [], []
    for key, phase in ((PROMPT_KEY, PHASE_PREFILL), (OUTPUT_KEY, PHASE_DECODE)):
        if key not in keys:
            continue
        arr = _check_array(loaded[key], path, key)
        ids = None
        for tkey in _TOKEN_KEYS[key]:
            if tkey in keys:
                tok = loaded[tkey].reshape(-1)
                # Generated ids may run one past the routing (the last token is never fed).
                if tok.shape[0] in (arr.shape[0], arr.shape[0] + 1):
                    ids = tok[: arr.shape[0]].astype(np.int64)
                else:
                    warn(f"{path}: {tkey} has {tok.shape[0]} ids for {arr.shape[0]} rows; ignored")
                break
        parts.append(arr)
        # A lone routed_experts array may cover the prompt too (older vLLM): phase unknown.
        phases.append(phase if both or key == PROMPT_KEY else None)
        tokens.append(ids)
    return parts, phases, tokens


def read_vllm(files: Sequence[Path], *, progress: Progress | None = None) -> TokenRouting:
    """Read one request per file, in the order given."""
    ids_parts: list[np.ndarray] = []
    req_parts: list[np.ndarray] = []
    pos_parts: list[np.ndarray] = []
    phase_parts: list[np.ndarray | None] = []
    token_parts: list[np.ndarray | None] = []
    labels: list[str] = []
    paths: list[Path] = []
    shape: tuple[int, int] | None = None
    first_file: Path | None = None
    empty = 0
    for i, path in enumerate(files):
        parts, phases, tokens = _load(path)
        for arr in parts:
            if shape is None:
                shape, first_file = (arr.shape[1], arr.shape[2]), path
            elif (arr.shape[1], arr.shape[2]) != shape:
                raise MoeprofError(
                    f"{path}: routing has {arr.shape[1]} layers x top-{arr.shape[2]}, but "
                    f"{first_file} has {shape[0]} x top-{shape[1]}"
                )
        n = sum(a.shape[0] for a in parts)
        if n == 0:
            empty += 1
            continue
        request = len(labels)
        labels.append(path.name)
        paths.append(path)
        ids_parts.extend(parts)
        req_parts.append(np.full(n, request, dtype=np.int64))
        pos_parts.append(np.arange(n, dtype=np.int64))
        for arr, phase, tok in zip(parts, phases, tokens):
            m = arr.shape[0]
            phase_parts.append(None if phase is None else np.full(m, phase, dtype=np.uint8))
            token_parts.append(tok)
        if progress is not None:
            progress(i + 1, len(files))
    if not labels:
        raise MoeprofError("the vLLM files hold no routed tokens")
    if empty:
        warn(f"skipped {empty} file(s) with no routed tokens")
    phases_known = [p for p in phase_parts if p is not None]
    tokens_known = [t for t in token_parts if t is not None]
    all_phases = np.concatenate(phases_known) if len(phases_known) == len(phase_parts) else None
    token_ids = np.concatenate(tokens_known) if len(tokens_known) == len(token_parts) else None
    ids = np.concatenate(ids_parts)
    request_ids = np.concatenate(req_parts)
    positions = np.concatenate(pos_parts)

    def locate(token: int, layer: int) -> str:
        return f"{paths[int(request_ids[token])]}: row {int(positions[token])}, MoE layer {layer}"

    return TokenRouting(
        expert_ids=np.where(ids < 0, -1, ids),
        request_ids=request_ids,
        positions=positions,
        request_labels=labels,
        locate=locate,
        phase=all_phases,
        token_ids=token_ids,
        details={"empty_files": empty},
    )


class VllmFormat(ImportFormat):
    name = "vllm"
    suffixes = (".npy", ".npz")
    help = "routed_experts arrays, one request per file"

    def read(
        self,
        files: Sequence[Path],
        *,
        n_experts: int | None,
        progress: Progress | None,
        **columns: Any,
    ) -> TokenRouting:
        return read_vllm(files, progress=progress)
