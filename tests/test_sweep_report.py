"""The sweep report (docs/sweep-report.md): every number of the summary against a brute-force
computation written here over the same rows (a hand-made table and a real tiny sweep), patterns
stated only where monotone, failed rows left out, and `moeprof report results.jsonl` end to end."""

from __future__ import annotations

import itertools
import json
import statistics
import textwrap
from pathlib import Path

import pytest

from moeprof import MoeprofError
from moeprof.report.results import load_sweep_rows
from moeprof.sweep import load_sweep, run_sweep
from moeprof.sweep.summary import SweepSummary, summarize_sweep

PNG = b"\x89PNG\r\n\x1a\n"

# ---------------------------------------------------------------------- a hand-made table

# analyze: locality rises at every step, zipf goes up then down (not monotone), batch size up.
SAVINGS = {  # (locality, zipf, batch size) -> memory savings
    (loc, z, b): round(0.1 * b / 4 + 0.3 * loc + {0.0: 0.0, 0.5: 0.1, 1.0: 0.05}[z], 6)
    for loc, z, b in itertools.product((0.0, 0.5, 0.9), (0.0, 0.5, 1.0), (1, 2, 4))
}


def _analyze_rows() -> list[dict]:
    rows = []
    for i, ((loc, z, b), saved) in enumerate(SAVINGS.items()):
        rows.append(
            {
                "sweep": "hand",
                "key": f"a{i}",
                "trace.kind": "synth",
                "trace.locality": loc,
                "trace.zipf": z,
                "trace.experts": 8,  # fixed: not a swept parameter
                "analysis": "analyze",
                "policy": "tokens",
                "batch_size": b,
                "memory_savings": saved,
                "bandwidth_savings": saved / 2,
                "max_reuse_factor": saved + 0.01 * i,
                "mean_reuse_factor": saved - 0.001 * i,
                "error": None,
            }
        )
    return rows


def _cache_rows() -> list[dict]:
    rows = []
    hit = {("lru", "2k"): 0.4, ("lru", "4k"): 0.6, ("belady", "2k"): 0.55, ("belady", "4k"): 0.7}
    for i, ((strategy, capacity), rate) in enumerate(hit.items()):
        for b in (1, 8):
            # The older spelling `strategy` on half the rows: the report reads both.
            spelled = {"strategies": strategy} if b == 1 else {"strategy": strategy}
            rows.append(
                {"sweep": "hand", "key": f"c{i}-{b}", "trace.kind": "synth", "trace.locality": 0.5}
                | {"analysis": "cache", "cache_experts": capacity, "policy": "decode"}
                | spelled
                | {"batch_size": b, "hit_rate": rate - 0.1 * (b == 8), "error": None}
            )
    return rows


def _failed_rows() -> list[dict]:
    # Numbers that would move every average if they were counted.
    return [
        {
            "sweep": "hand",
            "key": f"f{i}",
            "trace.locality": 0.9,
            "trace.zipf": 1.0,
            "analysis": "analyze",
            "policy": "tokens",
            "batch_size": 4,
            "memory_savings": 5.0,
            "bandwidth_savings": 5.0,
            "max_reuse_factor": 5.0,
            "mean_reuse_factor": 5.0,
            "error": "ValueError: top_k 8 is more than the 4 experts",
        }
        for i in range(2)
    ]


HAND = _analyze_rows() + _cache_rows() + _failed_rows()


# ---------------------------------------------------------------------- brute force


def brute_means(rows: list[dict], column: str, metric: str) -> dict:
    out: dict = {}
    for row in rows:
        if row.get("error") is None and row.get(column) is not None:
            out.setdefault(row[column], []).append(row[metric])
    return {value: statistics.fmean(v) for value, v in out.items()}


def cache_strategy(row: dict) -> str:
    return row.get("strategies") or row.get("strategy")


def check_summary_against_brute_force(summary: SweepSummary, rows: list[dict]) -> None:
    ok = [r for r in rows if r.get("error") is None]
    analyze = [r for r in ok if r["analysis"] == "analyze"]
    assert summary.totals.experiments == len(rows)
    assert summary.totals.failed == len(rows) - len(ok)
    assert summary.totals.succeeded == len(ok)
    assert len(summary.failures) == len(rows) - len(ok)
    if analyze:
        e = summary.executive
        assert e is not None and e.experiments == len(analyze)
        assert e.max_memory_savings.value == max(r["memory_savings"] for r in analyze)
        assert e.max_bandwidth_savings.value == max(r["bandwidth_savings"] for r in analyze)
        assert e.max_reuse_factor.value == max(r["max_reuse_factor"] for r in analyze)
        assert e.mean_reuse_factor == pytest.approx(
            statistics.fmean(r["mean_reuse_factor"] for r in analyze), abs=1e-12
        )
        sizes = sorted({r["batch_size"] for r in analyze})
        assert [b.batch_size for b in summary.by_batch_size] == sizes
        for got in summary.by_batch_size:
            at = [r for r in analyze if r["batch_size"] == got.batch_size]
            assert got.experiments == len(at)
            assert got.mean_memory_savings == pytest.approx(
                statistics.fmean(r["memory_savings"] for r in at), abs=1e-12
            )
            assert got.mean_bandwidth_savings == pytest.approx(
                statistics.fmean(r["bandwidth_savings"] for r in at), abs=1e-12
            )
            assert got.max_reuse_factor == max(r["max_reuse_factor"] for r in at)
    for p in summary.patterns:
        mine = [r for r in ok if r["analysis"] == p.analysis]
        want = brute_means(mine, p.parameter, p.metric)
        assert len(want) > 1
        assert {v.value: v.mean for v in p.values} == pytest.approx(want, abs=1e-12)
        assert p.effect_pp == pytest.approx(100 * (max(want.values()) - min(want.values())))
        if p.ordered and all(isinstance(v, (int, float)) for v in want):
            means = [want[v] for v in sorted(want)]
            rising = all(a < b for a, b in zip(means, means[1:]))
            falling = all(a > b for a, b in zip(means, means[1:]))
            assert p.direction == ("up" if rising else "down" if falling else None)
    # Every swept parameter of every analysis has its pattern.
    for analysis in {r["analysis"] for r in ok}:
        mine = [r for r in ok if r["analysis"] == analysis]
        swept = {
            c
            for c in set().union(*mine)
            if (c.startswith("trace.") and c != "trace.kind")
            or c in ("batch_size", "policy", "strategies", "strategy", "cache_experts")
            if len({r.get(c) for r in mine if r.get(c) is not None}) > 1
        }
        assert {p.parameter for p in summary.patterns if p.analysis == analysis} == swept


# ---------------------------------------------------------------------- the hand-made table


def test_hand_table_numbers_against_brute_force() -> None:
    summary = summarize_sweep(HAND)
    check_summary_against_brute_force(summary, HAND)
    assert summary.totals.experiments == 27 + 8 + 2 and summary.totals.failed == 2
    analyze = {p.parameter: p for p in summary.patterns if p.analysis == "analyze"}
    assert set(analyze) == {"trace.locality", "trace.zipf", "batch_size"}  # experiments fixed
    # Exact values written out: locality adds 0.3 * locality to every row.
    base = statistics.fmean(0.1 * b / 4 + z for b in (1, 2, 4) for z in (0.0, 0.1, 0.05))
    got = {v.value: v.mean for v in analyze["trace.locality"].values}
    assert got == pytest.approx({0.0: base, 0.5: base + 0.15, 0.9: base + 0.27})
    assert analyze["trace.locality"].effect_pp == pytest.approx(27.0)


def test_trend_is_stated_only_where_monotone() -> None:
    summary = summarize_sweep(HAND)
    by = {(p.analysis, p.parameter): p for p in summary.patterns}
    locality, zipf = by[("analyze", "trace.locality")], by[("analyze", "trace.zipf")]
    assert locality.direction == "up" and "each larger value gave higher" in locality.sentence
    assert zipf.direction is None and zipf.trend == "not monotone"
    assert "each larger value" not in zipf.sentence and "not monotone" in zipf.sentence
    assert zipf.highest.value == 0.5 and zipf.lowest.value == 0.0
    capacity = by[("cache", "cache_experts")]
    assert capacity.ordered and capacity.direction == "up"  # 2k < 4k, by size
    assert by[("cache", "batch_size")].direction == "down"
    # Named values have no order: no trend is claimed for them.
    named = [p for p in summary.patterns if p.parameter in ("strategies", "strategy")]
    assert named and all(p.direction is None and not p.ordered for p in named)


def test_failed_rows_are_counted_and_listed_never_averaged() -> None:
    with_failures = summarize_sweep(HAND)
    without = summarize_sweep([r for r in HAND if r["error"] is None])
    assert with_failures.executive == without.executive
    assert with_failures.by_batch_size == without.by_batch_size
    assert with_failures.patterns == without.patterns
    assert [f.key for f in with_failures.failures] == ["f0", "f1"]
    assert all("top_k 8" in f.error for f in with_failures.failures)
    assert any("2 experiments failed" in r for r in with_failures.recommendations)
    assert not without.failures


def test_recommendations_come_from_the_numbers() -> None:
    summary = summarize_sweep(HAND)
    by_b = {b.batch_size: b.mean_memory_savings for b in summary.by_batch_size}
    text = " ".join(summary.recommendations)
    assert f"largest batch size tried (4) saved {100 * by_b[4]:.1f}%" in text
    assert f"against {100 * by_b[1]:.1f}% at 1" in text
    assert "locality is the strongest lever: +27.0 points of memory savings from 0 to 0.9" in text
    assert "zipf matters least: 10.0 points" in text  # 0.1 at 0.5 - 0 at 0
    # lru is the one strategy an engine can run; belady is the bound above it.
    lru_2k = statistics.fmean([0.4, 0.3])
    belady_2k = statistics.fmean([0.55, 0.45])
    assert (
        f"At cache_experts 2k, lru has the best average hit rate of the strategies an engine "
        f"can run ({100 * lru_2k:.1f}%); the belady bound reaches {100 * belady_2k:.1f}% "
        f"({100 * (belady_2k - lru_2k):.1f} points more)." in text
    )


def test_per_analysis_tables_and_facet_curves_against_brute_force() -> None:
    summary = summarize_sweep(HAND, curve_by="zipf")
    (cache,) = [t for t in summary.tables if t.title.startswith("Cache")]
    assert cache.header == ("Strategy", "2k", "4k")
    ok = [r for r in HAND if r["error"] is None and r["analysis"] == "cache"]
    for row in cache.rows:
        for capacity, cell in zip(cache.header[1:], row[1:]):
            rates = [
                r["hit_rate"]
                for r in ok
                if cache_strategy(r) == row[0] and r["cache_experts"] == capacity
            ]
            assert cell == f"{100 * statistics.fmean(rates):.1f}%"
    assert summary.curve_by == "trace.zipf"
    (panel,) = [p for p in summary.panels if p.analysis == "analyze"]
    assert panel.curve_by == "zipf" and [c.label for c in panel.curves] == [
        "zipf 0",
        "zipf 0.5",
        "zipf 1",
    ]
    analyze = [r for r in HAND if r["error"] is None and r["analysis"] == "analyze"]
    for curve, z in zip(panel.curves, (0.0, 0.5, 1.0)):
        assert curve.batch_sizes == (1, 2, 4)
        want = [
            statistics.fmean(
                r["memory_savings"]
                for r in analyze
                if r["trace.zipf"] == z and r["batch_size"] == b
            )
            for b in (1, 2, 4)
        ]
        assert list(curve.means) == pytest.approx(want, abs=1e-12)
    # The cache rows hold no zipf: their panel has one curve over every experiment.
    (cache_panel,) = [p for p in summary.panels if p.analysis == "cache"]
    assert cache_panel.curve_by is None and len(cache_panel.curves) == 1
    # Without --curve-by: the analyze parameter with the largest effect (locality).
    assert summarize_sweep(HAND).curve_by == "trace.locality"


def test_curve_by_must_name_a_parameter_of_the_rows() -> None:
    with pytest.raises(MoeprofError, match="curve_by 'colour' is not a parameter.*locality"):
        summarize_sweep(HAND, curve_by="colour")
    with pytest.raises(MoeprofError, match="x axis"):
        summarize_sweep(HAND, curve_by="batch_size")
    assert summarize_sweep(HAND, curve_by="trace.locality").curve_by == "trace.locality"
    with pytest.raises(MoeprofError, match="no sweep rows"):
        summarize_sweep([])


# ---------------------------------------------------------------------- a real tiny sweep

TINY = """
    name: tiny
    traces:
      - synth: {experts: [4, 8], top_k: 2, locality: [0.0, 0.5, 0.9], requests: 4, tokens: 12,
                layers: 2, seed: 3}
      - synth: {experts: 4, top_k: 8}
    analyses:
      - analyze: {batch_sizes: [1, 2, 8], policy: [tokens, decode]}
      - cache: {strategies: [lru, belady], cache_experts: [1, 2k], batch_sizes: [2]}
"""


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny")
    (tmp / "s.yaml").write_text(textwrap.dedent(TINY))
    run = run_sweep(load_sweep(tmp / "s.yaml"), tmp / "out", workers=1)
    assert run.failed > 0  # top_k 8 of 4 experts fails: its rows are stored with the error
    return tmp / "out"


def test_real_sweep_rows_against_brute_force(tiny_sweep: Path) -> None:
    rows = load_sweep_rows(tiny_sweep / "results.jsonl")
    summary = summarize_sweep(rows)
    check_summary_against_brute_force(summary, rows)
    assert summary.totals.experiments == 7 * (6 + 4)
    assert summary.totals.failed == 6 + 4
    policies = {p.parameter for p in summary.patterns if p.analysis == "analyze"}
    assert policies == {"trace.experts", "trace.locality", "policy", "batch_size"}


def test_a_rerun_row_replaces_the_earlier_one(tmp_path: Path, tiny_sweep: Path) -> None:
    lines = (tiny_sweep / "results.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    retried = first | {"memory_savings": 0.123}
    path = tmp_path / "results.jsonl"
    # A last line cut short by an interruption (no newline) is left out, as the resume does.
    path.write_text("\n".join([*lines, json.dumps(retried)]) + "\n" + '{"key": "cut')
    rows = load_sweep_rows(path)
    assert len(rows) == len(lines)
    assert next(r for r in rows if r["key"] == first["key"])["memory_savings"] == 0.123


# ---------------------------------------------------------------------- the command


def one_error_line(result) -> str:
    assert result.exit_code == 2, result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    return result.stderr


def test_report_command_on_a_sweep(tmp_path: Path, tiny_sweep: Path, run_cli) -> None:
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    result = run_cli(
        "report",
        tiny_sweep / "results.jsonl",
        "--markdown",
        md,
        "--plot",
        png,
        "--curve-by",
        "experts",
    )
    assert result.exit_code == 0, result.stderr
    assert png.read_bytes().startswith(PNG)
    text = md.read_text()
    summary = summarize_sweep(load_sweep_rows(tiny_sweep / "results.jsonl"), "experts")
    for b in summary.by_batch_size:
        assert f"| {b.batch_size} | {b.experiments} | {100 * b.mean_memory_savings:.1f}% |" in text
    for heading in ("## Executive Summary", "## Observed Patterns", "## Recommendations",
                    "## Failed experiments", "## Definitions", "](r.png)"):  # fmt: skip
        assert heading in text
    assert "Savings by batch size" in result.stdout and "Recommendations" in result.stdout
    # The folder names its results.jsonl too.
    again = run_cli("report", tiny_sweep)
    assert again.exit_code == 0 and "Executive Summary" in again.stdout


def test_report_refuses_corrupt_or_empty_rows(tmp_path: Path, tiny_sweep: Path, run_cli) -> None:
    lines = (tiny_sweep / "results.jsonl").read_text().splitlines()
    cases = {
        "corrupt.jsonl": "\n".join([lines[0], "{not json", lines[1]]) + "\n",
        "empty.jsonl": "",
        "blank.jsonl": "\n\n",
        "array.jsonl": "[1, 2]\n",
        "nokey.jsonl": json.dumps({"analysis": "analyze", "batch_size": 1}) + "\n",
        "binary.jsonl": "\udcff",
    }
    md = tmp_path / "out.md"
    for name, text in cases.items():
        path = tmp_path / name
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        err = one_error_line(run_cli("report", path, "--markdown", md))
        assert name in err, err
        assert not md.exists()
    assert ":2: not valid JSON" in one_error_line(run_cli("report", tmp_path / "corrupt.jsonl"))
    assert "not found" in one_error_line(run_cli("report", tmp_path / "missing.jsonl"))


def test_report_refuses_an_unknown_curve_by(tmp_path: Path, tiny_sweep: Path, run_cli) -> None:
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    err = one_error_line(
        run_cli("report", tiny_sweep, "--markdown", md, "--plot", png, "--curve-by", "colour")
    )
    assert "--curve-by 'colour' is not a parameter" in err and "locality" in err
    assert not md.exists() and not png.exists()
    err = one_error_line(run_cli("report", tiny_sweep, "--curve-by", "batch_size"))
    assert "x axis" in err


def test_curve_by_is_for_sweeps_only(tmp_path: Path, run_cli) -> None:
    trace = tmp_path / "t.moe"
    assert run_cli("synth", "-o", trace, "--experts", "8", "--top-k", "2").exit_code == 0
    results = tmp_path / "r.json"
    assert run_cli("analyze", trace, "--batch-sizes", "1,4", "--json", results).exit_code == 0
    err = one_error_line(run_cli("report", results, "--curve-by", "locality"))
    assert "sweep" in err
