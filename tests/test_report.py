"""Reports: golden markdown, and every number in the tables traced back to the analysis."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import DATA

import moeprof
from moeprof.report import build_report, render_markdown
from moeprof.report.model import human_bytes, pct
from moeprof.report.plot import render_plot
from moeprof.report.terminal import render_terminal

GOLDEN = DATA / "golden"
SIZES = [1, 2, 4, 8, 16, 32]


def golden_doc() -> dict:
    doc = moeprof.analyze(moeprof.load_trace(GOLDEN / "small.moe"), SIZES).to_dict()
    doc["moeprof_version"] = "golden"
    return doc


def test_markdown_matches_golden() -> None:
    text = render_markdown(golden_doc())
    golden = GOLDEN / "report.md"
    if os.environ.get("MOEPROF_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), "run with MOEPROF_UPDATE_GOLDEN=1 after an intended change"


def test_results_json_matches_golden() -> None:
    doc = golden_doc()
    golden = GOLDEN / "results.json"
    if os.environ.get("MOEPROF_UPDATE_GOLDEN"):
        golden.write_text(json.dumps(doc, indent=2) + "\n")
    want = json.loads(golden.read_text())
    assert [r["unique"] for r in doc["results"]] == [r["unique"] for r in want["results"]]
    for got_row, want_row in zip(doc["results"], want["results"]):
        for key in ("memory_savings", "bandwidth_savings", "uniform_memory_savings"):
            assert got_row[key] == pytest.approx(want_row[key], rel=1e-12)


def test_report_numbers_come_from_the_results() -> None:
    doc = golden_doc()
    model = build_report(doc)
    rows = doc["results"]
    best = max(rows, key=lambda r: r["memory_savings"])
    assert model.summary.best_memory.batch_size == best["batch_size"]
    all_layers = [layer["memory_savings"] for r in rows for layer in r["layers"]]
    assert model.summary.average_reuse_factor == pytest.approx(sum(all_layers) / len(all_layers))
    text = render_markdown(doc)
    for r in rows:
        line = next(x for x in text.splitlines() if x.startswith(f"| {r['batch_size']} |"))
        assert pct(r["memory_savings"]) in line
        assert pct(r["uniform_memory_savings"]) in line
        assert human_bytes(r["bytes_requested"] - r["bytes_unique"]) in line
    # Smallest batch size reaching 50%, computed independently.
    first_half = next(r["batch_size"] for r in rows if r["memory_savings"] >= 0.5)
    assert f"Batch size {first_half} is the smallest" in text


def test_recommendation_when_no_batch_reaches_half() -> None:
    trace = moeprof.synthesize(n_experts=64, top_k=2, n_layers=2, seed=0)
    text = render_markdown(moeprof.analyze(trace, [1, 2]).to_dict())
    assert "No analysed batch size reaches 50%" in text
    assert "about as much reuse as uniform" in text or "uniform random routing" in text


def test_locality_recommendation() -> None:
    trace = moeprof.synthesize(
        n_experts=32,
        top_k=2,
        n_layers=2,
        n_requests=4,
        tokens_per_request=500,
        locality=0.8,
        seed=0,
    )
    text = render_markdown(moeprof.analyze(trace, [1, 8, 32]).to_dict())
    assert "more reuse than uniform random routing" in text


def test_terminal_and_plot_render() -> None:
    from rich.console import Console

    doc = golden_doc()
    console = Console(width=100, record=True)
    console.print(render_terminal(doc, layers=True))
    out = console.export_text()
    for r in doc["results"]:
        assert pct(r["memory_savings"]) in out
    assert "Savings per Layer" in out
    png = render_plot(doc)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_unknown_expert_bytes_report(tmp_path: Path) -> None:
    import numpy as np

    trace = moeprof.Trace.from_arrays(np.array([[[0, 1]], [[1, 2]]]), n_experts=4)
    text = render_markdown(moeprof.analyze(trace, [1, 2]).to_dict())
    assert "Routed expert size:** unknown" in text
    assert "does not record expert sizes" in text
