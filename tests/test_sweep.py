"""Sweeps (docs/sweep.md): expansion, stored rows against direct and brute-force computation,
resume, failures, the process pool, and bad sweep files at the command line."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import reference_loads

from moeprof import MoeprofError, analyze, simulate_cache, synthesize
from moeprof.sweep import load_sweep, parse_sweep, run_sweep

TRACES = Path(__file__).resolve().parent.parent / "traces"
TIMING = ("trace_seconds", "analysis_seconds")


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def parse(text: str) -> list:
    return list(parse_sweep(textwrap.dedent(text), Path("s.yaml")).experiments)


def jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING}


SMALL = """
    name: small
    traces:
      - synth: {experts: [4, 8], top_k: 2, locality: [0.0, 0.7], requests: 3, tokens: 10,
                layers: 2, seed: 5}
    analyses:
      - analyze: {batch_sizes: [1, 4, 64], policy: tokens}
      - cache: {strategy: [lru, belady], cache_experts: [1, 1k], batch_sizes: [2], policy: tokens}
"""


# ---------------------------------------------------------------------- expansion


def test_product_scalars_and_batch_sizes() -> None:
    exps = parse(SMALL)
    # 2 x 2 traces x (3 analyze batch sizes + 2 strategies x 2 capacities x 1 batch size)
    assert len(exps) == 4 * (3 + 4)
    combos = {(dict(e.source.params)["experts"], dict(e.source.params)["locality"]) for e in exps}
    assert combos == {(4, 0.0), (4, 0.7), (8, 0.0), (8, 0.7)}
    assert all(dict(e.source.params)["top_k"] == 2 for e in exps)  # a scalar is fixed
    cache = [e for e in exps if e.analysis == "cache"]
    got = sorted(
        (dict(e.settings)["strategy"], str(dict(e.settings)["cache_experts"])) for e in cache
    )
    want = sorted((s, c) for s in ("lru", "belady") for c in ("1", "1k")) * 4
    assert got == sorted(want)
    assert all(dict(e.settings)["budget"] == "per-layer" for e in cache)  # defaults filled in
    assert len({e.key for e in exps}) == len(exps)


def test_link_zips_axes_and_repeats_step_the_seed() -> None:
    exps = parse("""
        name: linked
        repeats: 3
        traces:
          - synth: {experts: [8, 16, 32], top_k: [1, 2, 4], link: [[experts, top_k]],
                    zipf: [0.0, 1.0], requests: 2, tokens: 4, layers: 1, seed: 10}
        analyses:
          - analyze: {batch_sizes: 2}
    """)
    params = [dict(e.source.params) for e in exps]
    assert len(exps) == 3 * 2 * 3  # 3 linked pairs x 2 zipf x 3 repeats, one batch size
    assert {(p["experts"], p["top_k"]) for p in params} == {(8, 1), (16, 2), (32, 4)}
    assert sorted({(p["seed"], e.source.repeat) for p, e in zip(params, exps)}) == [
        (10, 0),
        (11, 1),
        (12, 2),
    ]


def test_keys_are_stable_and_name_files_by_content(tmp_path: Path) -> None:
    assert [e.key for e in parse(SMALL)] == [e.key for e in parse(SMALL)]
    a = tmp_path / "a"
    b = tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        shutil.copy(TRACES / "mixtral-like.moe", folder / "t.moe")
    text = "name: f\ntraces: [{path: %s/t.moe}]\nanalyses: [{analyze: {batch_sizes: 4}}]\n"
    key_a = load_sweep(write(tmp_path, text % "a")).experiments[0].key
    key_b = load_sweep(write(tmp_path, text % "b")).experiments[0].key
    assert key_a == key_b  # the same file reached from another folder
    (b / "t.moe").write_bytes(b"changed")
    assert load_sweep(write(tmp_path, text % "b")).experiments[0].key != key_a


# ---------------------------------------------------------------------- rows


def brute_memory_savings(ids: np.ndarray, batch: int) -> float:
    """1 - distinct experts / requests, summed over consecutive token groups and layers."""
    unique = requests = 0
    for start in range(0, ids.shape[0], batch):
        for layer in range(ids.shape[1]):
            chosen = ids[start : start + batch, layer, :].ravel().tolist()
            unique += len(set(chosen))
            requests += len(chosen)
    return 1 - unique / requests


def test_rows_equal_the_analyses_run_directly(tmp_path: Path) -> None:
    sweep = parse_sweep(textwrap.dedent(SMALL), tmp_path / "s.yaml")
    run = run_sweep(sweep, tmp_path / "out", workers=1)
    assert (run.total, run.ran, run.failed, run.skipped) == (28, 28, 0, 0)
    for row in jsonl(tmp_path / "out"):
        trace = synthesize(n_experts=row["trace.experts"], top_k=2, n_layers=2, n_requests=3,
                           tokens_per_request=10, locality=row["trace.locality"], seed=5)  # fmt: skip
        b = row["batch_size"]
        if row["analysis"] == "analyze":
            (direct,) = analyze(trace, [b], policy="tokens").results
            for name in ("memory_savings", "bandwidth_savings", "max_reuse_factor", "unique"):
                assert row[name] == getattr(direct, name)
            assert row["memory_savings"] == pytest.approx(brute_memory_savings(trace.expert_ids, b))
        else:
            c = 2 if row["cache_experts"] == "1k" else row["cache_experts"]
            assert row["cache_experts_resolved"] == c
            result = simulate_cache(trace, [row["strategy"]], [c], [b], "tokens")
            (direct,) = [r for r in result.rows if r.strategy == row["strategy"]]
            assert (row["loads"], row["hit_rate"]) == (direct.loads, direct.hit_rate)
            if row["strategy"] == "lru":
                batches = [list(range(s, min(s + b, trace.n_tokens))) for s in range(0, 30, b)]
                loads = sum(
                    copied
                    for layer in range(2)
                    for items in reference_loads(trace, batches, "lru", layer, c)
                    for _, copied, _ in items
                )
                assert row["loads"] == loads
    table = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    stored = [without_timing({k: r.get(k) for k in table[0]}) for r in jsonl(tmp_path / "out")]
    for row in stored:  # spelled both ways (1 and '1k'): text in the table
        if row["cache_experts"] is not None:
            row["cache_experts"] = str(row["cache_experts"])
    assert [without_timing(r) for r in table] == stored


def test_pool_gives_the_rows_of_one_process(tmp_path: Path) -> None:
    sweep = parse_sweep(textwrap.dedent(SMALL), tmp_path / "s.yaml")
    run_sweep(sweep, tmp_path / "one", workers=1)
    run_sweep(sweep, tmp_path / "two", workers=2)
    one = sorted(map(without_timing, jsonl(tmp_path / "one")), key=lambda r: r["key"])
    two = sorted(map(without_timing, jsonl(tmp_path / "two")), key=lambda r: r["key"])
    assert one == two


# ---------------------------------------------------------------------- resume and failures


def test_resume_runs_nothing_twice(tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = write(tmp_path, SMALL)
    run_sweep(load_sweep(path), out, workers=1)
    again = run_sweep(load_sweep(path), out, workers=1)
    assert (again.ran, again.skipped) == (0, 28)
    assert len(jsonl(out)) == 28
    write(tmp_path, SMALL.replace("[1, 4, 64]", "[1, 4, 64, 8]"))
    more = run_sweep(load_sweep(path), out, workers=1)
    assert (more.ran, more.skipped, len(more.rows)) == (4, 28, 32)
    keys = [r["key"] for r in jsonl(out)]
    assert len(keys) == len(set(keys)) == 32


def test_interrupted_sweep_keeps_finished_rows(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sweep = parse_sweep(textwrap.dedent(SMALL), tmp_path / "s.yaml")

    def stop_after_first_trace(done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, out, workers=1, on_progress=stop_after_first_trace)
    kept = jsonl(out)
    assert len(kept) == 7  # one trace's experiments
    assert len(pq.read_table(out / "results.parquet")) == 7
    rest = run_sweep(sweep, out, workers=1)
    assert (rest.ran, rest.skipped) == (21, 7)
    assert len({r["key"] for r in jsonl(out)}) == len(jsonl(out)) == 28


def test_a_broken_experiment_does_not_stop_the_others(tmp_path: Path) -> None:
    (tmp_path / "bad.moe").write_bytes(b"not a trace")
    shutil.copy(TRACES / "mixtral-like.moe", tmp_path / "good.moe")
    path = write(
        tmp_path,
        """
        name: broken
        traces:
          - synth: {experts: [2, 8], top_k: 4, requests: 2, tokens: 8, layers: 1}
          - path: "*.moe"
        analyses:
          - analyze: {batch_sizes: [1, 8]}
    """,
    )
    run = run_sweep(load_sweep(path), tmp_path / "out", workers=2)
    assert (run.total, run.ran, run.failed) == (8, 8, 4)
    errors = {(r.get("trace.experts") or Path(r["trace.path"]).name): r["error"] for r in run.rows}
    assert "top-k" in errors[2] and errors[8] is None
    assert errors["bad.moe"] and "\n" not in errors["bad.moe"] and errors["good.moe"] is None
    ok = [r for r in run.rows if r["error"] is None]
    assert all(r["memory_savings"] is not None for r in ok) and len(ok) == 4
    again = run_sweep(load_sweep(path), tmp_path / "out", workers=1)
    assert (again.ran, again.skipped, again.failed) == (4, 4, 4)  # failures are retried


# ---------------------------------------------------------------------- the command


def test_command_runs_resumes_and_summarises(tmp_path: Path, run_cli) -> None:
    path = write(tmp_path, SMALL)
    out = tmp_path / "out"
    dry = run_cli("sweep", path, "-o", out, "--dry-run")
    assert dry.exit_code == 0 and "28 experiments" in dry.stdout and not out.exists()
    first = run_cli("sweep", path, "-o", out, "--workers", "1")
    assert first.exit_code == 0, first.stderr
    assert "28 run (0 failed), 0 already stored" in first.stdout
    # The summary's batch-size-4 line: the four traces' brute-force savings, averaged.
    savings = [
        brute_memory_savings(
            synthesize(n_experts=e, top_k=2, n_layers=2, n_requests=3, tokens_per_request=10,
                       locality=loc, seed=5).expert_ids,
            4,
        )
        for e in (4, 8)
        for loc in (0.0, 0.7)
    ]  # fmt: skip
    mean = sum(savings) / 4
    assert re.search(rf"\n\s+4\s+4\s+{100 * mean:.1f}%", first.stdout)
    second = run_cli("sweep", path, "-o", out, "--workers", "1")
    assert "0 run (0 failed), 28 already stored" in second.stdout
    forced = run_cli("sweep", path, "-o", out, "--workers", "1", "--force")
    assert "28 run" in forced.stdout and len(jsonl(out)) == 28


BAD = [
    ("name: x\ntraces: []\nanalyses: [{analyze: {}}]\n", r"s\.yaml:2: traces: must be a non"),
    ("name: x\ncolour: red\n", r"s\.yaml:2: colour: unknown key"),
    (
        "name: x\ntraces:\n  - synth: {experts: eight}\nanalyses: [{analyze: {}}]\n",
        r"s\.yaml:3: traces\[0\]\.synth\.experts: must be a number",
    ),
    (
        "name: x\ntraces:\n  - synth: {experts: []}\nanalyses: [{analyze: {}}]\n",
        r"s\.yaml:3: traces\[0\]\.synth\.experts: is an empty list",
    ),
    (
        "name: x\ntraces:\n  - path: nothing/*.moe\nanalyses: [{analyze: {}}]\n",
        r"s\.yaml:3: traces\[0\]\.path: 'nothing/\*\.moe' matches no file",
    ),
    (
        "name: x\ntraces: [{synth: {}}]\nanalyses:\n  - replay_gpu: {}\n",
        r"s\.yaml:4: analyses\[0\]\.replay_gpu: unknown key; expected one of analyze, cache",
    ),
    (
        "name: x\ntraces: [{synth: {}}]\nanalyses:\n  - analyze: {policy: [tokens, fast]}\n",
        r"s\.yaml:4: analyses\[0\]\.analyze\.policy: must be one of .*got 'fast'",
    ),
    (
        "name: x\ntraces: [{synth: {locality: 2}}]\nanalyses: [{analyze: {}}]\n",
        r"s\.yaml:2: traces\[0\]\.synth\.locality: must be between 0 and 1",
    ),
    (
        "name: x\ntraces:\n  - synth: {experts: [8, 16], top_k: [1], link: [[experts, top_k]]}\n"
        "analyses: [{analyze: {}}]\n",
        r"s\.yaml:3: traces\[0\]\.synth\.link\[0\]: linked settings must have lists of the same",
    ),
    (
        "name: x\nrepeats: 0\ntraces: [{synth: {}}]\nanalyses: [{analyze: {}}]\n",
        r"s\.yaml:2: repeats: must be a whole number, 1 or more",
    ),
    ("name: [x\n", r"s\.yaml:\d+: "),
    ("traces: []\n", r"s\.yaml:1: the file: needs a 'name' key"),
]


@pytest.mark.parametrize(("text", "match"), BAD)
def test_bad_sweep_files_are_one_line_naming_the_key(tmp_path: Path, run_cli, text, match) -> None:
    path = write(tmp_path, text)
    with pytest.raises(MoeprofError, match=match):
        load_sweep(path)
    result = run_cli("sweep", path, "-o", tmp_path / "out")
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


def test_shipped_sweeps_expand() -> None:
    root = Path(__file__).resolve().parent.parent / "sweeps"
    seed = load_sweep(root / "seed.yaml")
    assert len(seed.experiments) == 560
    assert len({e.source for e in seed.experiments}) == 80
    traces = load_sweep(root / "traces.yaml")
    files = {Path(dict(e.source.params)["path"]).name for e in traces.experiments}
    assert files == {p.name for p in TRACES.glob("*.moe")}
