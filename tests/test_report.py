"""Reports: golden markdown, and every number in the tables traced back to the analysis."""

from __future__ import annotations

import json
import math
import os
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DATA

import moeprof
from moeprof.errors import MoeprofError
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
    assert_same_document(_normalised(doc), _normalised(want))


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
    # 64 experts, top-2, no locality: B = 2 saves 1.4% against 1.6% for uniform routing.
    assert "Routing shows about as much reuse as uniform random routing would" in text
    assert "more reuse than uniform" not in text and "less reuse than uniform" not in text


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
        (("results", 0, "bytes_requested"), 2**128, "bytes_requested has the wrong type"),
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


# ---------------------------------------------------------------------- whole-document goldens

MIXED = GOLDEN / "mixed_sizes.moe"
MIXED_SIZES = [1, 2, 3, 4, 8, 32]  # 32 > the trace's 25 tokens: one batch holds them all
MIXED_POLICIES = ("tokens", "decode", "recorded")
REQUEST_LENGTHS = (7, 3, 9, 1, 5)


def build_mixed_sizes_trace() -> moeprof.Trace:
    """The trace behind tests/data/golden/mixed_sizes.moe: three MoE layers with different expert
    counts and sizes (so a per-layer mix-up changes bytes), empty slots, a layer-token with no
    expert at all, recorded steps that are neither the tokens nor the decode batching."""
    n_experts = [4, 6, 8]
    rng = np.random.default_rng(7)
    rows, request_ids, positions, steps = [], [], [], []
    for req, length in enumerate(REQUEST_LENGTHS):
        for pos in range(length):
            token = []
            for e in n_experts:
                popularity = 1.0 / np.arange(1, e + 1)  # skewed: some reuse to count
                pair = rng.choice(e, size=2, replace=False, p=popularity / popularity.sum())
                if rng.random() < 0.25:
                    pair[1] = e  # the sentinel: this token routed one expert only here
                token.append([int(x) for x in pair])
            rows.append(token)
            request_ids.append(req)
            positions.append(pos)
            steps.append(10 * (req // 2) + pos)  # requests 0+1, 2+3 and 4 ran side by side
    rows[5][2] = [8, 8]  # token 5 routed nothing in layer 2
    return moeprof.Trace.from_arrays(
        np.array(rows),
        n_experts=n_experts,
        request_ids=request_ids,
        positions=positions,
        steps=steps,
        expert_bytes=[1_000, 2_500, 40_000],
        meta={
            "moe_layer_indices": [1, 3, 5],
            "created": "2026-11-30T00:00:00+00:00",
            "library_versions": {"moeprof": "golden"},
            "model": {"id": "golden-mixed-sizes", "architecture": None, "revision": None},
            "source": {"kind": "test", "built_by": "tests/test_report.py"},
        },
    )


def _normalised(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` without what changes between runs and releases: versions and creation time."""
    doc = json.loads(json.dumps(doc))
    doc["moeprof_version"] = "golden"
    doc["trace"]["created"] = "normalised"
    doc["trace"]["library_versions"] = "normalised"
    return doc


def assert_same_document(got: Any, want: Any, where: str = "doc") -> None:
    """Every key and value equal; floats to 1e-12 relative (they come from logs and sums)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), where
        for key in want:
            assert_same_document(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_document(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert isinstance(got, float) and got == pytest.approx(want, rel=1e-12, abs=1e-15), where
    else:
        assert type(got) is type(want) and got == want, where


def test_mixed_sizes_trace_is_the_checked_in_one() -> None:
    built = build_mixed_sizes_trace()
    if os.environ.get("MOEPROF_UPDATE_GOLDEN"):
        built.save(MIXED)
    stored = moeprof.load_trace(MIXED)
    assert stored.metadata() == built.metadata()
    assert stored.arrays().keys() == built.arrays().keys()
    for name, array in built.arrays().items():
        assert np.array_equal(stored.arrays()[name], array), name
    assert len(set(stored.expert_bytes.tolist())) == 3 and len(set(stored.n_experts.tolist())) == 3


@pytest.mark.parametrize("policy", MIXED_POLICIES)
def test_mixed_sizes_results_match_golden_document(policy: str) -> None:
    doc = moeprof.analyze(moeprof.load_trace(MIXED), MIXED_SIZES, policy=policy).to_dict()
    golden = GOLDEN / f"mixed_sizes.{policy}.json"
    if os.environ.get("MOEPROF_UPDATE_GOLDEN"):
        golden.write_text(json.dumps(_normalised(doc), indent=2) + "\n")
    assert_same_document(_normalised(doc), json.loads(golden.read_text()))


def _batches(trace: moeprof.Trace, policy: str, size: int) -> list[list[int]]:
    """Row indices of each batch, by the definitions in docs/method.md, one token at a time."""
    rows = list(range(trace.n_tokens))
    if policy == "tokens":
        return [rows[i : i + size] for i in range(0, len(rows), size)]
    if policy == "recorded":
        by_step: dict[int, list[int]] = {}
        for row, step in zip(rows, trace.steps.tolist()):
            by_step.setdefault(step, []).append(row)
        return [by_step[step] for step in sorted(by_step)]
    # decode: `size` slots; each step every active request runs its next token; a finished
    # request's slot goes to the next waiting request at the following step.
    requests: dict[int, list[int]] = {}
    for row, req in zip(rows, trace.request_ids.tolist()):
        requests.setdefault(req, []).append(row)
    waiting = deque(requests.values())
    active: list[list[int]] = []
    batches = []
    while waiting or active:
        while len(active) < size and waiting:
            active.append(waiting.popleft())
        batches.append([req_rows[0] for req_rows in active])
        active = [req_rows[1:] for req_rows in active if len(req_rows) > 1]
    return batches


@pytest.mark.parametrize("policy", MIXED_POLICIES)
def test_mixed_sizes_results_match_brute_force(policy: str) -> None:
    """Requests, unique experts and bytes per layer with Python sets, each layer at its own size."""
    trace = moeprof.load_trace(MIXED)
    doc = moeprof.analyze(trace, MIXED_SIZES, policy=policy).to_dict()
    ids = trace.expert_ids.tolist()
    n_experts, sizes = trace.n_experts.tolist(), trace.expert_bytes.tolist()
    batch_sizes = [0] if policy == "recorded" else MIXED_SIZES
    assert len(doc["results"]) == len(batch_sizes)
    for row, size in zip(doc["results"], batch_sizes):
        batches = _batches(trace, policy, size)
        assert row["n_batches"] == len(batches) and row["tokens"] == trace.n_tokens
        assert row["batch_size"] == (max(map(len, batches)) if policy == "recorded" else size)
        for layer, got in enumerate(row["layers"]):
            e = n_experts[layer]
            requests = unique = 0
            uniform = 0.0
            for batch in batches:
                routed = [[x for x in ids[t][layer] if x != e] for t in batch]
                requests += sum(len(r) for r in routed)
                unique += len({x for r in routed for x in r})
                uniform += e * (1 - math.prod(1 - len(r) / e for r in routed))
            assert got["layer"] == layer and got["model_layer"] == [1, 3, 5][layer]
            assert (got["requests"], got["unique"]) == (requests, unique), (size, layer)
            assert got["bytes_requested"] == requests * sizes[layer]
            assert got["bytes_unique"] == unique * sizes[layer]
            assert got["memory_savings"] == pytest.approx(1 - unique / requests)
            assert got["uniform_unique"] == pytest.approx(uniform, rel=1e-12)
        layers = row["layers"]
        assert row["requests"] == sum(x["requests"] for x in layers)
        assert row["unique"] == sum(x["unique"] for x in layers)
        assert row["bytes_requested"] == sum(x["requests"] * b for x, b in zip(layers, sizes))
        assert row["bytes_unique"] == sum(x["unique"] * b for x, b in zip(layers, sizes))
        assert row["bytes_saved"] == row["bytes_requested"] - row["bytes_unique"]
        assert row["bandwidth_savings"] == pytest.approx(
            row["bytes_saved"] / row["bytes_requested"]
        )


def test_max_reuse_names_the_model_layer_where_known() -> None:
    from moeprof.report.rows import batch_table_rows

    doc = golden_doc()
    row = doc["results"][3]
    best = int(row["max_reuse_layer"])
    for layer in row["layers"]:
        layer["model_layer"] = 10 + 2 * int(layer["layer"])  # e.g. MoE layers in every other block
    _, rows = batch_table_rows(build_report(doc))
    assert rows[3][4].endswith(f"(layer {10 + 2 * best})"), rows[3]
    for layer in row["layers"]:
        del layer["model_layer"]  # a results file without the model's numbering
    _, rows = batch_table_rows(build_report(doc))
    assert rows[3][4].endswith(f"(L{best})"), rows[3]


def test_analysis_notes_reach_markdown_and_terminal() -> None:
    from rich.console import Console

    from moeprof.report.terminal import render_terminal
    from moeprof.trace import Trace

    trace = Trace.from_arrays(np.arange(12).reshape(12, 1, 1) % 6, n_experts=6)
    doc = moeprof.analyze(trace, [1, 4], policy="decode").to_dict()
    note = doc["notes"][0]
    assert "batch size 4 never filled" in note
    assert f"**Note:** {note}" in render_markdown(doc)
    console = Console(width=200, record=True)
    console.print(render_terminal(doc))
    assert note in " ".join(console.export_text().split())
    doc["notes"] = [3]
    with pytest.raises(MoeprofError, match="notes is not a list of sentences"):
        render_markdown(doc)
