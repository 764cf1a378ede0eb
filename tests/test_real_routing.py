"""Validation on real routing recorded from real pretrained models, by other projects.

The analysis of each imported trace must equal a brute-force count written here from the raw
files (csv / json and Python sets, not moeprof's importer), for policies tokens and decode and
batch sizes 1-64. The captures are read in place from ``REFERENCE_TRACES`` (tests/conftest.py:
``$MOEPROF_REFERENCE_TRACES`` if set) and never copied into this repository; a test skips when
its folder is absent. Sub-folders, each fetched from a public repository at a fixed commit
(docs/real-routing.md has the commands):

- ``moebeyond-dsv2lite-prefill/test/``: https://github.com/ngavhane/moe-beyond at commit
  4dca2eacb7bc0a3086770a4de7a57cc0b81479bd, ``test_datasets/formatted_csvs/*.csv`` (100 files):
  DeepSeek-V2-Lite-Chat prefill routing.
- ``specmoe-mixtral-decode/``: https://github.com/Mario928/speculative-moe at commit
  216e26eb86ee09fa46bb0e8c000be7e9758e10b6, ``routing_data_collected/{gsm8k,humaneval}_2_routing.jsonl``:
  Mixtral-8x7B-Instruct decode routing (later commits hold Git LFS pointers instead).
- ``fiddler-mixtral-popularity/mixtral_8x7b_original/``: https://github.com/efeslab/fiddler at
  commit 5e5ed673f3a1b67c5a80f9c02f0f89672a20bf58 (branch ``popularity``),
  ``benchmarks/results/popularity/mixtral_8x7b_original/*.json``: per-layer expert counts.
"""

from __future__ import annotations

import ast
import csv
import json
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import REFERENCE_TRACES

from moeprof.analyze import analyze
from moeprof.cli import main
from moeprof.commands.synth import read_popularity
from moeprof.errors import MoeprofError
from moeprof.importers import MoeprofImportWarning, import_trace
from moeprof.synth import synthesize
from moeprof.trace import load_trace

DEEPSEEK = REFERENCE_TRACES / "moebeyond-dsv2lite-prefill" / "test"
MIXTRAL = REFERENCE_TRACES / "specmoe-mixtral-decode"
POPULARITY = REFERENCE_TRACES / "fiddler-mixtral-popularity" / "mixtral_8x7b_original"
CONFIGS = Path(__file__).parent / "data" / "import" / "configs"
BATCH_SIZES = [1, 2, 3, 4, 8, 16, 32, 64]
MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2
DEEPSEEK_EXPERT_BYTES = 3 * 2048 * 1408 * 2


def needs(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not path.is_dir(),
        reason=f"{path} not found: set MOEPROF_REFERENCE_TRACES (docs/real-routing.md)",
    )


Token = dict[int, list[int]]  # model layer -> experts


def mixtral_files() -> list[Path]:
    return sorted(MIXTRAL.glob("*_routing.jsonl"), key=lambda p: p.name)


# ---------------------------------------------------------------------- raw readers


def read_deepseek_raw() -> list[list[Token]]:
    """One request per file (name order); the t-th row of a layer is the request's token t."""
    requests = []
    for path in sorted(DEEPSEEK.glob("*.csv"), key=lambda p: p.name):
        per_layer: dict[int, list[list[int]]] = {}
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                experts = ast.literal_eval(row["Activated Expert IDs"])
                per_layer.setdefault(int(row["Layer ID"]), []).append(list(experts))
        lengths = {len(v) for v in per_layer.values()}
        assert len(lengths) == 1, path
        requests.append(
            [{lay: per_layer[lay][t] for lay in per_layer} for t in range(lengths.pop())]
        )
    return requests


def read_mixtral_raw() -> tuple[list[list[Token]], list[list[dict[int, list[float]]]], int]:
    """Requests = (dataset, problem_id) in order of appearance; tokens by token_idx; tokens that
    miss a layer are left out (and counted)."""
    routing: dict[tuple[str, int], dict[int, dict[int, tuple[list[int], list[float]]]]] = {}
    for path in mixtral_files():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                req = routing.setdefault((rec["dataset"], rec["problem_id"]), {})
                req.setdefault(rec["token_idx"], {})[rec["layer"]] = (
                    rec["experts"],
                    rec["gating_probs"],
                )
    n_layers = max(layer for req in routing.values() for tok in req.values() for layer in tok) + 1
    requests, weights, dropped = [], [], 0
    for req in routing.values():
        complete = [t for t in sorted(req) if len(req[t]) == n_layers]
        dropped += len(req) - len(complete)
        requests.append([{lay: req[t][lay][0] for lay in req[t]} for t in complete])
        weights.append([{lay: req[t][lay][1] for lay in req[t]} for t in complete])
    return requests, weights, dropped


# ---------------------------------------------------------------------- brute force


def batches_tokens(requests: list[list[Token]], size: int) -> list[list[Token]]:
    flat = [tok for req in requests for tok in req]
    return [flat[i : i + size] for i in range(0, len(flat), size)]


def batches_decode(requests: list[list[Token]], slots: int) -> list[list[Token]]:
    """Continuous batching: every active request gives its next token per step; a finished
    request's slot goes to the next waiting request at the following step."""
    waiting = deque(range(len(requests)))
    active: list[list[int]] = []  # [request, next token]
    batches = []
    while waiting or active:
        while len(active) < slots and waiting:
            active.append([waiting.popleft(), 0])
        batches.append([requests[r][i] for r, i in active])
        for slot in active:
            slot[1] += 1
        active = [slot for slot in active if slot[1] < len(requests[slot[0]])]
    return batches


def brute_force(batches: list[list[Token]], layers: Sequence[int]) -> tuple[list[int], list[int]]:
    """Per layer: expert loads requested (one per token and slot) and distinct experts per batch."""
    requested = [0] * len(layers)
    unique = [0] * len(layers)
    for batch in batches:
        for i, layer in enumerate(layers):
            requested[i] += sum(len(tok[layer]) for tok in batch)
            unique[i] += len({e for tok in batch for e in tok[layer]})
    return requested, unique


def check_against_brute_force(trace, requests: list[list[Token]], expert_bytes: int) -> None:
    layers = trace.moe_layer_indices
    for policy, make in (("tokens", batches_tokens), ("decode", batches_decode)):
        result = analyze(trace, BATCH_SIZES, policy)
        for row in result.results:
            batches = make(requests, row.batch_size)
            requested, unique = brute_force(batches, layers)
            where = f"{policy} B={row.batch_size}"
            assert row.n_batches == len(batches), where
            assert [lay.requests for lay in row.layers] == requested, where
            assert [lay.unique for lay in row.layers] == unique, where
            assert row.requests == sum(requested) and row.unique == sum(unique), where
            saved = (sum(requested) - sum(unique)) / sum(requested)
            assert row.memory_savings == pytest.approx(saved, abs=1e-12), where
            assert row.bytes_requested == sum(requested) * expert_bytes, where
            assert row.bytes_unique == sum(unique) * expert_bytes, where
            assert row.bandwidth_savings == pytest.approx(saved, abs=1e-12), where


# ---------------------------------------------------------------------- DeepSeek-V2-Lite


@needs(DEEPSEEK)
def test_deepseek_v2_lite_prefill_matches_brute_force() -> None:
    requests = read_deepseek_raw()
    trace = import_trace(DEEPSEEK, "long-csv", model_config=CONFIGS / "deepseek-v2-lite.json")
    assert trace.n_requests == len(requests) == 100
    assert trace.n_tokens == sum(len(r) for r in requests) == 1543
    assert trace.n_layers == 26 and trace.top_k == 6 and trace.n_experts.tolist() == [64] * 26
    assert trace.moe_layer_indices == list(range(1, 27))
    assert trace.expert_bytes.tolist() == [DEEPSEEK_EXPERT_BYTES] * 26
    check_against_brute_force(trace, requests, DEEPSEEK_EXPERT_BYTES)


@needs(DEEPSEEK)
def test_deepseek_cli_import_and_analyze(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace_path, json_path = tmp_path / "ds.moe", tmp_path / "ds.json"
    for argv in (
        [
            "import",
            str(DEEPSEEK),
            "--format",
            "long-csv",
            "-o",
            str(trace_path),
            "--model-config",
            str(CONFIGS / "deepseek-v2-lite.json"),
        ],
        ["analyze", str(trace_path), "--batch-sizes", "2,8,64", "--json", str(json_path)],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0, capsys.readouterr().err
    doc = json.loads(json_path.read_text())
    requests = read_deepseek_raw()
    for row in doc["results"]:
        requested, unique = brute_force(batches_tokens(requests, row["batch_size"]), range(1, 27))
        assert row["requests"] == sum(requested) and row["unique"] == sum(unique)
    assert load_trace(trace_path).meta["source"]["format"] == "long-csv"


# ---------------------------------------------------------------------- Mixtral-8x7B decode


@needs(MIXTRAL)
def test_mixtral_decode_matches_brute_force() -> None:
    requests, weights, dropped = read_mixtral_raw()
    with pytest.warns(MoeprofImportWarning, match=f"dropped {dropped} of"):
        trace = import_trace(
            mixtral_files(),
            "long-jsonl",
            model_config=CONFIGS / "mixtral-8x7b.json",
            phase="decode",
        )
    assert dropped == 8
    assert trace.n_requests == len(requests) == 4  # dataset + problem_id keep the 4 apart
    assert trace.n_tokens == sum(len(r) for r in requests) == 577
    assert trace.n_layers == 32 and trace.top_k == 2 and trace.n_experts.tolist() == [8] * 32
    assert trace.expert_bytes.tolist() == [MIXTRAL_EXPERT_BYTES] * 32
    # Gate probabilities, in the router's slot order, rounded to fp16.
    expected = np.array([[tok[layer] for layer in range(32)] for req in weights for tok in req])
    assert trace.gate_weights is not None
    assert (trace.gate_weights == expected.astype(np.float16)).all()
    check_against_brute_force(trace, requests, MIXTRAL_EXPERT_BYTES)


# ---------------------------------------------------------------------- synth --popularity


def inclusion_probability(p: np.ndarray) -> np.ndarray:
    """P(expert i among 2 drawn without replacement in proportion to p) = p_i + sum_j p_j p_i/(1-p_j)."""
    pairs = p[None, :] * p[:, None] / (1.0 - p[None, :])
    np.fill_diagonal(pairs, 0.0)
    return p + pairs.sum(axis=1)


def check_popularity(counts: list[list[float]], n_tokens: int, seed: int) -> None:
    pop = np.asarray(counts, dtype=np.float64)
    trace = synthesize(
        n_experts=pop.shape[1],
        top_k=2,
        n_layers=pop.shape[0],
        n_requests=4,
        tokens_per_request=n_tokens // 4,
        popularity=counts,
        seed=seed,
    )
    freq = (
        np.stack(
            [
                np.bincount(trace.expert_ids[:, layer].ravel(), minlength=pop.shape[1])
                for layer in range(pop.shape[0])
            ]
        )
        / trace.n_tokens
    )
    expected = np.stack([inclusion_probability(row / row.sum()) for row in pop])
    sigma = np.sqrt(expected * (1 - expected) / trace.n_tokens)
    assert (np.abs(freq - expected) <= 5 * sigma + 1e-12).all()


def test_synth_popularity_follows_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    counts = [[10, 0, 30, 60], [25, 25, 25, 25], [1, 1, 0, 98]]
    check_popularity(counts, 8000, seed=1)
    path = tmp_path / "pop.json"
    path.write_text(json.dumps({"expert_popularity": counts}))
    out = tmp_path / "s.moe"
    with pytest.raises(SystemExit) as exc:
        main(["synth", "--popularity", str(path), "-o", str(out), "-R", "2", "-T", "50"])
    assert exc.value.code == 0
    trace = load_trace(out)
    assert trace.n_layers == 3 and trace.n_experts.tolist() == [4, 4, 4]
    assert not (trace.expert_ids[:, 0] == 1).any()  # a zero count is never drawn
    with pytest.raises(SystemExit) as exc:
        main(["synth", "--popularity", str(path), "-o", str(tmp_path / "x.moe"), "--layers", "4"])
    assert exc.value.code == 2
    assert "--layers 4 disagrees" in capsys.readouterr().err
    assert not (tmp_path / "x.moe").exists()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"expert_popularity": [[1, 2], [3]]}, "layer 1 has 1 experts, layer 0 has 2"),
        ({"expert_popularity": [[1, -2]]}, "count -2 is not a number >= 0"),
        ({"counts": [[1]]}, "expected"),
    ],
)
def test_bad_popularity_files(tmp_path: Path, doc: dict, message: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(MoeprofError, match=message):
        read_popularity(path)


@needs(POPULARITY)
def test_synth_with_fiddler_mixtral_popularity() -> None:
    counts = read_popularity(POPULARITY / "expert_popularity_machine_learning.json")
    assert len(counts) == 32 and {len(row) for row in counts} == {8}
    check_popularity(counts, 20000, seed=0)
