"""The numbers a report shows, derived from the results JSON (the contract between stages).

Terminal and markdown renderers draw the same rows from here, so they never disagree. Pure:
a results dict in, dataclasses of strings and numbers out.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprof.errors import MoeprofError

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


# ---------------------------------------------------------------------- formatting


def pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def human_bytes(n: float) -> str:
    """Binary units, 3 significant figures: 1536 -> '1.50 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024.0 or unit == "PiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.3g} {unit}" if abs(value) >= 100 else f"{value:.2f} {unit}"
        value /= 1024.0
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------- loading


def validate_results(doc: Any, source: str = "results") -> dict[str, Any]:
    """Check that `doc` has the results-JSON shape the renderers read; return it."""
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise MoeprofError(f"{source}: not a moeprof results file (no 'results' list)")
    if not doc["results"]:
        raise MoeprofError(f"{source}: the results list is empty")
    if not isinstance(doc.get("trace"), dict):
        raise MoeprofError(f"{source}: not a moeprof results file (no 'trace' object)")
    for i, row in enumerate(doc["results"]):
        if not isinstance(row, dict):
            raise MoeprofError(f"{source}: results[{i}] is not an object")
        missing = [k for k in _REQUIRED_ROW_KEYS if k not in row]
        if missing:
            raise MoeprofError(f"{source}: results[{i}] lacks {', '.join(missing)}")
    return doc


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise MoeprofError(f"results file {p} not found")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoeprofError(f"{p}: not valid JSON ({exc.__class__.__name__})") from None
    except OSError as exc:
        raise MoeprofError(f"cannot read {p}: {exc.strerror}") from None
    return validate_results(doc, str(p))


# ---------------------------------------------------------------------- report model


@dataclass(frozen=True)
class BatchRow:
    batch_size: int
    n_batches: int
    requests: int
    memory_savings: float
    bandwidth_savings: float
    max_reuse_factor: float
    max_reuse_layer: int
    bytes_requested: int
    bytes_saved: int
    uniform_memory_savings: float

    @property
    def locality_gain_pp(self) -> float:
        return 100.0 * (self.memory_savings - self.uniform_memory_savings)


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
    layer_header: tuple[int, ...]  # batch sizes, one column each
    layer_rows: tuple[tuple[str, tuple[float, ...]], ...]  # (layer label, savings per batch size)
    recommendations: tuple[str, ...]
    technical: tuple[str, ...]


def _row(r: dict[str, Any]) -> BatchRow:
    layers = r["layers"]
    savings = [float(layer["memory_savings"]) for layer in layers]
    best = max(range(len(savings)), key=savings.__getitem__) if savings else 0
    return BatchRow(
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
    )


def _experts_text(n_experts: list[int]) -> str:
    if not n_experts:
        return "?"
    lo, hi = min(n_experts), max(n_experts)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _expert_bytes_text(expert_bytes: list[int]) -> tuple[str, bool]:
    if not expert_bytes or min(expert_bytes) <= 0:
        return "unknown", False
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
    layer_rows: list[tuple[str, tuple[float, ...]]],
    expert_bytes_known: bool,
    tokens: int,
) -> list[str]:
    out: list[str] = []
    reaching = [r for r in rows if r.memory_savings >= HALF]
    if reaching:
        r = reaching[0]
        out.append(
            f"Batch size {r.batch_size} is the smallest analysed batch size that reaches 50% memory "
            f"savings ({pct(r.memory_savings)}): batch at least {r.batch_size} tokens per expert "
            f"load to halve expert traffic."
        )
    else:
        top = rows[-1]
        out.append(
            f"No analysed batch size reaches 50% memory savings; the largest, {top.batch_size}, "
            f"saves {pct(top.memory_savings)}. Larger batches, caching or locality-aware batching "
            f"are needed to halve expert traffic."
        )
    gains = [r.locality_gain_pp for r in rows if r.batch_size > 1]
    if gains:
        best = max((r for r in rows if r.batch_size > 1), key=lambda r: r.locality_gain_pp)
        if all(abs(g) <= CLOSE_TO_UNIFORM_PP for g in gains):
            out.append(
                f"Routing shows about as much reuse as uniform random routing would (within "
                f"{CLOSE_TO_UNIFORM_PP:.0f} percentage point at every batch size): the savings come "
                f"from batching alone, not from locality in this workload."
            )
        elif best.locality_gain_pp > CLOSE_TO_UNIFORM_PP:
            out.append(
                f"Routing shows more reuse than uniform random routing would: at batch size "
                f"{best.batch_size}, {pct(best.memory_savings)} vs {pct(best.uniform_memory_savings)} "
                f"(+{best.locality_gain_pp:.1f} percentage points). Skewed or local routing pays "
                f"off; an expert cache or locality-aware batching can add to it."
            )
        else:
            worst = min((r for r in rows if r.batch_size > 1), key=lambda r: r.locality_gain_pp)
            out.append(
                f"Routing shows less reuse than uniform random routing would: at batch size "
                f"{worst.batch_size}, {pct(worst.memory_savings)} vs "
                f"{pct(worst.uniform_memory_savings)} ({worst.locality_gain_pp:.1f} percentage "
                f"points): tokens batched together tend to pick different experts."
            )
    if layer_rows and len(layer_rows) > 1:
        last = [vals[-1] for _, vals in layer_rows]
        hi = max(range(len(last)), key=last.__getitem__)
        lo = min(range(len(last)), key=last.__getitem__)
        spread = 100.0 * (last[hi] - last[lo])
        if spread >= LAYER_SPREAD_PP:
            out.append(
                f"Layers differ: at batch size {rows[-1].batch_size}, layer {layer_rows[hi][0]} saves "
                f"{pct(last[hi])} and layer {layer_rows[lo][0]} {pct(last[lo])} "
                f"({spread:.1f} points apart); give per-layer cache budgets to the layers that "
                f"reuse least."
            )
        else:
            out.append(
                f"Layers behave alike: at batch size {rows[-1].batch_size} their savings lie within "
                f"{spread:.1f} percentage points of each other."
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
            f"At batch size {best_bw.batch_size}, deduplication avoids "
            f"{human_bytes(best_bw.bytes_saved)} of host-to-device expert traffic over this trace "
            f"({human_bytes(best_bw.bytes_saved / tokens)} per token)."
        )
    return out


def _technical(doc: dict[str, Any], rows: list[BatchRow]) -> list[str]:
    trace = doc["trace"]
    n_experts = [int(x) for x in trace.get("n_experts", [])]
    top_k = int(trace.get("top_k", 0))
    expert_bytes = [int(x) for x in trace.get("expert_bytes", [])]
    e = n_experts[0] if n_experts else 0
    lines = [
        "For each batch b and MoE layer l: requests(b,l) = (token, expert) pairs, "
        "unique(b,l) = distinct experts.",
        "Memory savings = (Σ requests − Σ unique) / Σ requests; the reuse factor of one layer is "
        "1 − unique/requests.",
        "Bandwidth savings = (bytes_requested − bytes_unique) / bytes_requested, with "
        "bytes = Σ_l count(l) · expert_bytes(l).",
    ]
    known = bool(expert_bytes) and min(expert_bytes) > 0
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
    else:
        lines.append(
            "This trace does not record expert sizes: byte counts are 0 and bandwidth "
            "savings are taken equal to memory savings."
        )
    if e and top_k and n_experts and min(n_experts) == max(n_experts):
        b = rows[-1].batch_size
        expected = e * (1 - (1 - top_k / e) ** b)
        lines.append(
            f"Uniform expectation: a batch of B tokens each routed to k = {top_k} of E = {e} "
            f"experts at random touches E·(1 − (1 − k/E)^B) distinct experts; at B = {b} that is "
            f"{expected:.2f} of {b * top_k} requests, {pct(1 - expected / (b * top_k))} savings."
        )
    worked = doc["results"][-1]
    if known:
        lines.append(
            f"Worked example, batch size {worked['batch_size']}: {worked['requests']:,} requests "
            f"→ {int(worked['bytes_requested']):,} bytes; {worked['unique']:,} unique → "
            f"{int(worked['bytes_unique']):,} bytes; savings {pct(worked['bandwidth_savings'])}."
        )
    else:
        lines.append(
            f"Worked example, batch size {worked['batch_size']}: {worked['requests']:,} requests, "
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
    all_layer_savings = [float(layer["memory_savings"]) for r in results for layer in r["layers"]]
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
    by_layer: dict[int, tuple[str, list[float]]] = {}
    for r in results:
        for layer in r["layers"]:
            entry = by_layer.setdefault(int(layer["layer"]), (_layer_label(layer), []))
            entry[1].append(float(layer["memory_savings"]))
    layer_rows = tuple((label, tuple(vals)) for _, (label, vals) in sorted(by_layer.items()))
    return ReportModel(
        summary=summary,
        batch_rows=tuple(rows),
        layer_header=tuple(r.batch_size for r in rows),
        layer_rows=layer_rows,
        recommendations=tuple(_recommendations(rows, list(layer_rows), eb_known, summary.tokens)),
        technical=tuple(_technical({**doc, "results": results}, rows)),
    )
