"""`moeprof cache` on the command line, and the cache report (golden markdown)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, plan_rows

import moeprof
from moeprof.cache import simulate_cache
from moeprof.commands.cache import parse_memory
from moeprof.report import render_markdown
from moeprof.report.plot import render_plot
from moeprof.report.results import load_results

CACHE_DATA = DATA / "cache"
SMALL = DATA / "golden" / "small.moe"  # 4 layers x 8 experts, top-2, 352,321,536-byte experts


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    trace = moeprof.synthesize(
        n_experts=8,
        top_k=2,
        n_layers=3,
        n_requests=6,
        tokens_per_request=12,
        zipf=1.0,
        locality=0.3,
        seed=4,
        expert_bytes=[1000, 2000, 3000],
    )
    path = tmp_path / "t.moe"
    trace.save(path)
    return path


def test_capacity_spellings(run_cli, trace_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    res = run_cli(
        "cache",
        trace_file,
        "--cache-experts",
        "3,1k,25%,4k",
        "--batch-sizes",
        "2",
        "--json",
        out,
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(out.read_text())
    # top-2 of 8 experts: 1k = 2, 25% = 2, 4k = 8.
    assert doc["cache"]["capacities"] == [
        {"cache_experts": 2, "spelling": "1k = 25%"},
        {"cache_experts": 3, "spelling": "3"},
        {"cache_experts": 8, "spelling": "4k"},
    ]
    lru = [r for r in doc["results"] if r["strategy"] == "lru"]
    assert [(r["cache_experts"], r["cache_spelling"]) for r in lru] == [
        (2, "1k = 25%"),
        (3, "3"),
        (8, "4k"),
    ]


def test_gpu_memory_by_hand(run_cli, trace_file: Path, tmp_path: Path) -> None:
    trace = moeprof.load_trace(trace_file)
    sizes = (1000, 2000, 3000)
    ids = trace.expert_ids.tolist()
    widest = [0, 0, 0]
    for b in (1, 4):
        for rows in plan_rows(moeprof.plan_batches(trace, "decode", b)):
            for layer in range(3):
                distinct = {e for row in rows for e in ids[row][layer] if e != 8}
                widest[layer] = max(widest[layer], len(distinct))
    working = sum(w * s for w, s in zip(widest, sizes))
    memory = working + 5 * sum(sizes) + 123  # room for 5 retained experts in every layer
    out = tmp_path / "c.json"
    res = run_cli(
        "cache",
        trace_file,
        "--cache-experts",
        "1",
        "--batch-sizes",
        "1,4",
        "--gpu-memory",
        str(memory),
        "--link-gbps",
        "25",
        "--json",
        out,
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(out.read_text())
    assert doc["cache"]["gpu_memory"]["cache_experts"] == 5
    assert doc["cache"]["gpu_memory"]["working_set_bytes"] == working
    assert {c["cache_experts"] for c in doc["cache"]["capacities"]} == {1, 5}
    row = next(r for r in doc["results"] if r["strategy"] == "lru" and r["cache_experts"] == 5)
    assert row["cache_spelling"] == str(memory)
    seconds = row["bytes_per_token"] / 25e9
    assert row["link_seconds_per_token"] == pytest.approx(seconds)
    assert row["link_tokens_per_second"] == pytest.approx(1 / seconds)
    # One byte short of one batch's working set: refused, saying how much it would take.
    out2 = tmp_path / "d.json"
    res = run_cli(
        "cache",
        trace_file,
        "--batch-sizes",
        "1,4",
        "--gpu-memory",
        str(working - 1),
        "--json",
        out2,
    )
    assert res.exit_code == 2
    assert (
        "cannot hold one batch's working set" in res.stderr and f"{working:,} bytes" in res.stderr
    )
    assert len(res.stderr.strip().splitlines()) == 1 and not out2.exists()


@pytest.mark.parametrize(
    ("text", "want"),
    [("24GiB", 24 * 2**30), ("80 GB", 80 * 10**9), ("512", 512), ("1.5MiB", 3 * 2**19)],
)
def test_memory_units(text: str, want: int) -> None:
    assert parse_memory(text) == want


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategies", "lru,nope"], "unknown strategy 'nope'"),
        (["--strategies", "lru,replicated"], "unknown strategy"),
        (["--cache-experts", "-2"], "must be 0 or more"),
        (["--cache-experts", "two"], "is not a cache size"),
        (["--cache-experts", "1.5k"], "is not a cache size"),
        (["--cache-experts", "150%"], "at most 100%"),
        (["--gpu-memory", "lots"], "is not a memory size"),
        (["--gpu-memory", "24 GiBs"], "is not a memory size"),
        (["--gpu-memory", "0"], "must be more than 0"),
        (["--budget", "pooled"], "--budget must be one of"),
        (["--count", "tokens"], "--count must be one of"),
        (["--phase", "prefill"], "no phases"),
        (["--link-gbps", "0"], "--link-gbps must be a positive number"),
        (["--batch-sizes", "0"], "batch size must be at least 1"),
    ],
)
def test_bad_input_one_line_exit_2(
    run_cli, trace_file: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out, md = tmp_path / "x.json", tmp_path / "x.md"
    res = run_cli("cache", trace_file, *args, "--json", out, "--markdown", md)
    assert res.exit_code == 2, res.stdout
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and not md.exists()


def test_gpu_memory_needs_expert_sizes(run_cli, tmp_path: Path) -> None:
    trace = moeprof.synthesize(n_experts=8, top_k=2, n_layers=2, n_requests=2, expert_bytes=None)
    path = tmp_path / "u.moe"
    trace.save(path)
    out = tmp_path / "u.json"
    res = run_cli("cache", path, "--gpu-memory", "1GiB", "--json", out)
    assert res.exit_code == 2 and "expert sizes" in res.stderr and not out.exists()


def test_outputs_and_report_command(run_cli, trace_file: Path, tmp_path: Path) -> None:
    out, md, png = tmp_path / "c.json", tmp_path / "c.md", tmp_path / "c.png"
    res = run_cli("cache", trace_file, "--json", out, "--markdown", md, "--plot", png)
    assert res.exit_code == 0, res.stderr
    assert "Belady − LRU gap" in res.stdout and "Recommendations" in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert md.read_text() == render_markdown(load_results(out), title="moeprof cache report")
    again = run_cli("report", out, "--layers")
    assert again.exit_code == 0, again.stderr
    assert "Working set per batch" in again.stdout
    # Outputs are not overwritten without --force.
    res = run_cli("cache", trace_file, "--json", out)
    assert res.exit_code == 2 and "--force" in res.stderr


def _golden_doc() -> dict:
    trace = moeprof.load_trace(SMALL)
    result = simulate_cache(
        trace,
        ("naive", "dedup", "lru", "lfu", "static", "belady"),
        [0, 2, 4, 8],
        [1, 8],
        "decode",
        capacity_spellings={2: "1k", 4: "2k", 8: "4k"},
        link_gbps=25,
    )
    doc = result.to_dict()
    doc["moeprof_version"] = "golden"
    return doc


def test_golden_document_and_markdown() -> None:
    doc = _golden_doc()
    golden_json, golden_md = CACHE_DATA / "small.cache.json", CACHE_DATA / "small.cache.md"
    if os.environ.get("MOEPROF_UPDATE_GOLDEN"):
        golden_json.write_text(json.dumps(doc, indent=2) + "\n")
        golden_md.write_text(render_markdown(doc, title="moeprof cache report"))
    checked_in = load_results(golden_json)
    assert json.loads(json.dumps(doc)) == checked_in, "MOEPROF_UPDATE_GOLDEN=1 after a change"
    assert render_markdown(checked_in, title="moeprof cache report") == golden_md.read_text()
    assert render_plot(checked_in)[:4] == b"\x89PNG"


def test_golden_numbers_by_hand() -> None:
    """A few cells of the golden report, recomputed from the trace with sets."""
    doc = load_results(CACHE_DATA / "small.cache.json")
    trace = moeprof.load_trace(SMALL)
    ids = trace.expert_ids.tolist()
    plan = moeprof.plan_batches(trace, "decode", 8)
    unique = sum(
        len({e for row in rows for e in ids[row][layer]})
        for rows in plan_rows(plan)
        for layer in range(trace.n_layers)
    )
    dedup = next(r for r in doc["results"] if r["strategy"] == "dedup" and r["batch_size"] == 8)
    assert dedup["loads"] == unique
    assert dedup["bytes_per_token"] == pytest.approx(unique * 352321536 / trace.n_tokens)
    text = (CACHE_DATA / "small.cache.md").read_text()
    lru = next(
        r
        for r in doc["results"]
        if r["strategy"] == "lru" and r["batch_size"] == 8 and r["cache_experts"] == 2
    )
    assert f"| 2 (1k) | lru | {100 * lru['hit_rate']:.1f}% | {lru['loads']:,} |" in text
    assert not math.isnan(lru["hit_rate"]) and np.isfinite(lru["bytes_per_token"])


def test_cli_prefetch_section_is_the_library_score_and_is_rendered(
    run_cli, trace_file: Path, tmp_path: Path
) -> None:
    from moeprof.prefetch import score_prefetch

    out = tmp_path / "c.json"
    md = tmp_path / "c.md"
    res = run_cli(
        "cache", trace_file, "-s", "lru,belady", "-C", "0,2", "-b", "1,4",
        "--prefetch", "popular,prev-token", "--prefetch-experts", "3",
        "--json", out, "--markdown", md,
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    doc = json.loads(out.read_text())
    want = score_prefetch(
        moeprof.load_trace(trace_file),
        ["popular", "prev-token"],
        3,
        batch_sizes=[1, 4],
        policy="decode",
        strategies=["lru", "belady"],
        cache_experts=[0, 2],
    ).to_dict()
    assert doc["prefetch"] == json.loads(json.dumps(want))
    # 2 batch sizes x 2 predictors x 2 strategies x 2 capacities, each shown in the report.
    assert len(doc["prefetch"]["rows"]) == 16
    text = md.read_text()
    assert "## Prefetch" in text and "| 4 | prev-token | belady C=2 |" in text
    assert "first half of the batches" in text
    assert load_results(out)["prefetch"]["prefetch_experts"] == 3  # the report reads it back


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prefetch", "next-token"], "unknown prefetch predictor 'next-token'"),
        (["--prefetch", "popular", "--prefetch-experts", "0"], "--prefetch-experts must be 1"),
        (["--train", "x.moe"], "--prefetch-experts and --train go with --prefetch"),
        (["--prefetch", "popular", "--budget", "global"], "leave out --budget global"),
    ],
)
def test_cli_prefetch_refusals(
    run_cli, trace_file: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "c.json"
    res = run_cli("cache", trace_file, *args, "--json", out)
    assert res.exit_code == 2 and message in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and not out.exists()
