"""The numbers a report shows, derived from the results JSON (the contract between stages).

Terminal and markdown renderers draw the same rows from here, so they never disagree. Pure:
a results dict in, dataclasses of strings and numbers out.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprof.errors import MoeprofError
from moeprof.formatting import human_bytes, pct

_REQUIRED_ROW_KEYS = (
    "batch_size",
    "policy",
    "requests",
    "unique",
    "memory_savings",
    "bandwidth_savings",
    "bytes_requested",
    "bytes_unique",
    "layers",
)
HALF = 0.5
CLOSE_TO_UNIFORM_PP = 1.0  # percentage points within which routing counts as uniform-like
LAYER_SPREAD_PP = 10.0
DIMINISHING_PP = 5.0


# ---------------------------------------------------------------------- loading


_INT_LIMIT = 2**63  # counts and bytes beyond int64 are not something analyze writes


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and -_INT_LIMIT < x < _INT_LIMIT


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
    "bytes_requested": _is_int,
    "bytes_unique": _is_int,
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


def validate_results(doc: Any, source: str = "results") -> dict[str, Any]:
    """Check that `doc` has the results-JSON shape and types the renderers read; return it."""
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise MoeprofError(f"{source}: not a moeprof results file (no 'results' list)")
    if not doc["results"]:
        raise MoeprofError(f"{source}: the results list is empty")
    if not isinstance(doc.get("trace"), dict):
        raise MoeprofError(f"{source}: not a moeprof results file (no 'trace' object)")
    _check_fields(doc["trace"], {}, _TRACE_OPTIONAL, f"{source}: trace")
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


# ---------------------------------------------------------------------- report model


@dataclass(frozen=True)
class BatchRow:
    policy: str
    batch_size: int  # for policy 'recorded': the largest recorded batch
    n_batches: int
    requests: int
    memory_savings: float
    bandwidth_savings: float
    max_reuse_factor: float
    max_reuse_layer: int
    bytes_requested: int
    bytes_saved: int
    uniform_memory_savings: float
    uniform_unique: float | None

    @property
    def locality_gain_pp(self) -> float:
        return 100.0 * (self.memory_savings - self.uniform_memory_savings)

    @property
    def recorded(self) -> bool:
        return self.policy == "recorded"

    @property
    def label(self) -> str:
        """How the text names this row's batching: 'batch size 8' or the recorded batches."""
        return "the recorded batches" if self.recorded else f"batch size {self.batch_size}"

    @property
    def size_text(self) -> str:
        """The table's Batch Size cell."""
        return f"≤ {self.batch_size}" if self.recorded else str(self.batch_size)


@dataclass(frozen=True)
class Summary:
    model: str
    architecture: str
    source: str
    created: str
    tokens: int
    requests: int
    moe_layers: int
    experts: str
    top_k: int
    expert_bytes: str
    expert_bytes_known: bool
    policy: str
    best_memory: BatchRow
    best_bandwidth: BatchRow
    average_reuse_factor: float


@dataclass(frozen=True)
class ReportModel:
    summary: Summary
    batch_rows: tuple[BatchRow, ...]
    layer_header: tuple[str, ...]  # one column per row of batch_rows
    # (layer label, savings per batch size); None where the layer routed no token.
    layer_rows: tuple[tuple[str, tuple[float | None, ...]], ...]
    recommendations: tuple[str, ...]
    technical: tuple[str, ...]


def _row(r: dict[str, Any]) -> BatchRow:
    layers = r["layers"]
    savings = [float(layer["memory_savings"]) for layer in layers]
    best = max(range(len(savings)), key=savings.__getitem__) if savings else 0
    uniform_unique = r.get("uniform_unique")
    return BatchRow(
        policy=str(r["policy"]),
        batch_size=int(r["batch_size"]),
        n_batches=int(r.get("n_batches", 0)),
        requests=int(r["requests"]),
        memory_savings=float(r["memory_savings"]),
        bandwidth_savings=float(r["bandwidth_savings"]),
        max_reuse_factor=float(r.get("max_reuse_factor", savings[best] if savings else 0.0)),
        max_reuse_layer=int(r.get("max_reuse_layer", best)),
        bytes_requested=int(r["bytes_requested"]),
        bytes_saved=int(r["bytes_requested"]) - int(r["bytes_unique"]),
        uniform_memory_savings=float(r.get("uniform_memory_savings", 0.0)),
        uniform_unique=None if uniform_unique is None else float(uniform_unique),
    )


def _experts_text(n_experts: list[int]) -> str:
    if not n_experts:
        return "?"
    lo, hi = min(n_experts), max(n_experts)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _expert_bytes_text(expert_bytes: list[int]) -> tuple[str, bool]:
    """The size line and whether every layer's size is known (needed for byte figures)."""
    if not expert_bytes or max(expert_bytes) <= 0:
        return "unknown", False
    unknown = sum(1 for b in expert_bytes if b <= 0)
    if unknown:
        return f"unknown for {unknown} of {len(expert_bytes)} MoE layers", False
    lo, hi = min(expert_bytes), max(expert_bytes)
    if lo == hi:
        return f"{human_bytes(lo)} ({lo:,} B)", True
    return f"{human_bytes(lo)}–{human_bytes(hi)}", True


def _source_text(source: dict[str, Any], max_settings: int = 10) -> str:
    """'synth (seed=0, zipf=0.8, ...)': how the trace was made, scalar settings only."""
    kind = str(source.get("kind") or "unknown")
    settings = [
        f"{k}={v}"
        for k, v in source.items()
        if k != "kind" and v is not None and isinstance(v, (str, int, float, bool))
    ]
    if not settings:
        return kind
    more = ", …" if len(settings) > max_settings else ""
    return f"{kind} ({', '.join(settings[:max_settings])}{more})"


def _layer_label(layer: dict[str, Any]) -> str:
    idx, model_layer = int(layer["layer"]), int(layer.get("model_layer", layer["layer"]))
    return f"{idx}" if idx == model_layer else f"{idx} (model layer {model_layer})"


def _recommendations(
    rows: list[BatchRow],
    layer_rows: list[tuple[str, tuple[float | None, ...]]],
    expert_bytes_known: bool,
    tokens: int,
) -> list[str]:
    out: list[str] = []
    top = rows[-1]
    if top.recorded:
        verdict = "reaches" if top.memory_savings >= HALF else "does not reach"
        out.append(
            f"Deduplication over {top.label} ({top.n_batches:,} batches of up to "
            f"{top.batch_size:,} tokens) saves {pct(top.memory_savings)} of expert loads: "
            f"the serving run as recorded {verdict} 50% memory savings. Analyse with policy "
            f"'tokens' or 'decode' to see how other batch sizes would do."
        )
    else:
        reaching = [r for r in rows if r.memory_savings >= HALF]
        if reaching:
            r = reaching[0]
            out.append(
                f"Batch size {r.batch_size} is the smallest analysed batch size that reaches 50% "
                f"memory savings ({pct(r.memory_savings)}): batch at least {r.batch_size} tokens "
                f"per expert load to halve expert traffic."
            )
        else:
            out.append(
                f"No analysed batch size reaches 50% memory savings; the largest, "
                f"{top.batch_size}, saves {pct(top.memory_savings)}. Larger batches, caching or "
                f"locality-aware batching are needed to halve expert traffic."
            )
    # Batches of one token cannot share experts; the recorded batches are compared as they are.
    compared = [r for r in rows if r.batch_size > 1 or r.recorded]
    if compared:
        gains = [r.locality_gain_pp for r in compared]
        best = max(compared, key=lambda r: r.locality_gain_pp)
        if all(abs(g) <= CLOSE_TO_UNIFORM_PP for g in gains):
            where = "for the recorded batches" if top.recorded else "at every batch size"
            out.append(
                f"Routing shows about as much reuse as uniform random routing would (within "
                f"{CLOSE_TO_UNIFORM_PP:.0f} percentage point {where}): the savings come from "
                f"batching alone, not from locality in this workload."
            )
        elif best.locality_gain_pp > CLOSE_TO_UNIFORM_PP:
            out.append(
                f"Routing shows more reuse than uniform random routing would: at {best.label}, "
                f"{pct(best.memory_savings)} vs {pct(best.uniform_memory_savings)} "
                f"(+{best.locality_gain_pp:.1f} percentage points). Skewed or local routing pays "
                f"off; an expert cache or locality-aware batching can add to it."
            )
        else:
            worst = min(compared, key=lambda r: r.locality_gain_pp)
            out.append(
                f"Routing shows less reuse than uniform random routing would: at {worst.label}, "
                f"{pct(worst.memory_savings)} vs {pct(worst.uniform_memory_savings)} "
                f"({worst.locality_gain_pp:.1f} percentage points): tokens batched together tend "
                f"to pick different experts."
            )
    # Layers that route no token have no savings to compare.
    routed = [(label, vals[-1]) for label, vals in layer_rows if vals[-1] is not None]
    if len(routed) > 1:
        hi_label, hi = max(routed, key=lambda item: item[1] or 0.0)
        lo_label, lo = min(routed, key=lambda item: item[1] or 0.0)
        assert hi is not None and lo is not None
        spread = 100.0 * (hi - lo)
        if spread >= LAYER_SPREAD_PP:
            out.append(
                f"Layers differ: at {top.label}, layer {hi_label} saves {pct(hi)} and layer "
                f"{lo_label} {pct(lo)} ({spread:.1f} points apart); give per-layer cache budgets "
                f"to the layers that reuse least."
            )
        else:
            out.append(
                f"Layers behave alike: at {top.label} their savings lie within {spread:.1f} "
                f"percentage points of each other."
            )
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        step_pp = 100.0 * (b.memory_savings - a.memory_savings)
        if step_pp < DIMINISHING_PP:
            out.append(
                f"Diminishing returns: going from batch size {a.batch_size} to {b.batch_size} adds "
                f"only {step_pp:.1f} percentage points of savings."
            )
    best_bw = max(rows, key=lambda r: r.bandwidth_savings)
    if expert_bytes_known and tokens:
        out.append(
            f"At {best_bw.label}, deduplication avoids {human_bytes(best_bw.bytes_saved)} of "
            f"host-to-device expert traffic over this trace "
            f"({human_bytes(best_bw.bytes_saved / tokens)} per token)."
        )
    return out


def _technical(doc: dict[str, Any], rows: list[BatchRow]) -> list[str]:
    trace = doc["trace"]
    n_experts = [int(x) for x in trace.get("n_experts", [])]
    top_k = int(trace.get("top_k", 0))
    expert_bytes = [int(x) for x in trace.get("expert_bytes", [])]
    lines = [
        "For each batch b and MoE layer l: requests(b,l) = (token, expert) pairs, "
        "unique(b,l) = distinct experts.",
        "Memory savings = (Σ requests − Σ unique) / Σ requests; the reuse factor of one layer is "
        "1 − unique/requests.",
        "Bandwidth savings = (bytes_requested − bytes_unique) / bytes_requested, with "
        "bytes = Σ_l count(l) · expert_bytes(l).",
    ]
    _, known = _expert_bytes_text(expert_bytes)
    if known:
        if min(expert_bytes) == max(expert_bytes):
            lines.append(
                f"This trace: every routed expert is {expert_bytes[0]:,} bytes "
                f"({human_bytes(expert_bytes[0])}), so bandwidth savings equal memory savings."
            )
        else:
            lines.append(
                f"This trace: routed experts are {min(expert_bytes):,}–{max(expert_bytes):,} bytes "
                f"depending on the layer, so bandwidth and memory savings can differ."
            )
    elif expert_bytes and max(expert_bytes) > 0:
        unknown = [str(i) for i, b in enumerate(expert_bytes) if b <= 0]
        lines.append(
            f"This trace lacks the expert size of MoE layer(s) {', '.join(unknown)}: byte totals "
            "would cover only some layers, so they are reported as 0 and bandwidth savings are "
            "taken equal to memory savings."
        )
    else:
        lines.append(
            "This trace does not record expert sizes: byte counts are 0 and bandwidth "
            "savings are taken equal to memory savings."
        )
    top = rows[-1]
    if top_k and n_experts:
        e_text = (
            f"E = {n_experts[0]}"
            if min(n_experts) == max(n_experts)
            else f"E = {min(n_experts)}–{max(n_experts)} (per layer)"
        )
        line = (
            f"Uniform expectation: a batch whose tokens each pick k_t of {e_text} experts at "
            f"random (k_t ≤ {top_k}: slots without an expert do not count) touches "
            f"E·(1 − Π_t (1 − k_t/E)) distinct experts, E·(1 − (1 − k/E)^B) for B tokens of k."
        )
        if top.uniform_unique is not None:
            line += (
                f" Over {top.label} that is {top.uniform_unique:,.1f} distinct experts for "
                f"{top.requests:,} requests: {pct(top.uniform_memory_savings)} savings, against "
                f"{pct(top.memory_savings)} measured in this trace."
            )
        lines.append(line)
    worked = doc["results"][-1]
    if known:
        lines.append(
            f"Worked example, {top.label}: {worked['requests']:,} requests "
            f"→ {int(worked['bytes_requested']):,} bytes; {worked['unique']:,} unique → "
            f"{int(worked['bytes_unique']):,} bytes; savings {pct(worked['bandwidth_savings'])}."
        )
    else:
        lines.append(
            f"Worked example, {top.label}: {worked['requests']:,} requests, "
            f"{worked['unique']:,} unique; savings {pct(worked['memory_savings'])}."
        )
    return lines


def build_report(doc: dict[str, Any]) -> ReportModel:
    """All report rows from a validated results dict."""
    validate_results(doc)
    results = sorted(doc["results"], key=lambda r: int(r["batch_size"]))
    rows = [_row(r) for r in results]
    trace = doc["trace"]
    model = trace.get("model") or {}
    source = trace.get("source") or {}
    n_experts = [int(x) for x in trace.get("n_experts", [])]
    eb_text, eb_known = _expert_bytes_text([int(x) for x in trace.get("expert_bytes", [])])

    def routed(layer: dict[str, Any]) -> bool:
        # Older results lack per-layer requests: then every layer counts.
        return int(layer.get("requests", 1)) > 0

    all_layer_savings = [
        float(layer["memory_savings"]) for r in results for layer in r["layers"] if routed(layer)
    ]
    summary = Summary(
        model=str(model.get("id") or "unknown"),
        architecture=str(model.get("architecture") or "—"),
        source=_source_text(source),
        created=str(trace.get("created") or "—"),
        tokens=int(trace.get("n_tokens", results[0].get("tokens", 0))),
        requests=int(trace.get("n_requests", 0)),
        moe_layers=int(trace.get("n_layers", len(results[0]["layers"]))),
        experts=_experts_text(n_experts),
        top_k=int(trace.get("top_k", 0)),
        expert_bytes=eb_text,
        expert_bytes_known=eb_known,
        policy=str(results[0]["policy"]),
        best_memory=max(rows, key=lambda r: r.memory_savings),
        best_bandwidth=max(rows, key=lambda r: r.bandwidth_savings),
        average_reuse_factor=(
            sum(all_layer_savings) / len(all_layer_savings) if all_layer_savings else 0.0
        ),
    )
    by_layer: dict[int, tuple[str, list[float | None]]] = {}
    for i, r in enumerate(results):
        for layer in r["layers"]:
            entry = by_layer.setdefault(int(layer["layer"]), (_layer_label(layer), []))
            entry[1].extend([None] * (i - len(entry[1])))  # a layer missing from earlier rows
            entry[1].append(float(layer["memory_savings"]) if routed(layer) else None)
    layer_rows = tuple(
        (label, tuple(vals + [None] * (len(results) - len(vals))))
        for _, (label, vals) in sorted(by_layer.items())
    )
    return ReportModel(
        summary=summary,
        batch_rows=tuple(rows),
        layer_header=tuple(r.size_text for r in rows),
        layer_rows=layer_rows,
        recommendations=tuple(_recommendations(rows, list(layer_rows), eb_known, summary.tokens)),
        technical=tuple(_technical({**doc, "results": results}, rows)),
    )
