"""Reports: golden markdown, and every number in the tables traced back to the analysis."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import DATA

import moeprof
from moeprof.formatting import human_bytes, pct
from moeprof.report import build_report, render_markdown
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


def test_recorded_policy_report_speaks_of_recorded_batches() -> None:
    import numpy as np

    # Steps: 3 tokens, then 1, then 2; batch 0 shares expert 0 in every token.
    ids = np.array([[[0, 1]], [[0, 2]], [[0, 3]], [[4, 5]], [[1, 2]], [[1, 3]]])
    trace = moeprof.Trace.from_arrays(
        ids,
        n_experts=8,
        request_ids=[0, 1, 2, 0, 1, 2],
        positions=[0, 0, 0, 1, 1, 1],
        steps=[0, 0, 0, 1, 2, 2],
        expert_bytes=1000,
    )
    doc = moeprof.analyze(trace, [1], policy="recorded").to_dict()
    row = doc["results"][0]
    assert row["batch_size"] == 3 and row["n_batches"] == 3
    text = render_markdown(doc)
    assert "the recorded batches (3 batches of up to 3 tokens)" in text
    assert "| ≤ 3 |" in text and "| Layer | recorded |" in text
    assert "smallest analysed batch size" not in text
    assert "at B = 3" not in text
    # The uniform figure quoted is the row's own (batches of 3, 1 and 2 tokens), not B = 3 for all.
    want = 8 * (1 - 0.75**3) + 8 * (1 - 0.75**1) + 8 * (1 - 0.75**2)
    assert row["uniform_unique"] == pytest.approx(want)
    assert f"that is {want:,.1f} distinct experts for 12 requests" in text


def test_partly_known_expert_sizes_report() -> None:
    import numpy as np

    ids = np.array([[[0], [0]], [[0], [1]]])
    trace = moeprof.Trace.from_arrays(ids, n_experts=2, expert_bytes=[100, 0])
    doc = moeprof.analyze(trace, [2]).to_dict()
    text = render_markdown(doc)
    assert "Routed expert size:** unknown for 1 of 2 MoE layers" in text
    assert "lacks the expert size of MoE layer(s) 1" in text
    assert "B saved" not in text and "bytes;" not in text
    model = build_report(doc)
    assert not model.summary.expert_bytes_known


def test_layer_without_routing_shows_a_dash_and_is_not_averaged() -> None:
    import numpy as np

    ids = np.array([[[0], [2]], [[0], [2]], [[1], [2]], [[1], [2]]])
    doc = moeprof.analyze(moeprof.Trace.from_arrays(ids, n_experts=2), [4]).to_dict()
    model = build_report(doc)
    assert model.layer_rows[1][1] == (None,)
    assert model.summary.average_reuse_factor == pytest.approx(0.5)
    text = render_markdown(doc)
    assert "| 1 | — |" in text
    assert "Layers differ" not in text and "Layers behave alike" not in text


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("results", 0, "requests"), "12", "requests has the wrong type"),
        (("results", 0, "memory_savings"), None, "memory_savings has the wrong type"),
        (("results", 0, "batch_size"), True, "batch_size has the wrong type"),
        (("results", 0, "layers"), {}, "layers has the wrong type"),
        (("results", 0, "layers", 0), 3, "is not an object"),
        (("results", 0, "layers", 0, "memory_savings"), "x", "memory_savings has the wrong type"),
        (("results", 0, "uniform_memory_savings"), float("nan"), "wrong type"),
        (("results", 1, "policy"), "decode", "mix batching policies"),
        (("trace", "expert_bytes"), [1.5], "expert_bytes has the wrong type"),
        (("trace", "model"), "m", "model has the wrong type"),
        (("results", 0, "memory_savings"), 10**400, "memory_savings has the wrong type"),
        (("results", 0, "bytes_requested"), 2**64, "bytes_requested has the wrong type"),
        (("trace", "expert_bytes"), [10**400], "expert_bytes has the wrong type"),
        (("results", 0, "layers", 1, "layer"), 0, "lists layer 0 twice"),
    ],
)
def test_results_with_wrong_types_are_refused(path: tuple, value: object, message: str) -> None:
    from moeprof.errors import MoeprofError

    doc = golden_doc()
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(MoeprofError, match=message):
        render_markdown(doc)


def test_report_cli_refuses_wrong_types(tmp_path: Path, run_cli) -> None:
    doc = golden_doc()
    doc["results"][0]["bytes_requested"] = "lots"
    src = tmp_path / "r.json"
    src.write_text(json.dumps(doc))
    out = tmp_path / "r.md"
    result = run_cli("report", src, "--markdown", out)
    assert result.exit_code == 2 and "bytes_requested has the wrong type" in result.stderr
    assert result.stderr.count("\n") == 1 and not out.exists()


def test_report_refuses_unparseable_json(tmp_path: Path, run_cli) -> None:
    for name, text in {"deep": "[" * 100_000 + "]" * 100_000, "long": "9" * 5000}.items():
        src = tmp_path / f"{name}.json"
        src.write_text(text)
        result = run_cli("report", src)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, name
