"""Rendering replay results: the results JSON's measured fields, markdown and terminal tables,
and the comparison with the baseline strategy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import strategy_entry

import moeprof
from moeprof.analyze import analyze
from moeprof.replay import replay
from moeprof.replay.results import compare_with_naive
from moeprof.report.markdown import replay_markdown
from moeprof.report.rows import replay_rows
from moeprof.report.terminal import replay_renderables

CAL = 1 << 20  # small calibration copy: tests check logic, not memory bandwidth


def test_results_json_and_markdown(tmp_path: Path) -> None:
    trace = moeprof.synthesize(n_layers=2, n_requests=4, tokens_per_request=16, zipf=1.0, seed=1)
    result = replay(
        trace,
        device="cpu",
        batch_sizes=[2, 8],
        expert_bytes=4096,
        calibration_bytes=CAL,
        compute=True,
        hidden_size=16,
    )
    doc = result.to_dict()
    json.loads(json.dumps(doc))
    info = doc["replay"]
    assert info["ran_on_cpu"] is True and "CPU" in info["note"]
    assert info["measurement_method"] == "counted_only"
    assert info["peak_h2d_gbps"] > 0 and info["calibration"]["bytes"] == CAL
    for row in doc["results"]:
        for s in row["replay"]["strategies"]:
            assert s["seconds"] > 0
            assert s["gbps"] == pytest.approx(s["bytes_copied"] / s["seconds"] / 1e9)
            assert s["share_of_peak"] == pytest.approx(s["gbps"] / info["peak_h2d_gbps"])
            assert s["nvml_rx_bytes"] is None and s["nvml_tx_bytes"] is None
            assert "CPU backend" in s["nvml_reason"]
            assert s["batch_latency"]["batches"] == row["n_batches"]
            assert 0 < s["issue_seconds"] <= s["wall_seconds"] and s["host_bound"] is None
            full = trace.expert_bytes[0]
            assert s["projected_seconds_full_size"] == pytest.approx(
                s["copies"] * full / (s["gbps"] * 1e9)
            )
    text = replay_markdown(doc)
    assert text.startswith("## Replay (measured)")
    assert "Ran on the CPU" in text and "Per-batch latency" in text
    header, rows = replay_rows(doc)
    assert len(rows) == 2 * 3
    dedup8 = strategy_entry(doc["results"][1], "dedup")
    row = next(r for r in rows if r[0] == "8" and r[1] == "dedup")
    assert row[header.index("Copies")] == f"{dedup8['copies']:,}"
    assert len(replay_renderables(doc)) == 4
    assert replay_markdown({"results": [], "trace": {}}) == ""


def _run(
    strategy_name: str, nbytes: int, seconds: float, rx: int | None, host_bound: bool | None = None
) -> Any:
    from moeprof.nvml import PcieMeasurement
    from moeprof.replay.results import StrategyRun

    pcie = PcieMeasurement(
        "nvml_counters" if rx is not None else "counted_only",
        rx,
        None if rx is None else 1000,
        None,
        seconds,
        2,
    )
    return StrategyRun(
        strategy_name,
        8,
        10,
        nbytes // 100,
        nbytes // 100,
        "x",
        (nbytes // 100,),
        0,
        nbytes,
        nbytes,
        seconds,
        seconds,
        50.0,
        pcie,
        host_bound=host_bound,
    )


def test_compare_with_naive() -> None:
    naive = _run("naive", 1000_00, 2.0, 105_000)
    dedup = _run("dedup", 250_00, 0.52, 26_500)  # counted cost 0.25, NVML 26.5/105 = 0.2524
    cmp = compare_with_naive(dedup, naive)
    assert cmp["counted_savings"] == pytest.approx(0.75)
    assert cmp["measured_savings_nvml"] == pytest.approx(1 - 26_500 / 105_000)
    assert cmp["measured_savings_seconds"] == pytest.approx(1 - 0.52 / 2.0)
    assert cmp["basis"] == "nvml_rx_bytes" and cmp["agrees_within_10pct"] is True
    slow = _run("dedup", 250_00, 1.0, None)  # time says cost 0.5 vs counted 0.25
    cmp = compare_with_naive(slow, _run("naive", 1000_00, 2.0, None))
    assert cmp["basis"] == "seconds" and cmp["agrees_within_10pct"] is False
    assert compare_with_naive(dedup, None)["reason"].startswith("naive was not")
    assert compare_with_naive(naive, naive)["reason"] == "baseline"
    # Markdown of NVML-measured runs shows the RX ratio.
    assert dedup.measured_to_counted == pytest.approx(26_500 / 25_000)


def test_markdown_of_nvml_measured_runs() -> None:
    from moeprof.replay.results import ReplayResult

    trace = moeprof.synthesize(n_layers=1, n_requests=2, tokens_per_request=8, seed=0)
    analysis = analyze(trace, [8])
    runs = (_run("naive", 1000_00, 2.0, 106_000), _run("dedup", 250_00, 0.52, 26_500))
    info = {
        "device": "cuda:0",
        "device_name": "NVIDIA H200",
        "ran_on_cpu": False,
        "peak_h2d_gbps": 50.0,
        "measurement_method": "nvml_counters",
        "layers": [0],
        "strategies": ["naive", "dedup"],
        "policy": "tokens",
        "link": {"pcie_gen_max": 5, "pcie_width_max": 16},
        "counter_check": {
            "bytes_copied": 6 << 30,
            "nvml_rx_bytes": 6_500_000_000,
            "rx_to_copied": 6_500_000_000 / (6 << 30),
            "reason": None,
        },
    }
    doc = ReplayResult(analysis, runs, info).to_dict()
    text = replay_markdown(doc)
    assert "NVIDIA H200" in text and "Gen5 x16" in text and "byte counters" in text
    assert "the calibration's 6.00 GiB showed as 6.05 GiB RX (1.009x)" in text
    header, rows = replay_rows(doc)
    naive_row, dedup_row = rows
    assert naive_row[header.index("RX / counted")] == "1.060x"
    assert dedup_row[header.index("RX / counted")] == "1.060x"
    assert dedup_row[header.index("Counted savings")] == "75.0%"
    assert dedup_row[header.index("Measured savings")] == "75.0% NVML"
    assert dedup_row[header.index("Agree (±10%)")] == "yes"
    assert "Ran on the CPU" not in text and "Host-bound" not in text
    # A run whose copies Python could not queue fast enough is named as host-bound.
    runs = (_run("naive", 1000_00, 2.0, 106_000), _run("dedup", 250_00, 0.52, 26_500, True))
    text = replay_markdown(ReplayResult(analysis, runs, info).to_dict())
    assert "**Host-bound runs** (dedup B=8)" in text


@pytest.mark.parametrize(
    ("strategies", "note"),
    [
        (["naive", "dedup", "lru"], ", LRU cache of 3 experts per layer."),
        (["naive", "dedup"], "policy tokens."),
        (
            ["lru", "lfu", "belady"],
            ", LRU, LFU and Belady caches of 3 experts per layer.",
        ),  # no strategy keeps experts: no cache named
    ],
)
def test_replay_notes_name_the_caches_the_registry_knows(strategies: list[str], note: str) -> None:
    from moeprof.report.rows import replay_notes

    info = {"layers": [0, 1], "policy": "tokens", "strategies": strategies, "cache_experts": 3}
    line = next(n for n in replay_notes({"replay": info}) if n.startswith("Replayed MoE layers"))
    assert line.endswith(note), line
