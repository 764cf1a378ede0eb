"""The results JSON (the contract between stages): read it and check the shape renderers rely on.

Pure checks on a dict; :func:`load_results` is the one place that reads a results file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moeprof.errors import MoeprofError

_INT_LIMIT = 2**63  # counts beyond int64 are not something analyze writes
_BYTES_LIMIT = 2**128


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and -_INT_LIMIT < x < _INT_LIMIT


def _is_byte_total(x: Any) -> bool:
    """Byte totals are exact Python ints in analyze and may pass int64 (2^63 bytes is 8 EiB:
    billions of loads of multi-GB experts); bounded only against hostile input."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < _BYTES_LIMIT


def _is_number(x: Any) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return _is_int(x) if isinstance(x, int) else math.isfinite(x)


def _int_list(x: Any) -> bool:
    return isinstance(x, list) and all(_is_int(v) for v in x)


# What the renderers read, and the type each must have. Optional keys are checked when present.
_ROW_TYPES: dict[str, Callable[[Any], bool]] = {
    "batch_size": _is_int,
    "policy": lambda x: isinstance(x, str),
    "requests": _is_int,
    "unique": _is_int,
    "memory_savings": _is_number,
    "bandwidth_savings": _is_number,
    "bytes_requested": _is_byte_total,
    "bytes_unique": _is_byte_total,
    "layers": lambda x: isinstance(x, list),
}
_ROW_OPTIONAL: dict[str, Callable[[Any], bool]] = {
    "n_batches": _is_int,
    "tokens": _is_int,
    "max_reuse_factor": _is_number,
    "max_reuse_layer": _is_int,
    "uniform_unique": _is_number,
    "uniform_memory_savings": _is_number,
}
_LAYER_TYPES: dict[str, Callable[[Any], bool]] = {"layer": _is_int, "memory_savings": _is_number}
_LAYER_OPTIONAL: dict[str, Callable[[Any], bool]] = {"model_layer": _is_int, "requests": _is_int}
_TRACE_OPTIONAL: dict[str, Callable[[Any], bool]] = {
    "n_experts": _int_list,
    "expert_bytes": _int_list,
    "top_k": _is_int,
    "n_tokens": _is_int,
    "n_requests": _is_int,
    "n_layers": _is_int,
    "model": lambda x: x is None or isinstance(x, dict),
    "source": lambda x: x is None or isinstance(x, dict),
}


def _check_fields(
    obj: dict[str, Any],
    required: dict[str, Callable[[Any], bool]],
    optional: dict[str, Callable[[Any], bool]],
    where: str,
) -> None:
    missing = [k for k in required if k not in obj]
    if missing:
        raise MoeprofError(f"{where} lacks {', '.join(missing)}")
    for key, ok in (*required.items(), *optional.items()):
        if key in obj and not ok(obj[key]):
            raise MoeprofError(f"{where}.{key} has the wrong type ({obj[key]!r:.40})")


def _is_str(x: Any) -> bool:
    return isinstance(x, str)


def _int_or_none(x: Any) -> bool:
    return x is None or _is_int(x)


def _number_or_none(x: Any) -> bool:
    return x is None or _is_number(x)


# A `moeprof cache` document (kind "cache", docs/cache.md "Results JSON").
_CACHE_ROW_TYPES: dict[str, Callable[[Any], bool]] = {
    "strategy": _is_str,
    "batch_size": _is_int,
    "policy": _is_str,
    "cache_experts": _is_int,
    "budget": _is_str,
    "requests": _is_int,
    "unique": _is_int,
    "loads": _is_int,
    "bytes_loaded": _int_or_none,
    "hit_rate": _is_number,
    "bytes_per_token": _number_or_none,
    "layers": lambda x: isinstance(x, list),
}
_CACHE_ROW_OPTIONAL: dict[str, Callable[[Any], bool]] = {
    "cache_spelling": _is_str,
    "savings_vs_naive": _is_number,
    "savings_vs_dedup": _is_number,
    "gap_captured": _number_or_none,
    "link_tokens_per_second": _number_or_none,
}
_CACHE_LAYER_TYPES: dict[str, Callable[[Any], bool]] = {
    "layer": _is_int,
    "requests": _is_int,
    "unique": _is_int,
    "loads": _is_int,
}
_CACHE_GAP_TYPES: dict[str, Callable[[Any], bool]] = {
    "batch_size": _is_int,
    "cache_experts": _is_int,
    "lru_loads": _is_int,
    "belady_loads": _is_int,
    "lru_hit_rate": _is_number,
    "belady_hit_rate": _is_number,
    "gap_loads": _is_int,
    "gap_points": _is_number,
}
_PREFETCH_ROW_TYPES: dict[str, Callable[[Any], bool]] = {
    "batch_size": _is_int,
    "predictor": _is_str,
    "strategy": lambda x: x is None or _is_str(x),
    "cache_experts": _is_int,
    "recall": _number_or_none,
    "precision": _number_or_none,
    "critical_loads": _is_int,
    "wasted_bytes": _is_int,
}
_CACHE_WORKING_SET_TYPES: dict[str, Callable[[Any], bool]] = {
    "batch_size": _is_int,
    "layer": _is_int,
    "mean": _is_number,
    "p95": _is_int,
    "max": _is_int,
}


def _check_list(
    doc: dict[str, Any], key: str, types: dict[str, Callable[[Any], bool]], source: str
) -> None:
    items = doc.get(key, [])
    if not isinstance(items, list):
        raise MoeprofError(f"{source}: {key} is not a list")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise MoeprofError(f"{source}: {key}[{i}] is not an object")
        _check_fields(item, types, {}, f"{source}: {key}[{i}]")


def validate_cache_results(doc: dict[str, Any], source: str = "results") -> dict[str, Any]:
    """Check a `moeprof cache` document (kind "cache"); return it."""
    if not isinstance(doc.get("results"), list) or not doc["results"]:
        raise MoeprofError(f"{source}: a cache results file needs a non-empty 'results' list")
    if not isinstance(doc.get("trace"), dict):
        raise MoeprofError(f"{source}: not a moeprof results file (no 'trace' object)")
    if not isinstance(doc.get("cache", {}), dict):
        raise MoeprofError(f"{source}: cache is not an object")
    _check_fields(doc["trace"], {}, _TRACE_OPTIONAL, f"{source}: trace")
    for i, row in enumerate(doc["results"]):
        if not isinstance(row, dict):
            raise MoeprofError(f"{source}: results[{i}] is not an object")
        _check_fields(row, _CACHE_ROW_TYPES, _CACHE_ROW_OPTIONAL, f"{source}: results[{i}]")
        for j, layer in enumerate(row["layers"]):
            if not isinstance(layer, dict):
                raise MoeprofError(f"{source}: results[{i}].layers[{j}] is not an object")
            _check_fields(layer, _CACHE_LAYER_TYPES, {}, f"{source}: results[{i}].layers[{j}]")
    _check_list(doc, "gaps", _CACHE_GAP_TYPES, source)
    _check_list(doc, "working_sets", _CACHE_WORKING_SET_TYPES, source)
    if "prefetch" in doc:
        if not isinstance(doc["prefetch"], dict):
            raise MoeprofError(f"{source}: prefetch is not an object")
        _check_list(doc["prefetch"], "rows", _PREFETCH_ROW_TYPES, f"{source}: prefetch")
    policies = {row["policy"] for row in doc["results"]}
    if len(policies) > 1:
        raise MoeprofError(f"{source}: rows mix batching policies ({', '.join(sorted(policies))})")
    return doc


def _check_notes(doc: dict[str, Any], source: str) -> None:
    notes = doc.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise MoeprofError(f"{source}: notes is not a list of sentences")


def validate_results(doc: Any, source: str = "results") -> dict[str, Any]:
    """Check that `doc` has the results-JSON shape and types the renderers read; return it."""
    if isinstance(doc, dict) and doc.get("kind") == "cache":
        return validate_cache_results(doc, source)
    if isinstance(doc, dict) and doc.get("kind") == "schedule":
        return validate_schedule_results(doc, source)
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise MoeprofError(f"{source}: not a moeprof results file (no 'results' list)")
    if not doc["results"]:
        raise MoeprofError(f"{source}: the results list is empty")
    if not isinstance(doc.get("trace"), dict):
        raise MoeprofError(f"{source}: not a moeprof results file (no 'trace' object)")
    _check_fields(doc["trace"], {}, _TRACE_OPTIONAL, f"{source}: trace")
    _check_notes(doc, source)
    for i, row in enumerate(doc["results"]):
        if not isinstance(row, dict):
            raise MoeprofError(f"{source}: results[{i}] is not an object")
        _check_fields(row, _ROW_TYPES, _ROW_OPTIONAL, f"{source}: results[{i}]")
        seen: set[int] = set()
        for j, layer in enumerate(row["layers"]):
            if not isinstance(layer, dict):
                raise MoeprofError(f"{source}: results[{i}].layers[{j}] is not an object")
            _check_fields(
                layer, _LAYER_TYPES, _LAYER_OPTIONAL, f"{source}: results[{i}].layers[{j}]"
            )
            if layer["layer"] in seen:
                raise MoeprofError(f"{source}: results[{i}] lists layer {layer['layer']} twice")
            seen.add(layer["layer"])
    policies = {row["policy"] for row in doc["results"]}
    if len(policies) > 1:
        raise MoeprofError(f"{source}: rows mix batching policies ({', '.join(sorted(policies))})")
    return doc


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise MoeprofError(f"results file {p} not found")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers too long to parse.
        raise MoeprofError(f"{p}: not valid JSON ({exc.__class__.__name__})") from None
    except OSError as exc:
        raise MoeprofError(f"cannot read {p}: {exc.strerror}") from None
    return validate_results(doc, str(p))


# A `moeprof schedule` document (kind "schedule", docs/schedule.md "Results JSON").
_SCHEDULE_ROW_TYPES: dict[str, Callable[[Any], bool]] = {
    "admission": _is_str,
    "batch_size": _is_int,
    "steps": _is_int,
    "n_batches": _is_int,
    "generated_tokens": _is_int,
    "loads": _is_int,
    "loads_per_generated_token": _is_number,
    "bytes_per_generated_token": _number_or_none,
    "reduction_vs_fifo": _is_number,
    "oracle_share": _number_or_none,
    "wait_mean": _is_number,
    "wait_p95": _is_int,
    "wait_max": _is_int,
    "occupancy_mean": _is_number,
    "schedule_seconds": _is_number,
    "decision_seconds": _is_number,
}
_SCHEDULE_ROW_OPTIONAL: dict[str, Callable[[Any], bool]] = {
    "bytes_loaded": _int_or_none,
    "cache_loads": _int_or_none,
    "cache_bytes_per_generated_token": _number_or_none,
    "cache_reduction_vs_fifo": _number_or_none,
}


def validate_schedule_results(doc: dict[str, Any], source: str = "results") -> dict[str, Any]:
    """Check a `moeprof schedule` document (kind "schedule"); return it."""
    if not isinstance(doc.get("results"), list) or not doc["results"]:
        raise MoeprofError(f"{source}: a schedule results file needs a non-empty 'results' list")
    if not isinstance(doc.get("trace"), dict):
        raise MoeprofError(f"{source}: not a moeprof results file (no 'trace' object)")
    if not isinstance(doc.get("schedule", {}), dict):
        raise MoeprofError(f"{source}: schedule is not an object")
    _check_fields(doc["trace"], {}, _TRACE_OPTIONAL, f"{source}: trace")
    for i, row in enumerate(doc["results"]):
        if not isinstance(row, dict):
            raise MoeprofError(f"{source}: results[{i}] is not an object")
        _check_fields(row, _SCHEDULE_ROW_TYPES, _SCHEDULE_ROW_OPTIONAL, f"{source}: results[{i}]")
    return doc


# A sweep's `results.jsonl` (docs/sweep.md, "Running"): one JSON object per line, one per
# experiment run; a rerun appends, so the last row of a key is the one that counts.
SWEEP_ROW_KEYS: dict[str, Callable[[Any], bool]] = {
    "key": _is_str,
    "analysis": _is_str,
    "batch_size": _is_int,
}


def is_sweep_rows_path(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a sweep's rows: a `.jsonl` file, or a folder holding
    `results.jsonl`."""
    p = Path(path)
    return p.suffix == ".jsonl" or (p.is_dir() and (p / "results.jsonl").is_file())


def load_sweep_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a sweep's results.jsonl (or of the folder holding it), the latest per key.

    A last line cut short by an interruption (no newline after it) is left out, as the sweep's
    resume does; any other line that is not a JSON object with a key, an analysis and a batch
    size is refused, as is a file without rows.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "results.jsonl"
    if not p.exists():
        raise MoeprofError(f"sweep results {p} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MoeprofError(f"{p}: not a sweep results file (not UTF-8 text)") from None
    except OSError as exc:
        raise MoeprofError(f"cannot read {p}: {exc.strerror}") from None
    lines = text.split("\n")
    by_key: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            if number == len(lines):  # the last line, without its newline: cut short
                continue
            raise MoeprofError(f"{p}:{number}: not valid JSON") from None
        if not isinstance(row, dict):
            raise MoeprofError(f"{p}:{number}: not a sweep row (not a JSON object)")
        _check_fields(row, SWEEP_ROW_KEYS, {}, f"{p}:{number}: the row")
        if not (row.get("error") is None or isinstance(row["error"], str)):
            raise MoeprofError(f"{p}:{number}: the row's error is not text or null")
        by_key.pop(row["key"], None)  # a retried failure replaces its error row
        by_key[row["key"]] = row
    if not by_key:
        raise MoeprofError(f"{p} holds no sweep rows")
    return list(by_key.values())
