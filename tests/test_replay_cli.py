"""`moeprof replay` on the command line: outputs, bad input worded with its options, help
built from the registries, refusals and Ctrl-C."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_replay_engine import InterruptingBackend

import moeprof
from moeprof.replay import engine as engine_mod


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "t.moe"
    moeprof.synthesize(
        n_layers=2, n_requests=4, tokens_per_request=16, zipf=1.0, seed=2, expert_bytes=8192
    ).save(path)
    return path


def test_cli_replay_writes_json_and_markdown(
    run_cli: Any, trace_file: Path, tmp_path: Path
) -> None:
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    res = run_cli(
        "replay",
        trace_file,
        "--batch-sizes",
        "2,8",
        "--cache-experts",
        "2",
        "--json",
        out,
        "--markdown",
        md,
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(out.read_text())
    assert doc["replay"]["ran_on_cpu"] is True
    assert {s["strategy"] for s in doc["results"][0]["replay"]["strategies"]} == {
        "naive",
        "dedup",
        "lru",
    }
    text = md.read_text()
    assert "## Replay (measured)" in text and "## Savings by Batch Size" in text
    assert "Replay (measured)" in res.stdout
    report = run_cli("report", out)  # the analyze part of the contract still holds
    assert report.exit_code == 0, report.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--layers", "7"], "does not exist"),
        (["--layers", "x"], "MoE layer 'x' is not a whole number"),
        (["--layers", ","], "no MoE layers given"),
        (["--cache-experts", "-1"], "--cache-experts must be 0 or more, got -1"),
        (["--max-batches", "0"], "--max-batches must be at least 1, got 0"),
        (["--compute", "--hidden-size", "0"], "--hidden-size must be at least 1, got 0"),
        (["--policy", "greedy"], "unknown policy 'greedy'; choose one of tokens, decode, recorded"),
        (["--strategies", "naive,warp"], "unknown strategy"),
        (["--expert-bytes", "0"], "--expert-bytes"),
        (["--policy", "recorded"], "recorded steps"),
        (["--batch-sizes", "a"], "batch size"),
    ],
)
def test_cli_bad_input(
    run_cli: Any, trace_file: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "r.json"
    res = run_cli("replay", trace_file, *args, "--json", out)
    assert res.exit_code == 2
    assert res.stderr.startswith("moeprof: error:") and message in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert not out.exists()


def test_cli_refuses_overwrite_and_cuda(run_cli: Any, trace_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    out.write_text("keep")
    res = run_cli("replay", trace_file, "--json", out)
    assert res.exit_code == 2 and "--force" in res.stderr and out.read_text() == "keep"
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        res = run_cli("replay", trace_file, "--device", "cuda", "--json", tmp_path / "c.json")
        assert res.exit_code == 2 and "device cuda: " in res.stderr
        assert not (tmp_path / "c.json").exists()


def test_cli_ctrl_c_writes_partial_results(
    run_cli: Any, trace_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # naive at B=8 issues 64 tokens x 2 layers x top-2 = 256 copies (+1 warm-up), then dedup starts.
    monkeypatch.setattr(
        engine_mod, "make_backend", lambda device: InterruptingBackend(256 + 1 + 10)
    )
    out = tmp_path / "r.json"
    res = run_cli("replay", trace_file, "--batch-sizes", "8", "--json", out)
    assert res.exit_code == 130
    doc = json.loads(out.read_text())
    assert doc["replay"]["interrupted"] is True
    assert [s["strategy"] for s in doc["results"][0]["replay"]["strategies"]] == ["naive"]


def test_cli_names_the_option_for_a_trace_without_expert_sizes(
    run_cli: Any, tmp_path: Path
) -> None:
    path = tmp_path / "sizeless.moe"
    moeprof.Trace.from_arrays(np.zeros((4, 1, 1), dtype=np.int64), n_experts=2).save(path)
    res = run_cli("replay", path, "--json", tmp_path / "r.json")
    assert res.exit_code == 2
    assert "does not record its expert size; pass --expert-bytes" in res.stderr
    res = run_cli("replay", path, "--expert-bytes", "256", "-s", "dedup", "-b", "4")
    assert res.exit_code == 0, res.stderr


def test_as_options_touches_only_parameter_names() -> None:
    from moeprof.commands._common import as_options

    options = {
        "expert_bytes": "--expert-bytes",
        "max_batches": "--max-batches",
        "cache_experts": "--cache-experts",
        "hidden_size": "--hidden-size",
        "device": "--device",
    }
    assert as_options("expert_bytes must be at least 1; max_batches, cache_experts", options) == (
        "--expert-bytes must be at least 1; --max-batches, --cache-experts"
    )
    assert as_options("hidden size -1; pass hidden_size", options) == (
        "hidden size -1; pass --hidden-size"
    )
    # Neither a longer identifier nor a one-word name (plain English) is rewritten.
    assert as_options("replay fewer layers; my_expert_bytes_x", options) == (
        "replay fewer layers; my_expert_bytes_x"
    )
    assert as_options("device cuda: no CUDA device", options) == "device cuda: no CUDA device"
    assert as_options("expert_bytes", {}) == "expert_bytes"


def test_help_is_built_from_the_registries(run_cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from moeprof.batching import REGISTRY as POLICY_REGISTRY
    from moeprof.strategies import REGISTRY as STRATEGY_REGISTRY

    monkeypatch.setenv("COLUMNS", "400")  # one line per option: nothing wrapped mid-text
    res = run_cli("replay", "--help")
    assert res.exit_code == 0
    text = " ".join(res.stdout.replace("│", " ").split())  # rich's box edges out of long lines
    for strat in STRATEGY_REGISTRY.values():
        assert f"{strat.name} ({strat.help})" in text
    for policy in POLICY_REGISTRY.values():
        assert f"{policy.name} ({policy.help})" in text
    assert "[default: naive,dedup,lru]" in text
    cachers = ", ".join(s.name for s in STRATEGY_REGISTRY.values() if s.uses_cache)
    assert f"{cachers}: experts kept on the device per layer across batches" in text
    res = run_cli("analyze", "--help")
    text = " ".join(res.stdout.split())
    for policy in POLICY_REGISTRY.values():
        assert f"{policy.name} ({policy.help})" in text
