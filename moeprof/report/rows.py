"""The rows a report shows, derived from a results dict: format-neutral strings and numbers.

Markdown (:mod:`moeprof.report.markdown`), terminal (:mod:`moeprof.report.terminal`) and plot
(:mod:`moeprof.report.plot`) renderers all draw from here, so they never disagree. Pure: a
results dict (or a trace) in, dataclasses and lists of strings out. Formulas: docs/method.md;
what the recommendations say: docs/user-guide.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moeprof.batching import REGISTRY as POLICY_REGISTRY
from moeprof.formatting import human_bytes, pct
from moeprof.report.results import validate_results
from moeprof.strategies import REGISTRY

if TYPE_CHECKING:
    from moeprof.trace import Trace

HALF = 0.5
CLOSE_TO_UNIFORM_PP = 1.0  # percentage points within which routing counts as uniform-like
LAYER_SPREAD_PP = 10.0
DIMINISHING_PP = 5.0
_DASH = "—"


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
    max_reuse_model_layer: int | None  # the model's layer number of that MoE layer, if known
    bytes_requested: int
    bytes_saved: int
    uniform_memory_savings: float
    uniform_unique: float | None

    @property
    def locality_gain_pp(self) -> float:
        return 100.0 * (self.memory_savings - self.uniform_memory_savings)

    @property
    def recorded(self) -> bool:
        # A policy without a batch size runs the batches the trace recorded.
        policy = POLICY_REGISTRY.get(self.policy)
        return policy is not None and not policy.takes_batch_size

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
class ReportRows:
    """Everything the analysis part of a report shows."""

    summary: Summary
    batch_rows: tuple[BatchRow, ...]
    # (layer label, savings per batch size); None where the layer routed no token.
    layer_rows: tuple[tuple[str, tuple[float | None, ...]], ...]
    recommendations: tuple[str, ...]
    technical: tuple[str, ...]
    notes: tuple[str, ...] = ()  # the analysis's own caveats (e.g. batches that never fill)


def _model_layer(layers: list[dict[str, Any]], moe_layer: int) -> int | None:
    """The model layer number of MoE layer `moe_layer`, when the results carry it."""
    for layer in layers:
        if int(layer.get("layer", -1)) == moe_layer and layer.get("model_layer") is not None:
            return int(layer["model_layer"])
    return None


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
        max_reuse_model_layer=_model_layer(layers, int(r.get("max_reuse_layer", best))),
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


def build_report(doc: dict[str, Any]) -> ReportRows:
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
    return ReportRows(
        summary=summary,
        batch_rows=tuple(rows),
        layer_rows=layer_rows,
        recommendations=tuple(_recommendations(rows, list(layer_rows), eb_known, summary.tokens)),
        technical=tuple(_technical({**doc, "results": results}, rows)),
        notes=tuple(str(n) for n in doc.get("notes") or ()),
    )


# ---------------------------------------------------------------------- analysis tables


def summary_items(report: ReportRows) -> list[tuple[str, str]]:
    """The executive summary as (label, text) pairs."""
    s = report.summary
    bm, bb = s.best_memory, s.best_bandwidth
    return [
        ("Maximum memory savings", f"{pct(bm.memory_savings)} at {bm.label}"),
        (
            "Maximum bandwidth savings",
            f"{pct(bb.bandwidth_savings)} at {bb.label}"
            + (f" ({human_bytes(bb.bytes_saved)} saved)" if s.expert_bytes_known else ""),
        ),
        (
            "Average reuse factor",
            f"{s.average_reuse_factor:.3f} (mean over routed layers and batch sizes)",
        ),
        (
            "Expert traffic without dedup",
            f"{bm.requests:,} expert loads"
            + (f", {human_bytes(bm.bytes_requested)}" if s.expert_bytes_known else ""),
        ),
        ("Batching policy", s.policy),
        ("Model", s.model + (f" ({s.architecture})" if s.architecture != _DASH else "")),
        ("Source", s.source),
        ("Tokens / requests", f"{s.tokens:,} / {s.requests:,}"),
        ("MoE layers × experts, top-k", f"{s.moe_layers} × {s.experts}, top-{s.top_k}"),
        ("Routed expert size", s.expert_bytes),
        ("Trace created", s.created),
    ]


BATCH_HEADER = [
    "Batch Size",
    "Batches",
    "Avg Memory Savings",
    "Avg Bandwidth Savings",
    "Max Reuse Factor",
    "Bytes Saved",
    "Uniform Expectation",
]


def _layer_name(r: BatchRow) -> str:
    """The best layer by the model's own numbering ('layer 8') where the trace says it,
    else by MoE layer index ('L1')."""
    if r.max_reuse_model_layer is not None:
        return f"layer {r.max_reuse_model_layer}"
    return f"L{r.max_reuse_layer}"


def batch_table_rows(report: ReportRows) -> tuple[list[str], list[list[str]]]:
    """Savings by batch size: (header, one row per batch size)."""
    rows = [
        [
            r.size_text,
            f"{r.n_batches:,}",
            pct(r.memory_savings),
            pct(r.bandwidth_savings),
            f"{r.max_reuse_factor:.3f} ({_layer_name(r)})",
            human_bytes(r.bytes_saved) if report.summary.expert_bytes_known else _DASH,
            pct(r.uniform_memory_savings),
        ]
        for r in report.batch_rows
    ]
    return list(BATCH_HEADER), rows


def layer_table_rows(report: ReportRows) -> tuple[list[str], list[list[str]]]:
    """Savings per layer: (header, one row per MoE layer, one column per batch size)."""
    header = ["Layer"] + [
        "recorded" if r.recorded else f"B={r.batch_size}" for r in report.batch_rows
    ]
    # "—": the layer routed no token (every slot empty), so it has no savings.
    rows = [
        [label] + [_DASH if v is None else pct(v) for v in vals]
        for label, vals in report.layer_rows
    ]
    return header, rows


# ---------------------------------------------------------------------- trace tables


def ranges_text(values: Sequence[int]) -> str:
    """[0,1,2,3,5] -> '0-3, 5'."""
    out: list[str] = []
    start = prev = None
    for v in values:
        if start is None:
            start = prev = v
        elif prev is not None and v == prev + 1:
            prev = v
        else:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = v
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    return ", ".join(out)


def _model_text(model: dict[str, Any]) -> str:
    return f"{model.get('id') or 'unknown'} ({model.get('architecture') or _DASH})"


def _experts_per_layer_text(n_experts: list[int]) -> str:
    return str(n_experts[0]) if len(set(n_experts)) == 1 else str(n_experts)


def trace_info_items(trace: Trace, info: dict[str, Any]) -> list[tuple[str, str]]:
    """What `moeprof info` shows: `info` is the trace summary plus ``file_bytes``."""
    model = info.get("model") or {}
    source = info.get("source") or {}
    ebytes = trace.expert_bytes.tolist()
    return [
        ("format", f"moeprof-trace v{info['format_version']}"),
        ("model", _model_text(model)),
        ("source", str(source.get("kind") or "unknown")),
        ("tokens", f"{trace.n_tokens:,}"),
        ("requests", f"{trace.n_requests:,}"),
        ("MoE layers", f"{trace.n_layers} (model layers {trace.moe_layer_indices})"),
        ("experts per layer", _experts_per_layer_text(trace.n_experts.tolist())),
        ("top-k", str(trace.top_k)),
        (
            "routed expert size",
            "unknown"
            if min(ebytes) <= 0
            else (human_bytes(ebytes[0]) if len(set(ebytes)) == 1 else str(ebytes)),
        ),
        ("shared-expert bytes", f"{int(info.get('shared_expert_bytes') or 0):,}"),
        (
            "arrays",
            ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in trace.arrays().items()),
        ),
        ("steps recorded", "yes" if trace.steps is not None else "no"),
        ("created", str(info.get("created", _DASH))),
        ("file size", human_bytes(info["file_bytes"])),
    ]


def recorded_items(
    trace: Trace, seconds: float, path: str, file_bytes: int
) -> list[tuple[str, str]]:
    """What `moeprof record` shows after a run of `seconds` wrote `trace` to `path`."""
    meta = trace.meta
    source = meta.get("source") or {}
    ebytes = trace.expert_bytes.tolist()
    decode = int((trace.phase == 1).sum()) if trace.phase is not None else 0
    if len(set(ebytes)) == 1:
        expert_size = human_bytes(ebytes[0]) if ebytes[0] > 0 else "unknown"
    else:
        expert_size = ", ".join(human_bytes(b) for b in ebytes)
    dtype = source.get("expert_dtype")
    rate = trace.n_tokens / seconds if seconds > 0 else 0.0
    return [
        ("model", _model_text(meta.get("model") or {})),
        ("MoE layers", f"{trace.n_layers} (model layers {ranges_text(trace.moe_layer_indices)})"),
        ("experts per layer", _experts_per_layer_text(trace.n_experts.tolist())),
        ("top-k", str(trace.top_k)),
        ("tokens", f"{trace.n_tokens:,} (prefill {trace.n_tokens - decode:,}, decode {decode:,})"),
        ("requests", f"{trace.n_requests:,}"),
        ("forward passes", f"{int(source.get('forward_passes', 0)):,}"),
        ("routed expert size", expert_size + (f" ({dtype})" if dtype else "")),
        ("shared experts / layer", human_bytes(int(meta.get("shared_expert_bytes") or 0))),
        ("time", f"{seconds:.1f} s ({rate:,.0f} tokens/s)"),
        ("trace file", f"{path} ({human_bytes(file_bytes)})"),
    ]


# ---------------------------------------------------------------------- replay rows

REPLAY_HEADER = [
    "Batch",
    "Strategy",
    "Copies",
    "Bytes copied",
    "Seconds",
    "GB/s",
    "Share of peak",
    "NVML RX",
    "NVML TX",
    "RX / counted",
    "Counted savings",
    "Measured savings",
    "Agree (±10%)",
]
LATENCY_HEADER = ["Batch", "Strategy", "Batches", "Mean ms", "p50 ms", "p90 ms", "Max ms"]


def has_replay(doc: dict[str, Any]) -> bool:
    """Whether the results document carries replay measurements (a replay section to show)."""
    return isinstance(doc.get("replay"), dict) and any(
        isinstance(r.get("replay"), dict) for r in doc.get("results", [])
    )


def _opt_bytes(value: Any) -> str:
    return _DASH if value is None else human_bytes(value)


def _opt_pct(value: Any) -> str:
    return _DASH if value is None else pct(value)


def _savings_cell(cmp: dict[str, Any]) -> tuple[str, str, str]:
    counted = _opt_pct(cmp.get("counted_savings"))
    basis = cmp.get("basis")
    if basis == "nvml_rx_bytes":
        measured = f"{pct(cmp['measured_savings_nvml'])} NVML"
    elif basis == "seconds":
        measured = f"{pct(cmp['measured_savings_seconds'])} time"
    else:
        measured = _DASH
    agree = cmp.get("agrees_within_10pct")
    agree_text = _DASH if agree is None else ("yes" if agree else "no")
    return counted, measured, agree_text


def replay_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per batch size and strategy."""
    rows: list[list[str]] = []
    for result in doc.get("results", []):
        rep = result.get("replay")
        if not isinstance(rep, dict):
            continue
        for s in rep.get("strategies", []):
            counted, measured, agree = _savings_cell(s.get("vs_naive") or {})
            ratio = s.get("measured_to_counted")
            copies = f"{s['copies']:,}"
            if not s.get("copies_match_counted", True):
                copies += f" (counted {s['counted_copies']:,})"
            rows.append(
                [
                    str(result["batch_size"]),
                    s["strategy"],
                    copies,
                    human_bytes(s["bytes_copied"]),
                    f"{s['seconds']:.4f}",
                    f"{s['gbps']:.2f}",
                    _opt_pct(s.get("share_of_peak")),
                    _opt_bytes(s.get("nvml_rx_bytes")),
                    _opt_bytes(s.get("nvml_tx_bytes")),
                    _DASH if ratio is None else f"{ratio:.3f}x",
                    counted,
                    measured,
                    agree,
                ]
            )
    return REPLAY_HEADER, rows


def latency_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows: list[list[str]] = []
    for result in doc.get("results", []):
        for s in (result.get("replay") or {}).get("strategies", []):
            lat = s.get("batch_latency")
            if not lat:
                continue
            rows.append(
                [
                    str(result["batch_size"]),
                    s["strategy"],
                    f"{lat['batches']:,}",
                    f"{lat['mean_ms']:.3f}",
                    f"{lat['p50_ms']:.3f}",
                    f"{lat['p90_ms']:.3f}",
                    f"{lat['max_ms']:.3f}",
                ]
            )
    return LATENCY_HEADER, rows


def _and(names: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def replay_notes(doc: dict[str, Any]) -> list[str]:
    """What was replayed, where, and how it was measured: one sentence each."""
    info = doc.get("replay") or {}
    notes: list[str] = []
    if info.get("ran_on_cpu"):
        notes.append(
            "**Ran on the CPU** (no GPU): host-to-host copies stand in for PCIe transfers. Copies "
            "and bytes are exact; seconds and GB/s describe this machine's memory, not a GPU link."
        )
    else:
        name = info.get("device_name") or info.get("device", "?")
        link = info.get("link") or {}
        link_text = ""
        if link.get("pcie_gen_max") and link.get("pcie_width_max"):
            link_text = f", PCIe Gen{link['pcie_gen_max']} x{link['pcie_width_max']} (max)"
        notes.append(
            f"Device: {name} ({info.get('device', '?')}{link_text}), {info.get('host_memory', '')}."
        )
    peak = info.get("peak_h2d_gbps")
    if peak:
        cal = info.get("calibration") or {}
        notes.append(
            f"Calibrated peak: {peak:.2f} GB/s ({cal.get('method', 'one large copy')} of "
            f"{human_bytes(cal.get('bytes', 0))}, best of {cal.get('repeats', '?')}); "
            "GB/s here means 10^9 bytes per second."
        )
    method = info.get("measurement_method")
    reason = info.get("measurement_reason")
    check = info.get("counter_check") or {}
    check_text = ""
    if check.get("rx_to_copied") is not None and check.get("bytes_copied"):
        check_text = (
            f" Check: the calibration's {human_bytes(check['bytes_copied'])} showed as "
            f"{human_bytes(check.get('nvml_rx_bytes') or 0)} RX ({check['rx_to_copied']:.3f}x)."
        )
    if method == "nvml_counters":
        notes.append(
            "PCIe bytes: NVML cumulative RX/TX byte counters read around each run with the streams "
            "synchronised. They include protocol overhead and every process's traffic, so RX / "
            "counted slightly above 1.00x is expected." + check_text
        )
    elif method == "nvml_throughput":
        notes.append(
            "PCIe bytes: **estimated** from nvmlDeviceGetPcieThroughput (KiB/s over ~20 ms "
            "windows) sampled and integrated; the byte counters were not available"
            + (
                f" ({'; '.join(info.get('measurement_notes') or [])})."
                if info.get("measurement_notes")
                else "."
            )
        )
    elif method:
        notes.append(f"PCIe bytes: not measured ({reason}); counted payload only.")
    if info.get("scaled_blocks"):
        rep = sorted(set(info.get("expert_bytes_replayed") or []))
        full = sorted(set(info.get("expert_bytes_full") or []))
        notes.append(
            f"Blocks were scaled down: each expert was replayed as {', '.join(human_bytes(b) for b in rep)} "
            f"instead of {', '.join(human_bytes(b) for b in full)}; `bytes_copied_full_size` and "
            "`projected_seconds_full_size` in the JSON project the full size at the measured rate."
        )
    layers = info.get("layers")
    # Strategies that keep experts across batches, named as the registry names their cache.
    caches = [
        REGISTRY[name].cache_label
        for name in info.get("strategies") or []
        if name in REGISTRY and REGISTRY[name].uses_cache
    ]
    if layers is not None:
        notes.append(
            f"Replayed MoE layers: {', '.join(str(x) for x in layers)}; policy {info.get('policy')}"
            + (
                f", first {info['max_batches']} batches per batch size"
                if info.get("max_batches")
                else ""
            )
            + (
                f", {_and(caches)} cache{'s' if len(caches) > 1 else ''} of "
                f"{info.get('cache_experts')} experts per layer"
                if caches
                else ""
            )
            + "."
        )
    notes.append(
        "Savings are against naive at the same batch size. Counted savings compare payload bytes; "
        "measured savings compare NVML RX bytes when measured (NVML), else device time (time). They agree when "
        "the measured cost ratio (strategy / naive) is within 10% of the counted one."
    )
    bound = [
        f"{s.get('strategy')} B={row.get('batch_size')}"
        for row in doc.get("results") or []
        if isinstance(row.get("replay"), dict)
        for s in (row["replay"].get("strategies") or [])
        if s.get("host_bound") is True
    ]
    if bound:
        notes.append(
            f"**Host-bound runs** ({', '.join(bound)}): Python took at least 90% of the device "
            "time to queue their copies, so the GPU may have waited for it; their seconds and "
            "GB/s then describe the host, not the link. Larger blocks (--expert-bytes) help."
        )
    if info.get("interrupted"):
        notes.append("**Interrupted**: only the runs that finished are shown.")
    return notes


# ---------------------------------------------------------------------- cache rows

# The reading of the Belady - LRU gap (docs/cache.md, "Reading the report"): at least this many
# hit-rate points between them and the policy is the problem; fewer, with LRU below HALF, and the
# cache is too small.
LARGE_GAP_PP = 10.0
CACHE_HEADER = [
    "C",
    "Strategy",
    "Hit rate",
    "Loads",
    "Bytes / token",
    "vs dedup",
    "Gap captured",
]
GAP_HEADER = ["C", "LRU hit", "Belady hit", "Gap", "Loads gap", "Reading"]


def is_cache(doc: Any) -> bool:
    """Whether `doc` is a `moeprof cache` results document."""
    return isinstance(doc, dict) and doc.get("kind") == "cache"


def _capacity_text(row: dict[str, Any]) -> str:
    if row["strategy"] in ("naive", "dedup"):
        return _DASH
    c, spelled = int(row["cache_experts"]), str(row.get("cache_spelling", row["cache_experts"]))
    return str(c) if spelled == str(c) else f"{c} ({spelled})"


def _per_token(value: Any) -> str:
    return _DASH if value is None else human_bytes(float(value))


def _share(value: Any) -> str:
    return _DASH if value is None else pct(float(value))


def cache_batch_sizes(doc: dict[str, Any]) -> list[int]:
    return sorted({int(r["batch_size"]) for r in doc["results"]})


def _cache_label(name: str) -> str:
    strategy = REGISTRY.get(name)
    return strategy.cache_label if strategy is not None and strategy.cache_label else name


def cache_table_rows(
    doc: dict[str, Any], batch_size: int, *, link: bool = True
) -> tuple[list[str], list[list[str]]]:
    """Capacity x strategy at one batch size: hit rate, loads, bytes per token, savings vs
    dedup, share of the LRU → Belady gap captured (the references first); the link projection
    when the document has one and `link`."""
    link = link and bool((doc.get("cache") or {}).get("link_gbps"))
    header = list(CACHE_HEADER) + (["Link tokens/s (projected)"] if link else [])
    rows: list[list[str]] = []
    chosen = [r for r in doc["results"] if int(r["batch_size"]) == batch_size]
    refs = [r for r in chosen if r["strategy"] in ("naive", "dedup")]
    cached = sorted(
        (r for r in chosen if r["strategy"] not in ("naive", "dedup")),
        key=lambda r: int(r["cache_experts"]),
    )
    for r in refs + cached:
        cells = [
            _capacity_text(r),
            r["strategy"],
            pct(float(r["hit_rate"])),
            f"{int(r['loads']):,}",
            _per_token(r.get("bytes_per_token")),
            pct(float(r.get("savings_vs_dedup", 0.0))),
            _share(r.get("gap_captured")),
        ]
        if link:
            tps = r.get("link_tokens_per_second")
            cells.append(_DASH if tps is None else f"{float(tps):,.1f}")
        rows.append(cells)
    return header, rows


def gap_reading(gap: dict[str, Any]) -> str:
    """What the Belady − LRU gap at one capacity says."""
    if int(gap["cache_experts"]) == 0:
        return "no cache: every policy loads the same"
    if float(gap["gap_points"]) >= LARGE_GAP_PP:
        return "large: the policy is the problem"
    if float(gap["lru_hit_rate"]) < HALF:
        return "small, with a low hit rate: the cache is too small"
    return "small: LRU is near the bound"


def cache_gap_rows(doc: dict[str, Any], batch_size: int) -> tuple[list[str], list[list[str]]]:
    rows = [
        [
            str(g["cache_experts"]),
            pct(float(g["lru_hit_rate"])),
            pct(float(g["belady_hit_rate"])),
            f"{float(g['gap_points']):.1f} pts",
            f"{int(g['gap_loads']):,}",
            gap_reading(g),
        ]
        for g in doc.get("gaps") or []
        if int(g["batch_size"]) == batch_size
    ]
    return list(GAP_HEADER), rows


def cache_working_set_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Distinct experts per batch (mean / p95 / max), one row per layer, one column per B."""
    sets = doc.get("working_sets") or []
    sizes = sorted({int(w["batch_size"]) for w in sets})
    by = {(int(w["batch_size"]), int(w["layer"])): w for w in sets}
    layers = sorted({(int(w["layer"]), int(w.get("model_layer", w["layer"]))) for w in sets})
    header = ["Layer"] + [f"B={b}" for b in sizes]
    rows = [
        [_layer_label({"layer": idx, "model_layer": ml})]
        + [
            f"{float(by[(b, idx)]['mean']):.1f} / {by[(b, idx)]['p95']} / {by[(b, idx)]['max']}"
            if (b, idx) in by
            else _DASH
            for b in sizes
        ]
        for idx, ml in layers
    ]
    return header, rows


def cache_summary_items(doc: dict[str, Any]) -> list[tuple[str, str]]:
    trace = doc["trace"]
    settings = doc.get("cache") or {}
    model = trace.get("model") or {}
    eb_text, _ = _expert_bytes_text([int(x) for x in trace.get("expert_bytes", [])])
    phase = settings.get("phase", "all")
    items = [
        ("Model", str(model.get("id") or "unknown")),
        (
            "MoE layers × experts, top-k",
            f"{trace.get('n_layers', '?')} × {_experts_text([int(x) for x in trace.get('n_experts', [])])}, "
            f"top-{trace.get('top_k', '?')}",
        ),
        ("Routed expert size", eb_text),
        (
            "Tokens simulated",
            f"{int(settings.get('tokens_simulated', trace.get('n_tokens', 0))):,}"
            + (f" ({phase} rows)" if phase != "all" else " (all rows)"),
        ),
        ("Batching policy", str(doc["results"][0]["policy"])),
        (
            "Budget",
            "per layer: each layer retains C experts between batches"
            if settings.get("budget", "per-layer") == "per-layer"
            else "global: one pool of C × layers experts' memory shared by all layers",
        ),
        (
            "Counting",
            "per access: every request of an expert not retained is a load"
            if settings.get("count") == "access"
            else "per batch: each distinct expert of a batch loads at most once",
        ),
        ("Start", "warm (first uses not counted)" if settings.get("warm") else "cold"),
    ]
    if settings.get("popularity_from"):
        items.append(("static profile", str(settings["popularity_from"])))
    fit = settings.get("gpu_memory")
    if isinstance(fit, dict):
        items.append(
            (
                "GPU memory",
                f"{fit.get('spelling')} holds C = {fit['cache_experts']} per layer beside the "
                f"widest batch's working set ({human_bytes(fit['working_set_bytes'])})"
                + (": every expert fits" if fit.get("all_experts_fit") else ""),
            )
        )
    if settings.get("link_gbps"):
        items.append(
            (
                "Link (projection)",
                f"{settings['link_gbps']:g} GB/s: tokens/s the link alone allows at each row's "
                "bytes per token (a projection, not a measurement)",
            )
        )
    return items


def _reference_strategy(names: Sequence[str]) -> str | None:
    """The policy recommendations read: lru, else the first runnable cache strategy."""
    cached = [n for n in names if n not in ("naive", "dedup", "belady")]
    return "lru" if "lru" in cached else (cached[0] if cached else None)


def cache_recommendations(doc: dict[str, Any]) -> list[str]:
    """Findings computed from the rows (docs/cache.md, "Reading the report")."""
    out: list[str] = []
    names = list(dict.fromkeys(r["strategy"] for r in doc["results"]))
    ref = _reference_strategy(names)
    for b in cache_batch_sizes(doc):
        rows = sorted(
            (r for r in doc["results"] if int(r["batch_size"]) == b and r["strategy"] == ref),
            key=lambda r: int(r["cache_experts"]),
        )
        if not rows:
            continue
        label = _cache_label(str(ref))
        reaching = [r for r in rows if float(r["hit_rate"]) >= HALF]
        if reaching:
            r = reaching[0]
            out.append(
                f"Batch size {b}: C = {r['cache_experts']} is the smallest simulated capacity "
                f"whose {label} hit rate reaches 50% ({pct(float(r['hit_rate']))}, "
                f"{_per_token(r.get('bytes_per_token'))} loaded per token)."
            )
        else:
            top = rows[-1]
            out.append(
                f"Batch size {b}: no simulated capacity brings {label} to a 50% hit rate; "
                f"the largest, C = {top['cache_experts']}, hits {pct(float(top['hit_rate']))}."
            )
        for lo, hi in zip(rows, rows[1:]):
            step = 100.0 * (float(hi["hit_rate"]) - float(lo["hit_rate"]))
            if step < DIMINISHING_PP:
                out.append(
                    f"Batch size {b}: extra memory stops paying beyond C = {lo['cache_experts']}: "
                    f"going to C = {hi['cache_experts']} adds only {step:.1f} points of "
                    f"{label} hit rate."
                )
                break
        gaps = [g for g in doc.get("gaps") or [] if int(g["batch_size"]) == b]
        if gaps:
            g = max(gaps, key=lambda g: float(g["gap_points"]))
            if int(g["cache_experts"]) > 0:
                out.append(
                    f"Batch size {b}: the widest LRU → Belady gap is at C = {g['cache_experts']}: "
                    f"Belady hits {pct(float(g['belady_hit_rate']))}, LRU "
                    f"{pct(float(g['lru_hit_rate']))} ({float(g['gap_points']):.1f} points, "
                    f"{int(g['gap_loads']):,} loads): {gap_reading(g)}."
                )
                runnable = {
                    k: v
                    for k, v in (g.get("captured") or {}).items()
                    if v is not None and k not in ("lru", "belady")
                }
                if runnable:
                    best = max(runnable, key=lambda k: runnable[k])
                    out.append(
                        f"Batch size {b}, C = {g['cache_experts']}: of the other policies an "
                        f"engine can run, {best} captures the most of that gap "
                        f"({pct(runnable[best])})."
                        if runnable[best] > 0
                        else f"Batch size {b}, C = {g['cache_experts']}: none of the other "
                        f"policies simulated does better than LRU there (best: {best}, "
                        f"{pct(runnable[best])} of the gap)."
                    )
    sets = doc.get("working_sets") or []
    for b in cache_batch_sizes(doc):
        mine = [w for w in sets if int(w["batch_size"]) == b]
        if mine:
            mean = sum(float(w["mean"]) for w in mine) / len(mine)
            widest = max(int(w["max"]) for w in mine)
            out.append(
                f"Batch size {b}: a batch uses {mean:.1f} distinct experts per layer on average "
                f"(at most {widest}): the device holds them besides the cache, so capacities "
                f"below that working set are where the hit rate falls off."
            )
    return out


def cache_notes(doc: dict[str, Any]) -> list[str]:
    """How the numbers are defined, one sentence each."""
    settings = doc.get("cache") or {}
    lookups = "requests" if settings.get("count") == "access" else "distinct experts per batch"
    notes = [
        "C = experts each layer retains between batches, on top of the running batch's own "
        "experts; a load = an expert a batch uses that was not retained (docs/cache.md).",
        f"Hit rate = 1 − loads / lookups, lookups = {lookups}; naive looks up every request. "
        "vs dedup = loads saved against loading each batch's distinct experts with no cache.",
        "Gap captured = (LRU loads − loads) / (LRU loads − Belady loads): 0% is LRU, 100% is "
        "the bound; — where the two are equal.",
    ]
    if settings.get("belady_is_bound") is False:
        notes.append(
            "One pool in bytes over layers whose experts differ in size: Belady's rule is then a "
            "heuristic, not a bound."
        )
    return notes


def prefetch_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The `prefetch` section of a cache document: one row per batch size, predictor and cache
    (docs/prefetch.md): recall, precision, loads left on the critical path, bytes wasted."""
    header = ["Batch", "Predictor", "Cache", "Recall", "Precision", "Critical loads", "Wasted"]
    rows: list[list[str]] = []
    for r in (doc.get("prefetch") or {}).get("rows", []):
        cache = "none" if r.get("strategy") is None else f"{r['strategy']} C={r['cache_experts']}"
        rows.append(
            [
                str(r["batch_size"]),
                str(r["predictor"]),
                cache,
                "—" if r.get("recall") is None else pct(r["recall"]),
                "—" if r.get("precision") is None else pct(r["precision"]),
                f"{int(r['critical_loads']):,}",
                human_bytes(int(r["wasted_bytes"])),
            ]
        )
    return header, rows


def prefetch_notes(doc: dict[str, Any]) -> list[str]:
    """How the prefetch section was scored, one sentence each."""
    info = doc.get("prefetch") or {}
    if not info:
        return []
    trained = {
        "train trace": "learned on the --train trace and scored on every batch",
        "first half": "learned on the first half of the batches and scored on the second half",
        "none": "nothing learned; scored on every batch",
    }.get(str(info.get("trained_on")), str(info.get("trained_on")))
    return [
        f"Prefetch: each predictor proposes up to {info.get('prefetch_experts')} experts per "
        f"batch and layer before its router runs; {trained} (docs/prefetch.md).",
        "Critical loads = experts a batch needs that were neither retained nor prefetched; "
        "wasted = bytes prefetched but not needed (and not retained).",
    ]


# ---------------------------------------------------------------------- schedule documents

SCHEDULE_HEADER = [
    "Admission",
    "Loads/tok",
    "Bytes/tok",
    "vs FIFO",
    "Of oracle",
    "Wait mean / p95 / max",
    "Steps",
    "Running",
]
SCHEDULE_CACHE_HEADER = ["Cache bytes/tok", "Cache vs FIFO"]
# Admission policies a real engine can run (the oracles know each request's future routing).
SCHEDULE_RUNNABLE = ("random", "affinity", "group")


def is_schedule(doc: Any) -> bool:
    """Whether `doc` is a `moeprof schedule` results document."""
    return isinstance(doc, dict) and doc.get("kind") == "schedule"


def schedule_batch_sizes(doc: dict[str, Any]) -> list[int]:
    return sorted({int(r["batch_size"]) for r in doc["results"]})


def _signed_pct(value: Any) -> str:
    return _DASH if value is None else f"{100.0 * float(value):+.1f}%"


def schedule_table_rows(doc: dict[str, Any], batch_size: int) -> tuple[list[str], list[list[str]]]:
    """One row per admission policy at one B: loads and bytes per generated token with dedup,
    the reduction against FIFO and its share of the oracle's, waiting steps, steps to drain,
    mean running requests (and the cache columns when the document has a cache)."""
    has_cache = bool((doc.get("schedule") or {}).get("cache"))
    header = list(SCHEDULE_HEADER) + (list(SCHEDULE_CACHE_HEADER) if has_cache else [])
    rows: list[list[str]] = []
    for r in doc["results"]:
        if int(r["batch_size"]) != batch_size:
            continue
        cells = [
            str(r["admission"]),
            f"{float(r['loads_per_generated_token']):.2f}",
            _per_token(r.get("bytes_per_generated_token")),
            _signed_pct(r["reduction_vs_fifo"]) if r["admission"] != "fifo" else _DASH,
            _share(r.get("oracle_share")),
            f"{float(r['wait_mean']):,.1f} / {int(r['wait_p95']):,} / {int(r['wait_max']):,}",
            f"{int(r['steps']):,}",
            f"{float(r['occupancy_mean']):.1f}",
        ]
        if has_cache:
            cells += [
                _per_token(r.get("cache_bytes_per_generated_token")),
                _signed_pct(r.get("cache_reduction_vs_fifo"))
                if r["admission"] != "fifo"
                else _DASH,
            ]
        rows.append(cells)
    return header, rows


def schedule_summary_items(doc: dict[str, Any]) -> list[tuple[str, str]]:
    trace = doc["trace"]
    settings = doc.get("schedule") or {}
    model = trace.get("model") or {}
    eb_text, _ = _expert_bytes_text([int(x) for x in trace.get("expert_bytes", [])])
    gen = int(doc["results"][0]["generated_tokens"])
    rate = settings.get("arrival_rate")
    wait = settings.get("max_wait")
    cache = settings.get("cache")
    items = [
        ("Model", str(model.get("id") or "unknown")),
        (
            "MoE layers × experts, top-k",
            f"{trace.get('n_layers', '?')} × "
            f"{_experts_text([int(x) for x in trace.get('n_experts', [])])}, "
            f"top-{trace.get('top_k', '?')}",
        ),
        ("Routed expert size", eb_text),
        (
            "Requests",
            f"{int(settings.get('n_requests', trace.get('n_requests', 0))):,}: "
            f"{int(settings.get('prompt_rows', 0)):,} prompt rows, {gen:,} generated tokens"
            + ("" if settings.get("has_phases", True) else " (no phases: all rows decode)"),
        ),
        (
            "Serving",
            "continuous batching with chunked prefill, "
            f"{int(settings.get('max_tokens_per_step', 0)):,} tokens per step",
        ),
        (
            "Arrivals",
            "all at step 0"
            if rate is None
            else f"Poisson, {float(rate):g} requests per step (seed {settings.get('seed', 0)})",
        ),
        ("Max wait", "none" if wait is None else f"{int(wait):,} steps"),
    ]
    if isinstance(cache, dict):
        items.append(
            ("Cache", f"{cache.get('strategy')}, {cache.get('cache_experts')} experts per layer")
        )
    return items


def schedule_findings(doc: dict[str, Any]) -> list[str]:
    """Per B: what the best runnable admission saves against FIFO, what share of the oracle's
    saving that is, and what it costs in waiting time (docs/schedule.md)."""
    out: list[str] = []
    for b in schedule_batch_sizes(doc):
        rows = {str(r["admission"]): r for r in doc["results"] if int(r["batch_size"]) == b}
        fifo = rows.get("fifo")
        runnable = [rows[n] for n in SCHEDULE_RUNNABLE if n in rows]
        if fifo is None or not runnable:
            continue
        best = max(runnable, key=lambda r: float(r["reduction_vs_fifo"]))
        added = float(best["wait_mean"]) - float(fifo["wait_mean"])
        share = best.get("oracle_share")
        text = (
            f"B = {b}: {best['admission']} admission loads "
            f"{pct(abs(float(best['reduction_vs_fifo'])))} "
            f"{'fewer' if float(best['reduction_vs_fifo']) >= 0 else 'more'} experts than FIFO "
            f"({_per_token(best.get('bytes_per_generated_token'))} per generated token)"
        )
        if share is not None:
            text += f", {pct(float(share))} of the oracle's reduction"
        text += (
            f"; mean wait {float(best['wait_mean']):,.1f} steps against FIFO's "
            f"{float(fifo['wait_mean']):,.1f} ({added:+,.1f}), worst "
            f"{int(best['wait_max']):,} against {int(fifo['wait_max']):,}."
        )
        out.append(text)
    return out


def schedule_notes(doc: dict[str, Any]) -> list[str]:
    """How the numbers are defined, one sentence each."""
    notes = [
        "Loads = distinct experts per step and layer, summed (dedup inside each step); per "
        "token = per generated (decode) token (docs/schedule.md).",
        "vs FIFO = 1 − loads / FIFO's loads at the same B; of oracle = that reduction over the "
        "oracle's (affinity and random: oracle; group: group-oracle).",
        "affinity and group read each request's prompt routing while it waits (prefill on "
        "arrival or a separate prefill stage); the oracles read its whole routing, which no "
        "real scheduler has.",
        "Wait = steps from arrival to admission; Running = mean requests running per step.",
    ]
    if (doc.get("schedule") or {}).get("cache"):
        notes.append(
            "Cache columns: loads with the named strategy retaining that many experts per layer "
            "between steps (docs/cache.md), per generated token."
        )
        cache = (doc.get("schedule") or {}).get("cache")
        if isinstance(cache, dict) and cache.get("strategy") == "belady":
            notes.append(
                "belady reads the future: its cache columns are a bound, not what a runnable "
                "cache achieves."
            )
    return notes


def schedule_timing_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Scheduling cost per policy and B: simulation seconds and the decision time per step."""
    header = ["Batch", "Admission", "Simulation", "Deciding", "Per step"]
    rows = [
        [
            str(r["batch_size"]),
            str(r["admission"]),
            f"{float(r['schedule_seconds']):.3f} s",
            f"{float(r['decision_seconds']):.3f} s",
            f"{1e3 * float(r['decision_seconds']) / max(int(r['n_batches']), 1):.3f} ms",
        ]
        for r in doc["results"]
    ]
    return header, rows
