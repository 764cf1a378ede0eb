"""The report of a sweep, computed from its stored rows (docs/sweep-report.md).

Pure: rows (dicts, as `results.jsonl` holds them) in, dataclasses out; no printing, no files.
What it derives: totals, the executive summary and the savings by batch size (from `analyze`
rows), one pattern per swept parameter of each analysis (its headline metric averaged over the
other axes at each value, the effect in points, and the direction only where the averages are
strictly monotone in the parameter's order), recommendations worded from those numbers,
per-analysis tables, and the curves of the facet plot. Failed rows (with an `error`) are counted
and listed, never averaged.

The renderers (`moeprof.report.markdown`, `.terminal`, `.plot`) draw everything from here.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moeprof.errors import MoeprofError
from moeprof.formatting import human_bytes, pct
from moeprof.sweep.analyses import REGISTRY

Row = Mapping[str, Any]
BATCH_SIZE = "batch_size"
TRACE_PREFIX = "trace."
# Trace columns that describe the run, not a setting of the grid.
_NOT_PARAMETERS = ("trace.kind",)
FAILURES_LISTED = 50  # the markdown lists at most this many failed experiments one by one


# ---------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class AnalysisCount:
    analysis: str
    succeeded: int
    failed: int


@dataclass(frozen=True)
class Totals:
    experiments: int
    succeeded: int
    failed: int
    by_analysis: tuple[AnalysisCount, ...]


@dataclass(frozen=True)
class Extreme:
    """The largest value of a metric and where it was reached (the row's grid values)."""

    value: float
    key: str
    where: str  # "batch size 64, locality 0.9, zipf 1.5"


@dataclass(frozen=True)
class Executive:
    """Over the `analyze` rows without error."""

    experiments: int
    max_memory_savings: Extreme
    max_bandwidth_savings: Extreme
    mean_reuse_factor: float  # the average over experiments of each one's mean_reuse_factor
    max_reuse_factor: Extreme


@dataclass(frozen=True)
class BatchSizeRow:
    """`analyze` rows of one batch size, averaged over every other axis."""

    batch_size: int
    experiments: int
    mean_memory_savings: float
    mean_bandwidth_savings: float
    max_reuse_factor: float


@dataclass(frozen=True)
class ValueMean:
    value: Any
    experiments: int
    mean: float


@dataclass(frozen=True)
class Pattern:
    """One swept parameter of one analysis: its headline metric averaged at each value."""

    analysis: str
    parameter: str  # the row column ("trace.locality")
    label: str  # how the report names it ("locality")
    metric: str
    metric_label: str
    values: tuple[ValueMean, ...]  # in the parameter's order
    ordered: bool  # numbers (or sizes such as "2k", "4k"): an order in which a trend can exist
    direction: str | None  # "up" / "down": strictly monotone in that order; else None
    lowest: ValueMean
    highest: ValueMean

    @property
    def effect_pp(self) -> float:
        """Percentage points between the highest and the lowest per-value average."""
        return 100.0 * (self.highest.mean - self.lowest.mean)

    @property
    def trend(self) -> str:
        """The direction in words, only where the averages are strictly monotone."""
        if self.direction is None:
            return "not monotone" if self.ordered else "no order (named values)"
        return f"{'higher' if self.direction == 'up' else 'lower'} at every step"

    @property
    def sentence(self) -> str:
        first, last = self.values[0], self.values[-1]
        if self.direction is not None:
            more = "higher" if self.direction == "up" else "lower"
            return (
                f"{self.label}: each larger value gave {more} {self.metric_label}, "
                f"{pct(first.mean)} at {show(first.value)} to {pct(last.mean)} at "
                f"{show(last.value)} ({self.effect_pp:.1f} points)."
            )
        trend = f"; not monotone in {self.label}" if self.ordered else ""
        return (
            f"{self.label}: {self.effect_pp:.1f} points of {self.metric_label} between the "
            f"highest average ({pct(self.highest.mean)} at {show(self.highest.value)}) and the "
            f"lowest ({pct(self.lowest.mean)} at {show(self.lowest.value)}){trend}."
        )


@dataclass(frozen=True)
class Failure:
    key: str
    analysis: str
    batch_size: Any
    where: str
    error: str


@dataclass(frozen=True)
class SummaryTable:
    """A per-analysis table, its cells as text (every renderer shows the same)."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    align: str  # one 'l' or 'r' per column
    note: str = ""


@dataclass(frozen=True)
class Curve:
    label: str
    batch_sizes: tuple[int, ...]
    means: tuple[float, ...]


@dataclass(frozen=True)
class FacetPanel:
    """One analysis's headline metric against batch size, one curve per value of `curve_by`."""

    analysis: str
    metric: str
    metric_label: str
    curve_by: str | None  # the label of the parameter, None: one curve over every experiment
    curves: tuple[Curve, ...]


@dataclass(frozen=True)
class SweepSummary:
    sweeps: tuple[str, ...]
    totals: Totals
    executive: Executive | None  # None: no analyze row without error
    by_batch_size: tuple[BatchSizeRow, ...]
    patterns: tuple[Pattern, ...]
    recommendations: tuple[str, ...]
    tables: tuple[SummaryTable, ...]
    failures: tuple[Failure, ...]
    curve_by: str | None  # the column the facet plot's curves are drawn by
    panels: tuple[FacetPanel, ...]


# ---------------------------------------------------------------------- values and columns


def show(value: Any) -> str:
    """A grid value as the report writes it: a file by its name, numbers without noise."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and (os.sep in value or "/" in value):
        return os.path.basename(value)
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_SIZED = re.compile(r"^(\d+(?:\.\d+)?)(\D*)$")


def _order(values: Iterable[Any]) -> tuple[list[Any], bool]:
    """Distinct values in the parameter's order, and whether that order is meaningful: numeric
    order for numbers (and for true/false), by size for spellings with one shared unit ("2k",
    "4k"; "25%", "50%"); otherwise the order of first appearance (no trend is claimed)."""
    distinct = list(dict.fromkeys(values))
    if all(_is_number(v) for v in distinct) or all(isinstance(v, bool) for v in distinct):
        return sorted(distinct), True
    sizes = [_SIZED.match(v) if isinstance(v, str) else None for v in distinct]
    if all(sizes) and len({m.group(2) for m in sizes if m}) == 1:
        by_size = {v: float(m.group(1)) for v, m in zip(distinct, sizes) if m}
        return sorted(distinct, key=by_size.__getitem__), True
    return distinct, False


def _ok(row: Row) -> bool:
    return row.get("error") is None


def _number(row: Row, name: str) -> float | None:
    """A metric of a row as a float (None when the row holds none); not a number: refused."""
    value = row.get(name)
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(float(value)):
        raise MoeprofError(f"row {row.get('key', '?')}: {name} is not a number ({value!r:.40})")
    return float(value)


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def parameter_columns(rows: Sequence[Row], analysis: str | None = None) -> list[str]:
    """The grid's columns among `rows` (of one analysis, or all): trace settings, the analysis
    settings its registry entry names, and the batch size; in first-appearance order."""
    names: dict[str, None] = {}
    for row in rows:
        if analysis is not None and row.get("analysis") != analysis:
            continue
        entry = REGISTRY.get(str(row.get("analysis")))
        settings = entry.settings if entry is not None else {}
        for column, value in row.items():
            if value is None or column in _NOT_PARAMETERS:
                continue
            if column.startswith(TRACE_PREFIX) or column in settings or column == BATCH_SIZE:
                names[column] = None
    return list(names)


def labels(columns: Sequence[str]) -> dict[str, str]:
    """How the report names each column: a trace setting without its prefix ("locality"), unless
    an analysis setting has the same name ("trace.expert_bytes" beside "expert_bytes")."""
    out = {}
    for column in columns:
        bare = column[len(TRACE_PREFIX) :] if column.startswith(TRACE_PREFIX) else column
        out[column] = bare if bare == column or bare not in columns else column
    if BATCH_SIZE in out:
        out[BATCH_SIZE] = "batch size"
    return out


def resolve_curve_by(name: str | None, rows: Sequence[Row]) -> str | None:
    """The column named by `curve_by` (its column name or its label), checked against `rows`
    (stored rows, or the columns of a sweep's experiments before it runs)."""
    if name is None:
        return None
    columns = parameter_columns(rows)
    names = labels(columns)
    if name in (BATCH_SIZE, "batch size"):
        raise MoeprofError("curve_by cannot be batch_size: batch size is the plot's x axis")
    for column, label in names.items():
        if name in (column, label) and column != BATCH_SIZE:
            return column
    choices = ", ".join(label for column, label in names.items() if column != BATCH_SIZE)
    raise MoeprofError(
        f"curve_by {name!r} is not a parameter of these rows; choose from {choices or 'none'}"
    )


def _where(row: Row, columns: Sequence[str], names: Mapping[str, str]) -> str:
    """The row's values of the swept columns: "batch size 64, locality 0.9"."""
    parts = [f"{names[c]} {show(row.get(c))}" for c in columns if row.get(c) is not None]
    return ", ".join(parts) or "every experiment"


def _swept(rows: Sequence[Row], columns: Sequence[str]) -> list[str]:
    return [c for c in columns if len({r.get(c) for r in rows if r.get(c) is not None}) > 1]


# ---------------------------------------------------------------------- parts


def _totals(rows: Sequence[Row]) -> Totals:
    analyses = list(dict.fromkeys(str(r.get("analysis")) for r in rows))
    counts = tuple(
        AnalysisCount(
            a,
            sum(1 for r in rows if r.get("analysis") == a and _ok(r)),
            sum(1 for r in rows if r.get("analysis") == a and not _ok(r)),
        )
        for a in analyses
    )
    failed = sum(1 for r in rows if not _ok(r))
    return Totals(len(rows), len(rows) - failed, failed, counts)


def _extreme(
    rows: Sequence[Row], metric: str, swept: Sequence[str], names: Mapping[str, str]
) -> Extreme:
    scored = [(v, r) for r in rows if (v := _number(r, metric)) is not None]
    value, row = max(scored, key=lambda pair: pair[0])  # the first of equal maxima
    return Extreme(value, str(row.get("key", "")), _where(row, swept, names))


def _executive(analyze_rows: Sequence[Row], names: Mapping[str, str]) -> Executive | None:
    if not analyze_rows:
        return None
    swept = [BATCH_SIZE] + [c for c in _swept(analyze_rows, list(names)) if c != BATCH_SIZE]
    reuse = [v for r in analyze_rows if (v := _number(r, "mean_reuse_factor")) is not None]
    return Executive(
        experiments=len(analyze_rows),
        max_memory_savings=_extreme(analyze_rows, "memory_savings", swept, names),
        max_bandwidth_savings=_extreme(analyze_rows, "bandwidth_savings", swept, names),
        mean_reuse_factor=_mean(reuse) if reuse else 0.0,
        max_reuse_factor=_extreme(analyze_rows, "max_reuse_factor", swept, names),
    )


def _by_batch_size(analyze_rows: Sequence[Row]) -> tuple[BatchSizeRow, ...]:
    groups: dict[int, list[Row]] = {}
    for row in analyze_rows:
        groups.setdefault(int(row[BATCH_SIZE]), []).append(row)
    out = []
    for b, rs in sorted(groups.items()):
        out.append(
            BatchSizeRow(
                batch_size=b,
                experiments=len(rs),
                mean_memory_savings=_mean([_number(r, "memory_savings") or 0.0 for r in rs]),
                mean_bandwidth_savings=_mean([_number(r, "bandwidth_savings") or 0.0 for r in rs]),
                max_reuse_factor=max(_number(r, "max_reuse_factor") or 0.0 for r in rs),
            )
        )
    return tuple(out)


def _headline(analysis: str) -> tuple[str, str] | None:
    entry = REGISTRY.get(analysis)
    return entry.headline if entry is not None and entry.headline[0] else None


def value_means(rows: Sequence[Row], column: str, metric: str) -> tuple[list[ValueMean], bool]:
    """The metric averaged over the rows at each value of `column` (rows without the value or
    the metric left out), in the column's order."""
    groups: dict[Any, list[float]] = {}
    for row in rows:
        value, score = row.get(column), _number(row, metric)
        if value is not None and score is not None:
            groups.setdefault(value, []).append(score)
    order, ordered = _order(groups)
    return [ValueMean(v, len(groups[v]), _mean(groups[v])) for v in order], ordered


def _pattern(analysis: str, rows: Sequence[Row], column: str, label: str) -> Pattern | None:
    headline = _headline(analysis)
    if headline is None:
        return None
    metric, metric_label = headline
    means, ordered = value_means(rows, column, metric)
    if len(means) < 2:
        return None
    steps = [b.mean - a.mean for a, b in zip(means, means[1:])]
    direction = None
    if ordered and all(s > 0 for s in steps):
        direction = "up"
    elif ordered and all(s < 0 for s in steps):
        direction = "down"
    return Pattern(
        analysis=analysis,
        parameter=column,
        label=label,
        metric=metric,
        metric_label=metric_label,
        values=tuple(means),
        ordered=ordered,
        direction=direction,
        lowest=min(means, key=lambda m: m.mean),
        highest=max(means, key=lambda m: m.mean),
    )


def _strategy(row: Row) -> Any:
    """A cache row's strategy, under the axis's name or its older spelling."""
    return row.get("strategies") if row.get("strategies") is not None else row.get("strategy")


def _grid(
    title: str,
    rows: Sequence[Row],
    row_of: Callable[[Row], Any],
    column_of: Callable[[Row], Any],
    metric: str,
    corner: str,
    note: str = "",
) -> SummaryTable:
    """The metric averaged in each (row value, column value) cell; "—" where no row falls."""
    cells: dict[tuple[Any, Any], list[float]] = {}
    for row in rows:
        score = _number(row, metric)
        if score is not None:
            cells.setdefault((row_of(row), column_of(row)), []).append(score)
    row_values, _ = _order(k[0] for k in cells)
    column_values, _ = _order(k[1] for k in cells)
    body = tuple(
        (show(rv),)
        + tuple(pct(_mean(cells[(rv, cv)])) if (rv, cv) in cells else "—" for cv in column_values)
        for rv in row_values
    )
    header = (corner, *(show(cv) for cv in column_values))
    return SummaryTable(title, header, body, "l" + "r" * len(column_values), note)


def _replay_table(rows: Sequence[Row]) -> SummaryTable:
    groups: dict[Any, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.get("strategies"), []).append(row)
    body = []
    for strategy in _order(groups)[0]:
        rs = groups[strategy]
        saved = [v for r in rs if (v := _number(r, "savings_vs_naive")) is not None]
        gbps = [v for r in rs if (v := _number(r, "gbps")) is not None]
        body.append(
            (
                show(strategy),
                str(len(rs)),
                f"{_mean([_number(r, 'copies') or 0.0 for r in rs]):,.1f}",
                human_bytes(_mean([_number(r, "bytes_copied") or 0.0 for r in rs])),
                pct(_mean(saved)) if saved else "—",
                f"{_mean(gbps):.2f}" if gbps else "—",
            )
        )
    return SummaryTable(
        "Replay (CPU backend): copies and bytes by strategy (averages over experiments)",
        ("Strategy", "Experiments", "Copies", "Bytes copied", "Saved vs naive", "GB/s"),
        tuple(body),
        "lrrrrr",
        "Copies and bytes are counted exactly; seconds and GB/s are host memory copies on the "
        "machine that ran the sweep, not a PCIe link, and differ from run to run.",
    )


def _tables(ok_rows: Sequence[Row]) -> tuple[SummaryTable, ...]:
    out = []
    analyze = [r for r in ok_rows if r.get("analysis") == "analyze"]
    # With one policy this table is the savings-by-batch-size table again.
    if len({r.get("policy") for r in analyze}) > 1:
        out.append(
            _grid(
                "Analyze: average memory savings by batch size and policy",
                analyze,
                lambda r: r.get(BATCH_SIZE),
                lambda r: r.get("policy"),
                "memory_savings",
                "Batch size",
            )
        )
    cache = [r for r in ok_rows if r.get("analysis") == "cache"]
    if cache:
        out.append(
            _grid(
                "Cache: average hit rate by strategy and capacity (cache_experts)",
                cache,
                _strategy,
                lambda r: r.get("cache_experts"),
                "hit_rate",
                "Strategy",
                "Averaged over traces, batch sizes and the other cache settings.",
            )
        )
    replay = [r for r in ok_rows if r.get("analysis") == "replay"]
    if replay:
        out.append(_replay_table(replay))
    return tuple(out)


def _failures(rows: Sequence[Row], names: Mapping[str, str]) -> tuple[Failure, ...]:
    failed = [r for r in rows if not _ok(r)]
    columns = [c for c in parameter_columns(rows) if c != BATCH_SIZE]
    swept = _swept(rows, columns)
    return tuple(
        Failure(
            key=str(r.get("key", "")),
            analysis=str(r.get("analysis")),
            batch_size=r.get(BATCH_SIZE),
            where=_where(r, swept, names),
            error=str(r.get("error")),
        )
        for r in failed
    )


def _recommendations(
    ok_rows: Sequence[Row],
    by_batch: Sequence[BatchSizeRow],
    patterns: Sequence[Pattern],
    failures: Sequence[Failure],
) -> tuple[str, ...]:
    from moeprof.cache import GAP_TO, REFERENCES

    out: list[str] = []
    if len(by_batch) > 1:
        small, large = by_batch[0], by_batch[-1]
        out.append(
            f"Batch as large as latency allows: the largest batch size tried ({large.batch_size}) "
            f"saved {pct(large.mean_memory_savings)} of expert loads on average, against "
            f"{pct(small.mean_memory_savings)} at {small.batch_size}."
        )
    levers = sorted(
        (p for p in patterns if p.analysis == "analyze" and p.parameter != BATCH_SIZE),
        key=lambda p: -p.effect_pp,
    )
    if levers and levers[0].effect_pp > 0:
        top = levers[0]
        trend = f" ({top.trend})" if top.direction else ""
        out.append(
            f"{top.label} is the strongest lever: +{top.effect_pp:.1f} points of "
            f"{top.metric_label} from {show(top.lowest.value)} to {show(top.highest.value)}{trend}."
        )
        if len(levers) > 1:
            least = levers[-1]
            out.append(
                f"{least.label} matters least: {least.effect_pp:.1f} points of "
                f"{least.metric_label} between its values."
            )
    cache = [r for r in ok_rows if r.get("analysis") == "cache"]
    capacities, _ = _order(r.get("cache_experts") for r in cache)
    for capacity in capacities:
        at = [r for r in cache if r.get("cache_experts") == capacity]
        means: dict[Any, list[float]] = {}
        for r in at:
            if (score := _number(r, "hit_rate")) is not None:
                means.setdefault(_strategy(r), []).append(score)
        online = {s: _mean(v) for s, v in means.items() if s not in (*REFERENCES, GAP_TO)}
        if not online:
            continue
        best = max(online, key=lambda s: online[s])
        text = (
            f"At cache_experts {show(capacity)}, {best} has the best average hit rate of the "
            f"strategies an engine can run ({pct(online[best])})"
        )
        if GAP_TO in means:
            bound = _mean(means[GAP_TO])
            text += (
                f"; the {GAP_TO} bound reaches {pct(bound)} "
                f"({100 * (bound - online[best]):.1f} points more)"
            )
        out.append(text + ".")
    replay = [r for r in ok_rows if r.get("analysis") == "replay"]
    if replay:
        groups: dict[Any, list[float]] = {}
        for r in replay:
            groups.setdefault(r.get("strategies"), []).append(_number(r, "bytes_copied") or 0.0)
        fewest = min(groups, key=lambda s: _mean(groups[s]))
        out.append(
            f"Of the replayed strategies, {fewest} copied the fewest bytes on average "
            f"({human_bytes(_mean(groups[fewest]))} per experiment)."
        )
    if failures:
        common: dict[str, int] = {}
        for f in failures:
            common[f.error] = common.get(f.error, 0) + 1
        error, count = max(common.items(), key=lambda item: item[1])
        out.append(
            f"{len(failures)} experiments failed and are left out of every average "
            f"({count} with: {error}); rerunning the sweep retries them."
        )
    return tuple(out)


def _panels(
    ok_rows: Sequence[Row], curve_by: str | None, names: Mapping[str, str]
) -> tuple[FacetPanel, ...]:
    panels = []
    for analysis in dict.fromkeys(str(r.get("analysis")) for r in ok_rows):
        headline = _headline(analysis)
        if headline is None:
            continue
        metric, metric_label = headline
        rows = [r for r in ok_rows if r.get("analysis") == analysis]
        by = (
            curve_by
            if curve_by is not None and any(r.get(curve_by) is not None for r in rows)
            else None
        )
        groups: dict[Any, list[Row]] = {}
        for row in rows:
            if by is None or row.get(by) is not None:
                groups.setdefault(row.get(by) if by is not None else None, []).append(row)
        curves = []
        for value in _order(groups)[0]:
            means, _ = value_means(groups[value], BATCH_SIZE, metric)
            if means:
                curves.append(
                    Curve(
                        label=f"{names[by]} {show(value)}"
                        if by is not None
                        else "every experiment",
                        batch_sizes=tuple(int(m.value) for m in means),
                        means=tuple(m.mean for m in means),
                    )
                )
        if curves:
            panels.append(
                FacetPanel(analysis, metric, metric_label, names[by] if by else None, tuple(curves))
            )
    return tuple(panels)


# ---------------------------------------------------------------------- the summary


def summarize_sweep(rows: Sequence[Row], curve_by: str | None = None) -> SweepSummary:
    """Everything a sweep report shows, from the stored rows (one per experiment).

    `curve_by` names the parameter whose values become the facet plot's curves (a column such as
    "trace.locality" or its label "locality"); None: the analyze parameter with the largest
    effect, if any was swept.
    """
    if not rows:
        raise MoeprofError("no sweep rows to report")
    chosen = resolve_curve_by(curve_by, rows)
    ok_rows = [r for r in rows if _ok(r)]
    names = labels(parameter_columns(rows))
    patterns: list[Pattern] = []
    for analysis in dict.fromkeys(str(r.get("analysis")) for r in ok_rows):
        mine = [r for r in ok_rows if r.get("analysis") == analysis]
        for column in _swept(mine, parameter_columns(mine, analysis)):
            pattern = _pattern(analysis, mine, column, names[column])
            if pattern is not None:
                patterns.append(pattern)
    analyze = [r for r in ok_rows if r.get("analysis") == "analyze"]
    by_batch = _by_batch_size(analyze)
    failures = _failures(rows, names)
    if chosen is None:
        levers = [p for p in patterns if p.parameter != BATCH_SIZE]
        analyze_levers = [p for p in levers if p.analysis == "analyze"] or levers
        if analyze_levers:
            chosen = max(analyze_levers, key=lambda p: p.effect_pp).parameter
    return SweepSummary(
        sweeps=tuple(dict.fromkeys(str(r.get("sweep")) for r in rows if r.get("sweep"))),
        totals=_totals(rows),
        executive=_executive(analyze, names),
        by_batch_size=by_batch,
        patterns=tuple(patterns),
        recommendations=_recommendations(ok_rows, by_batch, patterns, failures),
        tables=_tables(ok_rows),
        failures=failures,
        curve_by=chosen,
        panels=_panels(ok_rows, chosen, names),
    )


# ---------------------------------------------------------------------- format-neutral rows

DEFINITIONS = (
    "An experiment is one trace configuration x one analysis setting x one batch size: one row "
    "of results.jsonl. Failed experiments (with an error) are counted and listed, never averaged.",
    "Memory savings count expert loads avoided by loading each distinct expert once per batch; "
    "bandwidth savings weigh them by each layer's expert bytes. The reuse factor of a layer is "
    "1 - unique/requests; the average reuse factor is the mean over experiments of each one's "
    "mean over layers, the maximum is the best layer of any experiment.",
    "A parameter is swept when the rows hold more than one value of it. Its pattern averages the "
    "analysis's headline metric over every other axis at each of its values; the effect is the "
    "highest minus the lowest of those averages, in percentage points.",
    "A trend is stated only where the averages strictly rise (or fall) at every step of the "
    "parameter's order: numeric order for numbers, size order for spellings with one unit "
    "(2k, 4k; 25%, 50%). Named values (strategies, policies, files) have no order: only their "
    "highest and lowest are given.",
    "Averages over an unbalanced grid (failed or missing experiments) mix different sets of the "
    "other axes; compare values within one complete grid.",
)


def totals_items(summary: SweepSummary) -> list[tuple[str, str]]:
    t = summary.totals
    items = [
        ("Sweep", ", ".join(summary.sweeps) or "—"),
        ("Experiments", f"{t.experiments:,} ({t.succeeded:,} without error, {t.failed:,} failed)"),
    ]
    items += [
        (
            f"{c.analysis}",
            f"{c.succeeded:,} experiments" + (f", {c.failed:,} failed" if c.failed else ""),
        )
        for c in t.by_analysis
    ]
    return items


def executive_items(summary: SweepSummary) -> list[tuple[str, str]]:
    e = summary.executive
    if e is None:
        return [("analyze", "no analyze experiment without error: no savings to summarise")]
    return [
        ("Analyze experiments", f"{e.experiments:,}"),
        (
            "Maximum memory savings",
            f"{pct(e.max_memory_savings.value)} ({e.max_memory_savings.where})",
        ),
        (
            "Maximum bandwidth savings",
            f"{pct(e.max_bandwidth_savings.value)} ({e.max_bandwidth_savings.where})",
        ),
        ("Average reuse factor", f"{e.mean_reuse_factor:.3f}"),
        ("Maximum reuse factor", f"{e.max_reuse_factor.value:.3f} ({e.max_reuse_factor.where})"),
    ]


def batch_size_table(summary: SweepSummary) -> SummaryTable:
    return SummaryTable(
        "Savings by batch size (analyze, averaged over every other axis)",
        (
            "Batch size",
            "Experiments",
            "Avg memory savings",
            "Avg bandwidth savings",
            "Max reuse factor",
        ),
        tuple(
            (
                str(r.batch_size),
                f"{r.experiments:,}",
                pct(r.mean_memory_savings),
                pct(r.mean_bandwidth_savings),
                f"{r.max_reuse_factor:.3f}",
            )
            for r in summary.by_batch_size
        ),
        "rrrrr",
    )


def pattern_tables(summary: SweepSummary) -> list[SummaryTable]:
    """One table per analysis: each swept parameter, its averages, effect and trend."""
    out = []
    for analysis in dict.fromkeys(p.analysis for p in summary.patterns):
        mine = [p for p in summary.patterns if p.analysis == analysis]
        out.append(
            SummaryTable(
                f"{analysis}: average {mine[0].metric_label} at each value of each swept parameter",
                ("Parameter", "Average at each value", "Effect (points)", "Trend"),
                tuple(
                    (
                        p.label,
                        ", ".join(f"{show(v.value)}: {pct(v.mean)}" for v in p.values),
                        f"{p.effect_pp:.1f}",
                        p.trend,
                    )
                    for p in mine
                ),
                "llrl",
            )
        )
    return out


def failure_table(summary: SweepSummary, limit: int | None = FAILURES_LISTED) -> SummaryTable:
    shown = summary.failures if limit is None else summary.failures[:limit]
    hidden = len(summary.failures) - len(shown)
    return SummaryTable(
        "Failed experiments (left out of every average)",
        ("Analysis", "Batch size", "Where", "Error"),
        tuple((f.analysis, show(f.batch_size), f.where, f.error) for f in shown),
        "lrll",
        f"... and {hidden:,} more (every one is in results.jsonl with its error)."
        if hidden
        else "",
    )
