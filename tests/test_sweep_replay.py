"""The replay analysis of a sweep (CPU backend) and the cache's `strategies` axis: stored counted
fields against the direct library call (docs/sweep-report.md, "The replay analysis")."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from moeprof import MoeprofError, simulate_cache, synthesize
from moeprof.replay import replay
from moeprof.sweep import load_sweep, parse_sweep, run_sweep

COUNTED = ("copies", "counted_copies", "hits", "bytes_copied", "bytes_copied_full_size")
SYNTH = dict(n_experts=8, top_k=2, n_layers=3, n_requests=3, tokens_per_request=12, seed=4)
REPLAY_SWEEP = """
    name: rep
    traces:
      - synth: {experts: 8, top_k: 2, layers: 3, requests: 3, tokens: 12, seed: 4,
                locality: [0.0, 0.6]}
    analyses:
      - replay: {strategies: [naive, dedup, lru], cache_experts: [1, 2k], batch_sizes: [1, 4],
                 expert_bytes: 4096, max_batches: 5, layers: "0,2"}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def replay_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("replay")
    run = run_sweep(load_sweep(write(tmp, REPLAY_SWEEP)), tmp / "out", workers=1)
    assert run.failed == 0 and run.total == 2 * 3 * 2 * 2
    return rows_of(tmp / "out")


def test_counted_fields_equal_the_direct_replay(replay_rows: list[dict]) -> None:
    for row in replay_rows:
        trace = synthesize(**SYNTH, locality=row["trace.locality"])
        capacity = {1: 1, "2k": 2 * 2}[row["cache_experts"]]
        direct = replay(
            trace,
            device="cpu",
            strategies=[row["strategies"]],
            batch_sizes=[row["batch_size"]],
            cache_experts=capacity,
            max_batches=5,
            layers=[0, 2],
            expert_bytes=4096,
            calibrate=False,
        )
        (run,) = direct.runs
        for name in COUNTED:
            assert row[name] == getattr(run, name), (row["strategies"], name)
        assert row["n_batches"] == run.n_batches
        assert row["copies"] == row["counted_copies"]  # the engine issued what counting says
        assert row["cache_experts_resolved"] == capacity
        assert row["layers_replayed"] == 2 and row["block_bytes"] == 4096
        # Timings are measured anew on every run: present and positive, never compared.
        assert row["seconds"] > 0 and row["gbps"] > 0


def test_savings_against_naive_equal_the_naive_replay(replay_rows: list[dict]) -> None:
    """naive_bytes is counted from the requests; the naive strategy's replay copies them."""
    naive = {
        (r["trace.locality"], r["batch_size"]): r["bytes_copied"]
        for r in replay_rows
        if r["strategies"] == "naive"
    }
    for row in replay_rows:
        naive_bytes = naive[(row["trace.locality"], row["batch_size"])]
        assert row["naive_bytes"] == naive_bytes
        assert row["savings_vs_naive"] == pytest.approx(1 - row["bytes_copied"] / naive_bytes)
        # Every request is one block of 4096 bytes in one of the two replayed layers.
        assert naive_bytes == 4096 * row["requests"]
    by_strategy = {
        s: [r["bytes_copied"] for r in replay_rows if r["strategies"] == s]
        for s in ("naive", "dedup", "lru")
    }
    assert sum(by_strategy["lru"]) <= sum(by_strategy["dedup"]) < sum(by_strategy["naive"])


def test_replay_settings_are_checked_before_anything_runs() -> None:
    cases = {
        "strategies: [nope]": "must be one of",
        "strategies: lru, expert_bytes: 0": "whole number, 1 or more",
        "strategies: lru, layers: 'a,b'": "MoE layer index",
        "strategies: lru, max_batches: -1": "whole number, 1 or more",
        "cache_experts: 2": "needs strategies",
    }
    for settings, message in cases.items():
        text = f"""
            name: bad
            traces: [{{synth: {{experts: 4, top_k: 1}}}}]
            analyses: [{{replay: {{{settings}}}}}]
        """
        with pytest.raises(MoeprofError, match=message):
            parse_sweep(textwrap.dedent(text), Path("s.yaml"))


# ---------------------------------------------------------------------- cache: `strategies`


CACHE = """
    name: c
    traces:
      - synth: {experts: 8, top_k: 2, layers: 2, requests: 3, tokens: 12, seed: 4}
    analyses:
      - cache: {SPELLING: [lru, belady], cache_experts: [1, 2k], batch_sizes: [1, 4],
                policy: tokens}
"""


def test_cache_takes_strategies_and_its_older_name_alike(tmp_path: Path) -> None:
    stored = {}
    for spelling in ("strategies", "strategy"):
        out = tmp_path / spelling
        run_sweep(load_sweep(write(tmp_path, CACHE.replace("SPELLING", spelling))), out, workers=1)
        stored[spelling] = rows_of(out)
    trace = synthesize(**{**SYNTH, "n_layers": 2})
    for new, old in zip(stored["strategies"], stored["strategy"], strict=True):
        assert new["error"] is None and old["error"] is None
        assert new["strategies"] == old["strategy"] and new["strategy"] is old["strategies"] is None
        capacity = new["cache_experts_resolved"]
        direct = simulate_cache(
            trace, [new["strategies"]], [capacity], [new["batch_size"]], "tokens"
        )
        (want,) = [r for r in direct.rows if r.strategy == new["strategies"]]
        for name in ("loads", "hit_rate", "bytes_loaded", "unique", "requests"):
            assert new[name] == old[name] == getattr(want, name), name


def test_cache_with_both_spellings_or_neither_stores_the_error(tmp_path: Path) -> None:
    both = CACHE.replace("SPELLING: [lru, belady]", "strategies: lru, strategy: lru")
    neither = CACHE.replace("SPELLING: [lru, belady], ", "")
    for text, message in ((both, "not both"), (neither, "needs strategies")):
        out = tmp_path / message.replace(" ", "-")
        run = run_sweep(load_sweep(write(tmp_path, text)), out, workers=1)
        assert run.failed == run.total > 0
        assert all(message in r["error"] for r in rows_of(out))
