"""Long tables (CSV / JSONL): one row per (request, token, MoE layer) with that token's experts.

Files are parsed by pyarrow (C++, multithreaded) and every column is converted with vectorised
Arrow / numpy kernels; a Python pass over the file runs only to name the line of a bad row, or to
read a JSONL file that pyarrow refuses (a column whose type changes between rows).

Columns are found by name (``request_col`` etc., else the usual names in :data:`COLUMN_NAMES`).
The experts of a row are one list column (``"[1, 5]"``, ``"1 5"`` or ``"1,5"`` in CSV, a JSON list
in JSONL) or one column per slot (``expert_0``, ``expert_1``, ...; empty = no expert). Without a
request column each file is one request; without a position column a token's position is its
order of appearance within its request and layer. Layers are renumbered densely from 0 in sorted
order (the original numbers are kept as the trace's ``moe_layer_indices``). A token that lacks
some layer is dropped and counted in a warning.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moeprof.errors import MoeprofError
from moeprof.importers.common import PHASES, ImportFormat, Progress, TokenRouting, warn
from moeprof.trace import duplicate_expert

# Usual column names, compared after normalising (lower case, runs of other characters -> "_").
COLUMN_NAMES: dict[str, tuple[str, ...]] = {
    "request": (
        "request_id",
        "request",
        "req_id",
        "rid",
        "sequence_id",
        "seq_id",
        "problem_id",
        "prompt_id",
        "sample_id",
        "conversation_id",
        "query_id",
        "prompt_index",
    ),
    # Qualifiers combined with the request id when present (e.g. dataset + problem_id).
    "request_scope": ("dataset", "dataset_name", "task", "benchmark"),
    "position": (
        "position",
        "positions",
        "pos",
        "token_idx",
        "token_index",
        "token_position",
        "position_id",
        "token_pos",
    ),
    # model_layer first: a moeprof export has both, and it holds the model's own numbers.
    "layer": (
        "model_layer",
        "layer",
        "layer_id",
        "layer_idx",
        "layer_index",
        "moe_layer",
        "layer_number",
    ),
    "experts": (
        "experts",
        "expert_ids",
        "activated_expert_ids",
        "selected_experts",
        "selected_ids",
        "topk_ids",
        "topk_idx",
        "topk_indices",
        "routed_experts",
        "expert_indices",
    ),
    "weights": (
        "weights",
        "gate_weights",
        "gating_probs",
        "topk_weights",
        "routing_weights",
        "expert_weights",
        "gate_probs",
        "router_probs",
        "probs",
        "scores",
    ),
    "step": ("step", "steps", "forward_pass_id", "forward_step", "iteration"),
    "phase": ("phase", "stage"),
    "token_id": ("token_id", "input_id", "vocab_id"),
}
_SLOT_EXPERT = re.compile(r"^(?:experts?|expert_ids?|topk_ids?|topk_idx)_?(\d+)$")
_SLOT_WEIGHT = re.compile(r"^(?:weights?|gate_weights?|gating_probs?|topk_weights?|probs?)_?(\d+)$")
_INT_RE = r"^\s*[+-]?\d+\s*$"
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_MAX_EXPERT_ID = 65534  # a trace has at most 65535 experts per layer
_FLOAT_RE = r"^\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*$|^\s*(?:nan|NaN|inf|-inf)\s*$"


_Fail = Callable[[int, str], MoeprofError]  # (record index, message) -> error naming file:line


def _csv_reader(fh: Any) -> Any:
    """A csv reader without the module's 131,072-character field limit: a long experts field
    is data to check, not a reason to fail inside the parser."""
    csv.field_size_limit(_INT32_MAX)
    return csv.reader(fh)


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")


# ---------------------------------------------------------------------- locating rows


def _record_lines(path: Path, fmt: str) -> list[int]:
    """First line number of every data record (what pyarrow calls row i), read by Python."""
    lines: list[int] = []
    if fmt == "long-csv":
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = _csv_reader(fh)
            last = 0
            for i, row in enumerate(reader):
                start, last = last + 1, reader.line_num
                if i > 0 and row:  # pyarrow skips the header and empty lines
                    lines.append(start)
    else:
        with open(path, encoding="utf-8-sig") as fh:
            lines = [n for n, line in enumerate(fh, start=1) if line.strip()]
    return lines


class _Where:
    """Turns a record index of one file into 'path:line' (computed once, on first error)."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt = path, fmt
        self._lines: list[int] | None = None
        self.kept: np.ndarray | None = None  # record index of each row kept (rows left out)

    def __call__(self, record: int) -> str:
        if self._lines is None:
            self._lines = _record_lines(self.path, self.fmt)
        if self.kept is not None and 0 <= record < len(self.kept):
            record = int(self.kept[record])
        if 0 <= record < len(self._lines):
            return f"{self.path}:{self._lines[record]}"
        return f"{self.path} (row {record + 1})"

    def fail(self, record: int, message: str) -> MoeprofError:
        return MoeprofError(f"{self(record)}: {message}")


# ---------------------------------------------------------------------- reading files


def _read_csv(path: Path) -> tuple[list[str], pa.Table]:
    import pyarrow.csv as pcsv

    _check_utf8(path)
    with open(path, encoding="utf-8-sig", newline="") as fh:
        header = next(_csv_reader(fh), None)
    if not header:
        raise MoeprofError(f"{path}: empty file (no header line)")
    if len(set(header)) != len(header):
        raise MoeprofError(f"{path}:1: the header names a column twice")
    try:
        table = pcsv.read_csv(
            path,
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(
                column_types={name: pa.string() for name in header}, strings_can_be_null=False
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        raise _diagnose_csv(path, len(header), exc) from None
    return header, table


def _diagnose_csv(path: Path, n_columns: int, exc: Exception) -> MoeprofError:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = _csv_reader(fh)
        last = 0
        for i, row in enumerate(reader):
            start, last = last + 1, reader.line_num
            if i > 0 and row and len(row) != n_columns:
                return MoeprofError(
                    f"{path}:{start}: row has {len(row)} fields, the header has {n_columns}"
                )
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return MoeprofError(f"{path}: cannot parse as CSV ({reason})")


# Arrow's JSON parser recurses per nesting level and can overflow the C stack (a segfault) on
# absurdly nested input; such files go to the Python path, which refuses them with one line.
_MAX_ARROW_DEPTH = 64


_CHUNK = 1 << 24  # bytes per pre-scan read: bounded memory whatever the file size
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[ord(" "), ord("\t"), ord("\r"), ord("\n")]] = True


def _check_utf8(path: Path) -> None:
    """Refuse a file that is not UTF-8 text, naming the byte (C-speed incremental decode)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                at = offset + max(exc.start, 0)
                raise MoeprofError(f"{path}: not UTF-8 text (byte {at:,})") from None
            if not chunk:
                return
            offset += len(chunk)


def _jsonl_shape(path: Path) -> tuple[int, bool]:
    """An upper bound on the file's JSON nesting depth (brackets inside strings count too), and
    whether every non-blank line starts with ``{`` (a JSON object, the only record pyarrow's
    reader survives: a ``null`` or ``[`` record can crash it)."""
    step = np.zeros(256, dtype=np.int8)
    step[[ord("["), ord("{")]] = 1
    step[[ord("]"), ord("}")]] = -1
    level, deepest = 0, 0
    objects = True
    line_open = False  # the current line has shown its first non-blank byte
    with open(path, "rb") as fh:
        head = fh.read(3)
        if head != codecs.BOM_UTF8:
            fh.seek(0)
        while chunk := fh.read(_CHUNK):
            data = np.frombuffer(chunk, dtype=np.uint8)
            depth = level + np.cumsum(step[data], dtype=np.int64)
            deepest, level = max(deepest, int(depth.max())), int(depth[-1])
            if not objects:
                continue
            # First non-blank byte of each line: a non-blank byte whose line had none before.
            newlines = np.flatnonzero(data == ord("\n"))
            solid = np.flatnonzero(~_WHITESPACE[data])
            line_of = np.searchsorted(newlines, solid)  # line index within the chunk
            firsts = np.ones(solid.shape[0], dtype=bool)
            firsts[1:] = line_of[1:] != line_of[:-1]
            if line_open and solid.size and line_of[0] == 0:
                firsts[0] = False
            if (data[solid[firsts]] != ord("{")).any():
                objects = False
            if newlines.size:
                line_open = bool(solid.size) and int(solid[-1]) > int(newlines[-1])
            else:
                line_open = line_open or bool(solid.size)
    return deepest, objects


def _read_jsonl(path: Path) -> tuple[list[str], pa.Table]:
    import pyarrow.json as pjson

    _check_utf8(path)
    deepest, objects = _jsonl_shape(path)
    if deepest > _MAX_ARROW_DEPTH:
        return _read_jsonl_python(path, ValueError("deeply nested JSON"))
    if not objects:
        return _read_jsonl_python(path, ValueError("a record is not a JSON object"))
    try:
        table = pjson.read_json(path)
        # pyarrow's reader can build an invalid table (a list holding nulls: offsets beyond
        # its values), which crashes later kernels; such files take the Python path.
        table.validate(full=True)
    except (pa.ArrowInvalid, pa.ArrowException, UnicodeDecodeError) as exc:
        return _read_jsonl_python(path, exc)
    if table.num_rows == 0:
        raise MoeprofError(f"{path}: no JSON records")
    return list(table.column_names), table


def _read_jsonl_python(path: Path, exc: Exception) -> tuple[list[str], pa.Table]:
    """Slow path for files pyarrow refuses: bad JSON is reported by line; columns whose type
    changes between rows are kept, with scalars as strings (the converters parse them)."""
    records: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError) as err:  # bad JSON, huge ints, deep nesting
                    why = err.msg if isinstance(err, json.JSONDecodeError) else type(err).__name__
                    raise MoeprofError(f"{path}:{n}: not valid JSON ({why})") from None
                if not isinstance(obj, dict):
                    raise MoeprofError(f"{path}:{n}: a record must be a JSON object")
                records.append(obj)
    except UnicodeDecodeError:
        raise MoeprofError(f"{path}: not UTF-8 text") from None
    if not records:
        raise MoeprofError(f"{path}: no JSON records")
    names: dict[str, None] = {}
    for rec in records:
        names.update(dict.fromkeys(rec))

    def as_text(v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list) and not any(isinstance(x, (list, dict)) for x in v):
            return [as_text(x) for x in v]
        return json.dumps(v)  # nested values stay one text, however deep

    columns: dict[str, pa.Array] = {}
    for name in names:
        values = [rec.get(name) for rec in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # Overflow: int beyond 64 bits
            try:
                columns[name] = pa.array([as_text(v) for v in values])
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # lists mixed with scalars: all text
                columns[name] = pa.array(
                    [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
                )
    return list(names), pa.table(columns)


# ---------------------------------------------------------------------- columns


@dataclass(frozen=True)
class _Columns:
    request: list[str]  # empty: the file is one request
    position: str | None
    layer: str
    experts: list[str]  # one list column, or one column per slot
    weights: list[str]
    step: str | None
    phase: str | None
    token_id: str | None


def _find(names: Sequence[str], wanted: str, path: Path, option: str) -> str:
    if wanted in names:
        return wanted
    by_norm = {_norm(n): n for n in names}
    if _norm(wanted) in by_norm:
        return by_norm[_norm(wanted)]
    raise MoeprofError(f"{path}: no column {wanted!r} ({option}); columns are: {', '.join(names)}")


def _auto(names: Sequence[str], role: str) -> str | None:
    by_norm: dict[str, str] = {}
    for n in names:
        by_norm.setdefault(_norm(n), n)
    for candidate in COLUMN_NAMES[role]:
        if candidate in by_norm:
            return by_norm[candidate]
    return None


def _slots(names: Sequence[str], pattern: re.Pattern[str]) -> list[str]:
    found = sorted(
        ((int(m.group(1)), n) for n in names if (m := pattern.match(_norm(n)))), key=lambda x: x[0]
    )
    if found and [i for i, _ in found] != list(range(found[0][0], found[0][0] + len(found))):
        return []
    return [n for _, n in found]


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


NONE = "none"  # a column option's value that means "no such column": auto-detection off


def _off(value: str | None) -> bool:
    return value is not None and value.strip().lower() == NONE


def resolve_columns(
    names: Sequence[str],
    path: Path,
    *,
    request_col: str | None = None,
    position_col: str | None = None,
    layer_col: str | None = None,
    experts_col: str | None = None,
    weights_col: str | None = None,
) -> _Columns:
    """Which columns hold what: the names given, else the usual names; ``"none"`` for an optional
    column (request, position, weights) means the source has none."""
    for option, value in (("layer_col", layer_col), ("experts_col", experts_col)):
        if _off(value):
            raise MoeprofError(f"{option} cannot be {NONE}: every row needs it")
    if _off(request_col):
        request: list[str] = []
    elif request_col is not None:
        request = [_find(names, c, path, "request_col") for c in _split(request_col)]
    else:
        req = _auto(names, "request")
        scope = _auto(names, "request_scope")
        request = [c for c in (scope, req) if c is not None] if req is not None else []
    position = (
        None
        if _off(position_col)
        else _find(names, position_col, path, "position_col")
        if position_col
        else _auto(names, "position")
    )
    layer = _find(names, layer_col, path, "layer_col") if layer_col else _auto(names, "layer")
    if layer is None:
        raise MoeprofError(
            f"{path}: no layer column found among {', '.join(names)}; name it with layer_col"
        )
    if experts_col is not None:
        experts = [_find(names, c, path, "experts_col") for c in _split(experts_col)]
    else:
        one = _auto(names, "experts")
        experts = [one] if one is not None else _slots(names, _SLOT_EXPERT)
    if not experts:
        raise MoeprofError(
            f"{path}: no experts column found among {', '.join(names)}; name it with experts_col"
        )
    if _off(weights_col):
        weights: list[str] = []
    elif weights_col is not None:
        weights = [_find(names, c, path, "weights_col") for c in _split(weights_col)]
    else:
        one_w = _auto(names, "weights")
        weights = [one_w] if one_w is not None else _slots(names, _SLOT_WEIGHT)
    if weights and len(weights) != len(experts) and max(len(weights), len(experts)) > 1:
        raise MoeprofError(
            f"{path}: {len(experts)} expert columns but {len(weights)} weight columns"
        )
    return _Columns(
        request=request,
        position=position,
        layer=layer,
        experts=experts,
        weights=weights,
        step=_auto(names, "step"),
        phase=_auto(names, "phase"),
        token_id=_auto(names, "token_id"),
    )


# ---------------------------------------------------------------------- converters


def _first(mask: Any) -> int:
    return int(np.argmax(mask))


def _np(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(arr.to_numpy(zero_copy_only=False))


def _show(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return _clip(repr(value.item() if isinstance(value, np.generic) else value))


def _clip(text: str, limit: int = 60) -> str:
    """A value for an error message, shortened when very long (a 10,000-digit number)."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _arrow_errors() -> tuple[type[Exception], ...]:
    # ArrowException covers ArrowInvalid, ArrowTypeError, ArrowNotImplementedError, ...
    return (pa.ArrowException, OverflowError, ValueError, TypeError)


def _first_failing(arr: pa.Array, convert: Callable[[pa.Array], Any]) -> int | None:
    """Index of the first element that `convert` refuses, by bisection (a few conversions)."""

    def fails(a: pa.Array) -> bool:
        try:
            convert(a)
        except _arrow_errors():
            return True
        return False

    lo, hi = 0, len(arr)
    if hi == 0 or not fails(arr):
        return None
    while hi - lo > 1:  # arr[lo:hi] fails; conversion errors belong to single elements
        mid = (lo + hi) // 2
        if fails(arr.slice(lo, mid - lo)):
            hi = mid
        else:
            lo = mid
    return lo


def _convert(
    arr: pa.Array, convert: Callable[[pa.Array], Any], what: str, column: str, fail: _Fail
) -> Any:
    """``convert(arr)``; an Arrow conversion error becomes a MoeprofError naming the row and the
    value, e.g. an integer that does not fit in 64 bits."""
    try:
        return convert(arr)
    except _arrow_errors() as exc:
        i = _first_failing(arr, convert)
        if i is None:  # not tied to one value
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise fail(0, f"cannot convert column {column!r} ({reason})") from None
        value = arr[i].as_py()
        text = value.strip() if isinstance(value, str) else str(value)
        if re.fullmatch(r"[+-]?\d+", text):
            raise fail(
                i, f"{what} {_clip(text)} in column {column!r} does not fit in a 64-bit integer"
            ) from None
        raise fail(i, f"{what} {_show(value)} in column {column!r} cannot be converted") from None


def _to_int64(arr: pa.Array) -> pa.Array:
    return pc.cast(arr, pa.int64())


def _to_float64(arr: pa.Array) -> pa.Array:
    # Unsafe: a large integer gate weight may lose precision, which is harmless.
    return pc.cast(arr, pa.float64(), safe=False)


def _in_range(values: np.ndarray, what: str, lo: int, hi: int, fail: _Fail) -> None:
    """Every value in lo..hi, else an error naming the first row outside."""
    bad = (values < lo) | (values > hi)
    if bad.any():
        i = _first(bad)
        v = int(values[i])
        if lo == 0 and v < 0:
            raise fail(i, f"{what} {v} is negative")
        raise fail(i, f"{what} {v} is out of range ({lo}..{hi})")


def _ints(
    col: pa.ChunkedArray | pa.Array, what: str, column: str, fail: _Fail, *, nullable: bool = False
) -> np.ndarray:
    """int64 values of a column; with ``nullable`` nulls (and empty strings) become -1."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = arr.type
    missing = f"no {what} ({column!r} is empty or absent)"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        empty = _np(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(arr), ""), True))
        ok = _np(pc.fill_null(pc.match_substring_regex(arr, _INT_RE), False)) | empty
        if not ok.all():
            i = _first(~ok)
            raise fail(i, f"{what} {_show(arr[i].as_py())} in column {column!r} is not an integer")
        if empty.any() and not nullable:
            raise fail(_first(empty), missing)
        filled = pc.if_else(pa.array(empty), "-1", pc.utf8_trim_whitespace(arr))
        try:
            return _np(_to_int64(filled)).astype(np.int64)
        except _arrow_errors():
            # Arrow does not parse a leading "+"; beyond that, a number too large for 64 bits.
            filled = pc.replace_substring_regex(filled, r"^\+", "")
            return _np(_convert(filled, _to_int64, what, column, fail)).astype(np.int64)
    nulls = _np(arr.is_null())
    if nulls.any() and not nullable:
        raise fail(_first(nulls), missing)
    if pa.types.is_integer(t):
        # A safe cast: a uint64 beyond int64 is an error, not a wrap-around.
        as_int64 = _convert(arr, _to_int64, what, column, fail)
        return _np(pc.fill_null(as_int64, -1)).astype(np.int64)
    if pa.types.is_floating(t):
        # JSON integers beyond int64 arrive as floats (1e+23): refuse them, do not wrap.
        vals = _np(pc.fill_null(arr, -1.0)).astype(np.float64)
        bad = ~np.isfinite(vals) | (vals != np.floor(vals))
        if bad.any():
            i = _first(bad)
            raise fail(i, f"{what} {_show(vals[i])} in column {column!r} is not an integer")
        huge = (vals < -(2.0**63)) | (vals >= 2.0**63)
        if huge.any():
            i = _first(huge)
            raise fail(
                i, f"{what} {_show(vals[i])} in column {column!r} does not fit in a 64-bit integer"
            )
        return vals.astype(np.int64)
    if pa.types.is_null(t):
        if nullable:
            return np.full(len(arr), -1, dtype=np.int64)
        raise fail(0, missing)
    raise fail(0, f"column {column!r} must hold integers ({what}), got {t}")


def _floats(col: pa.ChunkedArray | pa.Array, what: str, column: str, fail: _Fail) -> np.ndarray:
    """float64 values of a column; nulls and empty strings become NaN."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        trimmed = pc.utf8_trim_whitespace(arr)
        empty = _np(pc.fill_null(pc.equal(trimmed, ""), True))
        ok = _np(pc.fill_null(pc.match_substring_regex(arr, _FLOAT_RE), False)) | empty
        if not ok.all():
            i = _first(~ok)
            raise fail(i, f"{what} {_show(arr[i].as_py())} in column {column!r} is not a number")
        filled = pc.if_else(pa.array(empty), "nan", trimmed)
        return _np(_convert(filled, _to_float64, what, column, fail)).astype(np.float64)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return _np(_convert(arr, _to_float64, what, column, fail)).astype(np.float64)
    if pa.types.is_null(t):
        return np.full(len(arr), np.nan)
    raise fail(0, f"column {column!r} must hold numbers ({what}), got {t}")


def _lists(
    col: pa.ChunkedArray, what: str, column: str, fail: _Fail, *, floats: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Flattened values and per-row counts of a list column (a list type, or text like '[1, 5]')."""
    arr = col.combine_chunks()
    t = arr.type
    missing = f"no {what}s ({column!r} is empty or absent)"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        text = pc.utf8_trim_whitespace(pc.replace_substring_regex(arr, r"[\[\]()]", ""))
        nulls = _np(arr.is_null())
        if nulls.any():
            raise fail(_first(nulls), missing)
        arr = pc.split_pattern_regex(text, r"[\s,;]+")
        # "" splits into [""]: an empty list.
        arr = pc.if_else(pc.equal(text, ""), pa.scalar([], type=arr.type), arr)
        t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        nulls = _np(arr.is_null())
        if nulls.any():
            raise fail(_first(nulls), missing)
        counts = _np(pc.list_value_length(arr)).astype(np.int64)
        flat = pc.list_flatten(arr)
        row_of = np.repeat(np.arange(len(arr)), counts)

        def flat_fail(element: int, message: str) -> MoeprofError:
            return fail(int(row_of[element]), message)

        if len(flat) == 0:  # every list empty: nothing to convert (the caller refuses k = 0)
            values = np.zeros(0, dtype=np.float64 if floats else np.int64)
        elif floats:
            values = _floats(flat, what, column, flat_fail)
        else:
            flat_nulls = _np(flat.is_null())
            if flat_nulls.any():
                raise flat_fail(_first(flat_nulls), f"a {what} in column {column!r} is null")
            values = _ints(flat, what, column, flat_fail)
        return values, counts
    if floats and (pa.types.is_floating(t) or pa.types.is_integer(t)):
        return _floats(arr, what, column, fail), np.ones(len(arr), dtype=np.int64)
    if not floats and (pa.types.is_integer(t) or pa.types.is_floating(t)):
        return _ints(arr, what, column, fail), np.ones(len(arr), dtype=np.int64)
    raise fail(0, f"column {column!r} must hold lists of {what}s, got {t}")


def _matrix(
    table: pa.Table, names: list[str], what: str, fail: _Fail, *, floats: bool, top_k: int | None
) -> np.ndarray:
    """[rows, K] matrix from one list column or from one column per slot (nulls -> -1 / NaN)."""
    n = table.num_rows
    if len(names) > 1:
        cols = [
            _floats(table[c], what, c, fail)
            if floats
            else _ints(table[c], what, c, fail, nullable=True)
            for c in names
        ]
        return np.stack(cols, axis=1)
    values, counts = _lists(table[names[0]], what, names[0], fail, floats=floats)
    k = int(counts[0]) if top_k is None else top_k
    if k == 0:
        raise fail(0, f"no {what}s in column {names[0]!r}")
    wrong = counts != k
    if wrong.any():
        i = _first(wrong)
        raise fail(i, f"{int(counts[i])} {what}s where rows have {k}")
    return values.reshape(n, k)


def _all_missing(col: pa.ChunkedArray) -> bool:
    arr = col.combine_chunks()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return bool(_np(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(arr), ""), True)).all())
    return arr.null_count == len(arr)


def _phase_codes(col: pa.ChunkedArray, col_name: str, fail: _Fail) -> np.ndarray:
    arr = col.combine_chunks()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        text = _np(pc.fill_null(pc.utf8_lower(pc.utf8_trim_whitespace(arr)), ""))
        out = np.full(len(text), 255, dtype=np.int64)
        for name, code in PHASES.items():
            out[(text == name) | (text == str(code))] = code
    else:
        out = _ints(arr, "phase", col_name, fail)
    bad = ~np.isin(out, list(PHASES.values()))
    if bad.any():
        raise fail(_first(bad), "phase must be prefill, decode, 0 or 1")
    return out


# ---------------------------------------------------------------------- one file


@dataclass
class _FileRows:
    request: np.ndarray  # int64 [n]: request code within the file, first appearance order
    request_labels: list[str]
    position: np.ndarray | None
    layer: np.ndarray
    experts: np.ndarray  # int64 [n, K], -1 = no expert
    weights: np.ndarray | None  # float64 [n, K]
    step: np.ndarray | None
    phase: np.ndarray | None
    token_id: np.ndarray | None
    columns: _Columns
    where: _Where
    metadata_records: int = 0  # records without routing columns, set aside
    metadata: dict[str, Any] = field(default_factory=dict)  # their simple fields


def _request_codes(
    table: pa.Table, cols: list[str], path: Path, fail: _Fail
) -> tuple[np.ndarray, list[str]]:
    """Request of each row, numbered by first appearance, and a label per request."""
    n = table.num_rows
    if not cols:
        return np.zeros(n, dtype=np.int64), [path.name]
    codes = np.zeros(n, dtype=np.int64)
    for name in cols:
        col = table[name].combine_chunks()
        if not (
            pa.types.is_string(col.type)
            or pa.types.is_large_string(col.type)
            or pa.types.is_integer(col.type)
            or pa.types.is_floating(col.type)
            or pa.types.is_boolean(col.type)
            or pa.types.is_null(col.type)
        ):
            raise fail(0, f"request id column {name!r} must hold numbers or text, got {col.type}")
        missing = _np(col.is_null())
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            missing |= _np(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(col), ""), True))
        if missing.any():
            raise fail(_first(missing), f"no request id ({name!r} is empty or absent)")
        enc = pc.dictionary_encode(col)
        codes = codes * len(enc.dictionary) + _np(enc.indices).astype(np.int64)
    # Renumber by first appearance so requests keep the file's order.
    uniq, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    labels: list[str] = [""] * len(uniq)
    for u, row in zip(range(len(uniq)), first.tolist()):
        parts = [str(table[name][row].as_py()) for name in cols]
        labels[int(rank[u])] = "/".join(parts)
    return rank[inverse], labels


def _simple(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _metadata_rows(table: pa.Table, cols: _Columns) -> np.ndarray:
    """Rows that carry none of the routing columns (no layer, no experts): metadata records."""
    absent = _np(table[cols.layer].is_null())
    for name in cols.experts:
        absent &= _np(table[name].is_null())
    return absent


def _where_mask(table: pa.Table, where: Sequence[tuple[str, str]], path: Path) -> np.ndarray:
    """Rows whose columns equal the values of every ``(column, value)`` (compared as text)."""
    keep = np.ones(table.num_rows, dtype=bool)
    names = list(table.column_names)
    for column, value in where:
        name = _find(names, column, path, "where")
        col = table[name].combine_chunks()
        if not (pa.types.is_primitive(col.type) or pa.types.is_string(col.type)):
            raise MoeprofError(f"{path}: where: column {name!r} holds {col.type}, not values")
        if pa.types.is_boolean(col.type):
            text = pc.if_else(col, "true", "false")
        else:
            text = pc.cast(col, pa.string())
        keep &= _np(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(text), value.strip()), False))
    return keep


def _read_file(
    path: Path,
    fmt: str,
    options: dict[str, str | None],
    n_experts: int | None,
    top_k: int | None,
    where_filters: Sequence[tuple[str, str]] = (),
) -> _FileRows:
    names, table = _read_csv(path) if fmt == "long-csv" else _read_jsonl(path)
    where = _Where(path, fmt)
    cols = resolve_columns(names, path, **options)
    if table.num_rows == 0:
        raise MoeprofError(f"{path}: no data rows")
    # Records with no routing at all (a header line of model facts) are set aside, their simple
    # fields kept; then --where filters the routing rows.
    meta_rows = _metadata_rows(table, cols)
    metadata: dict[str, Any] = {}
    if meta_rows.any():
        routing_names = {cols.layer, *cols.experts}
        for row in np.flatnonzero(meta_rows)[:100].tolist():  # a few records at most, in practice
            for key, value in table.slice(row, 1).to_pylist()[0].items():
                if key not in routing_names and value is not None and _simple(value):
                    metadata.setdefault(key, value)
    keep = ~meta_rows
    if where_filters:
        keep &= _where_mask(table, where_filters, path)
    if not keep.all():
        kept = np.flatnonzero(keep)
        where.kept = kept
        table = table.take(pa.array(kept))
    if table.num_rows == 0:
        raise MoeprofError(
            f"{path}: no routing rows"
            + (" match the where filters" if where_filters else "")
            + (f" ({int(meta_rows.sum())} metadata records)" if meta_rows.any() else "")
        )
    fail = where.fail
    # Ranges a trace can hold: layer numbers and positions 0..2^31-1, steps and token ids int32.
    layer = _ints(table[cols.layer], "layer", cols.layer, fail)
    _in_range(layer, "layer", 0, _INT32_MAX, fail)
    position = (
        _ints(table[cols.position], "position", cols.position, fail) if cols.position else None
    )
    if position is not None:
        _in_range(position, "position", 0, _INT32_MAX, fail)
    experts = _matrix(table, cols.experts, "expert id", fail, floats=False, top_k=top_k)
    negative = experts < -1 if len(cols.experts) > 1 else experts < 0
    if negative.any():
        i = _first(negative.any(axis=1))
        raise fail(i, f"expert id {int(experts[i].min())} is negative")
    if n_experts is None and (experts > _MAX_EXPERT_ID).any():
        i = _first((experts > _MAX_EXPERT_ID).any(axis=1))
        raise fail(
            i,
            f"expert id {int(experts[i].max())} is out of range "
            f"(a trace holds at most {_MAX_EXPERT_ID + 1} experts per layer)",
        )
    # -1 marks an empty slot here; a real expert named twice in one row is malformed.
    dup = duplicate_expert(experts[:, None, :], np.array([-1]))
    if dup:
        raise fail(dup[0], f"expert id {dup[2]} appears twice in one row")
    if n_experts is not None and (experts >= n_experts).any():
        i = _first((experts >= n_experts).any(axis=1))
        raise fail(i, f"expert id {int(experts[i].max())} is out of range for {n_experts} experts")
    weights = None
    if cols.weights:
        weights = _matrix(
            table, cols.weights, "gate weight", fail, floats=True, top_k=experts.shape[1]
        )
    request, labels = _request_codes(table, cols.request, path, fail)
    # Optional per-token columns that are empty throughout (a moeprof export of a trace without
    # them) count as absent.
    step, phase, token = (
        c if c is not None and not _all_missing(table[c]) else None
        for c in (cols.step, cols.phase, cols.token_id)
    )
    steps = _ints(table[step], "step", step, fail) if step else None
    if steps is not None:
        _in_range(steps, "step", _INT32_MIN, _INT32_MAX, fail)
    token_ids = _ints(table[token], "token id", token, fail) if token else None
    if token_ids is not None:
        _in_range(token_ids, "token id", _INT32_MIN, _INT32_MAX, fail)
    return _FileRows(
        request=request,
        request_labels=labels,
        position=position,
        layer=layer,
        experts=experts,
        weights=weights,
        step=steps,
        phase=_phase_codes(table[phase], phase, fail) if phase else None,
        token_id=token_ids,
        columns=cols,
        where=where,
        metadata_records=int(meta_rows.sum()),
        metadata=metadata,
    )


# ---------------------------------------------------------------------- all files -> tokens

REQUEST_SCOPES = ("file", "global")
# Metadata-record fields that name the model (the first found with a text value wins).
_MODEL_ID_KEYS = ("model_id", "model", "model_name", "model_path")


def _steps_from_resets(
    parts: list[_FileRows], request: np.ndarray, layer: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the forward pass (a new one wherever the position column does not increase,
    per file and layer, in row order) and the token's position in its request (order in the
    log: by pass, then by index within the pass)."""
    index = np.concatenate([p.position for p in parts if p.position is not None])
    file_of = np.repeat(np.arange(len(parts)), [p.layer.shape[0] for p in parts])
    stream = file_of * (int(layer.max()) + 1) + layer  # rows of one (file, layer), in order
    order = np.argsort(stream, kind="stable")
    s_index, s_stream = index[order], stream[order]
    starts = np.ones(order.shape[0], dtype=bool)
    starts[1:] = (s_stream[1:] != s_stream[:-1]) | (s_index[1:] <= s_index[:-1])
    new_stream = np.ones(order.shape[0], dtype=bool)
    new_stream[1:] = s_stream[1:] != s_stream[:-1]
    # Pass number restarts at 0 in each stream: cumulative starts minus the stream's first.
    count = np.cumsum(starts) - 1
    first = np.maximum.accumulate(np.where(new_stream, count, 0))
    step = np.empty_like(count)
    step[order] = count - first
    if int(step.max()) > _INT32_MAX:
        raise MoeprofError("step_from_resets: more forward passes than a trace holds")
    # A token is (request, pass, index); its position is its rank within the request.
    keys, token = np.unique(np.stack([request, step, index], axis=1), axis=0, return_inverse=True)
    token = token.reshape(-1)
    first_of_request = np.searchsorted(keys[:, 0], keys[:, 0], side="left")
    rank = np.arange(keys.shape[0]) - first_of_request
    return step.astype(np.int64), rank[token].astype(np.int64)


def _rank_within(groups: np.ndarray) -> np.ndarray:
    """Order of appearance of each row among rows of the same group (0, 1, 2, ...)."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    first = np.searchsorted(sorted_groups, sorted_groups, side="left")
    rank = np.empty(groups.shape[0], dtype=np.int64)
    rank[order] = np.arange(groups.shape[0]) - first
    return rank


def _per_token(
    values: np.ndarray, token: np.ndarray, n_tokens: int, what: str, locate: Any
) -> np.ndarray:
    """One value per token from its rows; every layer's row must agree."""
    order = np.argsort(token, kind="stable")
    first_row = order[np.searchsorted(token[order], np.arange(n_tokens))]
    out = values[first_row]
    differs = values != out[token]
    if differs.any():
        i = _first(differs)
        raise MoeprofError(f"{locate(i)}: {what} differs from the token's other layers")
    return out


def _optional(parts: list[np.ndarray | None], what: str) -> np.ndarray | None:
    present = [p is not None for p in parts]
    if not any(present):
        return None
    if not all(present):
        raise MoeprofError(f"some files have a {what} column and others do not")
    return np.concatenate([p for p in parts if p is not None])


def read_long_table(
    files: Sequence[Path],
    fmt: str,
    *,
    n_experts: int | None = None,
    progress: Progress | None = None,
    request_col: str | None = None,
    position_col: str | None = None,
    layer_col: str | None = None,
    experts_col: str | None = None,
    weights_col: str | None = None,
    where: Sequence[tuple[str, str]] = (),
    request_scope: str = "file",
    step_from_resets: bool = False,
) -> TokenRouting:
    """Read long-table files (in the order given) into token-major routing.

    ``where``: keep only rows whose column equals the value, for each (column, value).
    ``request_scope``: "file" (a request id names a request within its file) or "global" (the
    same id in several files is one request, e.g. one file per layer). ``step_from_resets``: the
    position column counts rows within a forward pass, restarting every pass; each restart
    begins a new step, and positions become the tokens' order in the log (docs/import.md).
    """
    if request_scope not in REQUEST_SCOPES:
        raise MoeprofError(f"request_scope must be file or global, got {request_scope!r}")
    options = {
        "request_col": request_col,
        "position_col": position_col,
        "layer_col": layer_col,
        "experts_col": experts_col,
        "weights_col": weights_col,
    }
    parts: list[_FileRows] = []
    top_k: int | None = None
    for i, path in enumerate(files):
        rows = _read_file(path, fmt, options, n_experts, top_k, where)
        if top_k is not None and rows.experts.shape[1] != top_k:
            raise rows.where.fail(0, f"{rows.experts.shape[1]} expert ids where rows have {top_k}")
        top_k = rows.experts.shape[1]
        parts.append(rows)
        if progress is not None:
            progress(i + 1, len(files))

    n_rows = [p.layer.shape[0] for p in parts]
    file_of_row = np.repeat(np.arange(len(parts)), n_rows)
    row_start = np.concatenate(([0], np.cumsum(n_rows)))

    def locate_row(row: int) -> str:
        f = int(file_of_row[row])
        return parts[f].where(row - int(row_start[f]))

    many_files = len(parts) > 1
    if request_scope == "global":
        # One request per id across files: codes by first appearance of each label.
        code_of: dict[str, int] = {}
        for p in parts:
            for label in p.request_labels:
                code_of.setdefault(label, len(code_of))
        request = np.concatenate(
            [
                np.asarray([code_of[x] for x in p.request_labels], dtype=np.int64)[p.request]
                for p in parts
            ]
        )
        labels = list(code_of)
    else:
        # Requests: (file, request code) in order of appearance across files.
        offsets = np.concatenate(([0], np.cumsum([len(p.request_labels) for p in parts])))
        request = np.concatenate([p.request + offsets[f] for f, p in enumerate(parts)])
        labels = [
            (f"{p.where.path.name}:{label}" if many_files and label != p.where.path.name else label)
            for p in parts
            for label in p.request_labels
        ]
    layer_raw = np.concatenate([p.layer for p in parts])
    layer_numbers, layer = np.unique(layer_raw, return_inverse=True)
    n_layers = layer_numbers.shape[0]
    positions_given = [p.position is not None for p in parts]
    if any(positions_given) and not all(positions_given):
        raise MoeprofError("some files have a position column and others do not")
    reset_steps = None
    if step_from_resets:
        if not all(positions_given):
            raise MoeprofError("step_from_resets needs a position column (the index in the pass)")
        if any(p.step is not None for p in parts):
            raise MoeprofError("step_from_resets: the source has a step column already")
        reset_steps, position = _steps_from_resets(parts, request, layer)
    elif all(positions_given):
        position = np.concatenate([p.position for p in parts if p.position is not None])
    else:
        # Order of appearance within (request, layer).
        position = _rank_within(request * n_layers + layer)
    if int(position.max()) >= 2**31:
        raise MoeprofError(f"{locate_row(_first(position >= 2**31))}: position too large")

    token_key = request * (1 << 31) + position
    token_keys, token = np.unique(token_key, return_inverse=True)
    n_tokens0 = token_keys.shape[0]
    cell = token * n_layers + layer
    order = np.argsort(cell, kind="stable")
    dup = cell[order][1:] == cell[order][:-1]
    if dup.any():
        j = _first(dup)
        first_row, again = int(order[j]), int(order[j + 1])
        raise MoeprofError(
            f"{locate_row(again)}: a second row for request {labels[int(request[again])]!r}, "
            f"position {int(position[again])}, layer {int(layer_numbers[layer[again]])} "
            f"(first at {locate_row(first_row)})"
            + (
                "; if positions restart every forward pass, step_from_resets numbers the passes"
                if not step_from_resets and int(position[again]) == 0
                else ""
            )
        )
    counts = np.bincount(token, minlength=n_tokens0)
    complete = counts == n_layers

    experts = np.concatenate([p.experts for p in parts])
    k = experts.shape[1]
    ids = np.full((n_tokens0, n_layers, k), -1, dtype=np.int64)
    ids[token, layer] = experts
    weights_rows = _optional([p.weights for p in parts], "gate weights")
    weights = None
    if weights_rows is not None:
        weights = np.full((n_tokens0, n_layers, k), np.nan, dtype=np.float64)
        weights[token, layer] = weights_rows

    def per_token(name: str, what: str) -> np.ndarray | None:
        values = _optional([getattr(p, name) for p in parts], what)
        if values is None:
            return None
        return _per_token(values, token, n_tokens0, what, locate_row)[complete]

    steps = per_token("step", "step")
    if reset_steps is not None:
        steps = _per_token(reset_steps, token, n_tokens0, "step", locate_row)[complete]
    phase = per_token("phase", "phase")
    token_ids = per_token("token_id", "token id")

    token_request = (token_keys >> 31).astype(np.int64)
    token_position = (token_keys & ((1 << 31) - 1)).astype(np.int64)
    n_dropped = int((~complete).sum())
    if n_dropped:
        t = _first(~complete)
        present = np.zeros((n_tokens0, n_layers), dtype=bool)
        present[token, layer] = True
        missing = layer_numbers[(~present[~complete]).any(axis=0)].tolist()
        shown = ", ".join(str(x) for x in missing[:8]) + (", ..." if len(missing) > 8 else "")
        hint = (
            "; the files may hold the same requests (one layer per file): "
            "request_scope global reads a request id as one request across files"
            if many_files and request_scope == "file"
            else ""
        )
        detail = (
            f"some of the {n_layers} layers (layers missing: {shown}; first: request "
            f"{labels[int(token_request[t])]!r}, position {int(token_position[t])}, "
            f"{int(counts[t])} layers){hint}"
        )
        if n_dropped == n_tokens0:
            raise MoeprofError(f"no complete tokens: all {n_tokens0:,} tokens lack {detail}")
        warn(f"dropped {n_dropped:,} of {n_tokens0:,} tokens that lack {detail}")
    kept_request = token_request[complete]
    used, dense = np.unique(kept_request, return_inverse=True)
    metadata: dict[str, Any] = {}
    for p in parts:
        for key, value in p.metadata.items():
            metadata.setdefault(key, value)
    model_id = next((metadata[k] for k in _MODEL_ID_KEYS if isinstance(metadata.get(k), str)), None)
    return TokenRouting(
        expert_ids=ids[complete],
        request_ids=dense.astype(np.int64),
        positions=token_position[complete],
        request_labels=[labels[int(r)] for r in used],
        layer_numbers=[int(x) for x in layer_numbers],
        gate_weights=None if weights is None else weights[complete],
        steps=steps,
        phase=phase,
        token_ids=token_ids,
        model_id=model_id,
        details={
            "rows": int(sum(n_rows)),
            "dropped_tokens": n_dropped,
            "metadata_records": sum(p.metadata_records for p in parts),
            **({"metadata": metadata} if metadata else {}),
            **({"request_scope": request_scope} if many_files else {}),
            **({"steps": "from position resets"} if step_from_resets else {}),
            # The columns read (of the first file), for provenance.
            "columns": {k: v for k, v in asdict(parts[0].columns).items() if v not in (None, [])},
        },
    )


class _LongTableFormat(ImportFormat):
    column_options = True

    def read(
        self,
        files: Sequence[Path],
        *,
        n_experts: int | None,
        progress: Progress | None,
        **columns: Any,
    ) -> TokenRouting:
        return read_long_table(files, self.name, n_experts=n_experts, progress=progress, **columns)


class LongCsvFormat(_LongTableFormat):
    name = "long-csv"
    suffixes = (".csv",)
    help = "one row per (request, token, layer)"


class LongJsonlFormat(_LongTableFormat):
    name = "long-jsonl"
    suffixes = (".jsonl", ".ndjson")
    help = "one JSON object per (request, token, layer)"
