"""`moeprof schedule` on the command line: outputs, the report command, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_schedule import topic_trace

from moeprof.errors import MoeprofError
from moeprof.report import render_markdown
from moeprof.report.results import load_results, validate_results
from moeprof.schedule import schedule
from moeprof.trace import load_trace


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "t.moe"
    topic_trace(n_requests=40, seed=7).save(path)
    return path


def test_outputs_are_the_library_result_and_render(
    run_cli, trace_file: Path, tmp_path: Path
) -> None:
    out, md, png = tmp_path / "s.json", tmp_path / "s.md", tmp_path / "s.png"
    res = run_cli(
        "schedule",
        trace_file,
        "-b",
        "4,8",
        "-a",
        "fifo,affinity,oracle,group,group-oracle",
        "--cache",
        "lru:4",
        "--max-wait",
        "50",
        "--json",
        out,
        "--markdown",
        md,
        "--plot",
        png,
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(out.read_text())
    assert doc["kind"] == "schedule" and validate_results(doc) is doc
    want = schedule(
        load_trace(trace_file),
        [4, 8],
        ["fifo", "affinity", "oracle", "group", "group-oracle"],
        cache=("lru", 4),
        max_wait=50,
    ).to_dict()
    timing = ("schedule_seconds", "decision_seconds")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in doc["results"]]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in want["results"]]
    assert doc["schedule"]["cache"] == {"strategy": "lru", "cache_experts": 4}
    assert "expert loads per generated token" in res.stdout and "Findings" in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert md.read_text() == render_markdown(load_results(out), title="moeprof schedule report")
    assert "## B = 8 running requests" in md.read_text()
    again = run_cli("report", out)
    assert again.exit_code == 0, again.stderr
    assert "B = 4: waiting (steps)" in again.stdout
    res = run_cli("schedule", trace_file, "--json", out)
    assert res.exit_code == 2 and "--force" in res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-b", "0"], "batch size must be at least 1"),
        (["-b", "-3"], "batch size must be at least 1"),
        (["--max-tokens-per-step", "0"], "--max-tokens-per-step must be at least 1"),
        (["-a", "fifo,smart"], "unknown admission policy 'smart'"),
        (["--arrival-rate", "-0.5"], "--arrival-rate must be a positive number"),
        (["--max-wait", "-1"], "--max-wait must be a whole number of steps"),
        (["--cache", "lru"], "is not STRATEGY:EXPERTS"),
        (["--cache", "naive:4"], "keeps no cache"),
        (["-a", "group", "--arrival-rate", "1"], "grouping plans a fixed pool"),
        (["--seed", "-1", "-a", "random"], "seed must be a whole number, 0 or more"),
        (["--seed", "-1", "--arrival-rate", "1"], "seed must be a whole number, 0 or more"),
        (["--cache", "lru:99999999999999999999"], "at most 2,147,483,647 experts per layer"),
        (["--arrival-rate", "1e-300"], "--arrival-rate 1e-300 is too small"),
    ],
)
def test_bad_input_one_line_exit_2(
    run_cli, trace_file: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out, md = tmp_path / "x.json", tmp_path / "x.md"
    res = run_cli("schedule", trace_file, *args, "--json", out, "--markdown", md)
    assert res.exit_code == 2, res.stdout
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and not md.exists()


def test_a_bad_schedule_document_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"kind": "schedule", "trace": {}, "results": [{"admission": 3}]}))
    with pytest.raises(MoeprofError, match=r"results\[0\] lacks"):
        load_results(path)


def test_a_belady_cache_is_called_a_bound(run_cli, trace_file: Path) -> None:
    res = run_cli("schedule", trace_file, "-b", "2", "-a", "fifo", "--cache", "belady:2")
    assert res.exit_code == 0, res.stderr
    assert "its cache columns are a bound" in " ".join(res.stdout.split())
    res = run_cli("schedule", trace_file, "-b", "2", "-a", "fifo", "--cache", "lru:2")
    assert "its cache columns are a bound" not in " ".join(res.stdout.split())
