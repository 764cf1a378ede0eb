"""Engine routing logs as they are written (docs/import.md "Engine logs"): metadata records,
row filters, one file per layer, positions that restart every forward pass, warm-up passes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from moeprof.batching import get_policy
from moeprof.errors import MoeprofError
from moeprof.importers import MoeprofImportWarning, import_trace
from moeprof.trace import Trace, load_trace, warmup_tokens


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _routes(rng: np.random.Generator, n: int, n_experts: int = 60, k: int = 4) -> list[list[int]]:
    return [rng.choice(n_experts, k, replace=False).tolist() for _ in range(n)]


@pytest.fixture
def moe_logger(tmp_path: Path) -> tuple[Path, dict[tuple[str, int, int], list[int]]]:
    """vLLM "MoE logger" layout: a metadata first line, then req_id/token_idx/layer/topk_ids."""
    rng = np.random.default_rng(0)
    records: list[dict] = [{"type": "meta", "model_id": "org/moe-model", "top_k": 4, "cfg": {}}]
    truth = {}
    for req in ("a", "b"):
        for tok in range(4):
            for layer in (3, 7):
                ids = _routes(rng, 1)[0]
                truth[(req, tok, layer)] = ids
                records.append(
                    {
                        "type": "route",
                        "req_id": req,
                        "token_idx": tok,
                        "layer": layer,
                        "topk_ids": ids,
                        "topk_weights": [0.25] * 4,
                    }
                )
    records.append(
        {
            "type": "debug",
            "req_id": "a",
            "token_idx": 0,
            "layer": 3,
            "topk_ids": [0, 1, 2, 3],
            "topk_weights": [0.25] * 4,
        }
    )
    return _write(tmp_path / "log.jsonl", records), truth


def test_metadata_records_are_skipped_and_kept(moe_logger) -> None:
    path, truth = moe_logger
    trace = import_trace(path, "long-jsonl", where=[("type", "route")])
    source = trace.meta["source"]
    assert source["metadata_records"] == 1
    # Simple values only; the nested "cfg" is left out.
    assert source["metadata"] == {"type": "meta", "model_id": "org/moe-model", "top_k": 4}
    assert trace.meta["model"]["id"] == "org/moe-model"
    assert trace.moe_layer_indices == [3, 7]
    labels = trace.meta["request_labels"]
    for t in range(trace.n_tokens):
        req, tok = labels[int(trace.request_ids[t])], int(trace.positions[t])
        for dense, layer in enumerate((3, 7)):
            assert trace.expert_ids[t, dense].tolist() == truth[(req, tok, layer)]


def test_without_where_the_extra_row_is_a_duplicate(moe_logger) -> None:
    path, _ = moe_logger
    with pytest.raises(MoeprofError, match="a second row for request 'a', position 0, layer 3"):
        import_trace(path, "long-jsonl")


def test_where_checks_its_column(moe_logger) -> None:
    path, _ = moe_logger
    with pytest.raises(MoeprofError, match=r"no column 'kind' \(where\)"):
        import_trace(path, "long-jsonl", where=[("kind", "route")])
    with pytest.raises(MoeprofError, match="no routing rows match the where filters"):
        import_trace(path, "long-jsonl", where=[("type", "nothing")])


def test_where_on_the_command_line(run_cli, moe_logger, tmp_path: Path) -> None:
    path, _ = moe_logger
    out = tmp_path / "t.moe"
    bad = run_cli("import", path, "-o", out, "--where", "type")
    assert bad.exit_code == 2 and "--where takes COL=VALUE, got 'type'" in bad.stderr
    ok = run_cli("import", path, "-o", out, "--where", "type=route")
    assert ok.exit_code == 0, ok.stderr
    assert "1 metadata records skipped" in " ".join(ok.stderr.split() + ok.stdout.split())
    assert load_trace(out).n_tokens == 8


def _per_layer_files(tmp_path: Path) -> tuple[list[Path], dict[tuple[str, int, int], list[int]]]:
    rng = np.random.default_rng(1)
    truth, files = {}, []
    for layer in (3, 7):
        records = []
        for req in ("r0", "r1", "r2"):
            for tok in range(5):
                ids = _routes(rng, 1)[0]
                truth[(req, tok, layer)] = ids
                records.append({"req_id": req, "token_idx": tok, "layer": layer, "topk_ids": ids})
        files.append(_write(tmp_path / f"layer{layer}.jsonl", records))
    return files, truth


def test_one_file_per_layer_needs_global_request_scope(tmp_path: Path) -> None:
    files, truth = _per_layer_files(tmp_path)
    with pytest.raises(MoeprofError, match=r"layers missing: 3, 7; .*request_scope global"):
        import_trace(files, "long-jsonl")
    trace = import_trace(files, "long-jsonl", request_scope="global")
    assert (trace.n_tokens, trace.n_requests) == (15, 3)
    labels = trace.meta["request_labels"]
    assert labels == ["r0", "r1", "r2"]
    for t in range(trace.n_tokens):
        req, tok = labels[int(trace.request_ids[t])], int(trace.positions[t])
        assert [trace.expert_ids[t, i].tolist() for i in range(2)] == [
            truth[(req, tok, 3)],
            truth[(req, tok, 7)],
        ]
    with pytest.raises(MoeprofError, match="request_scope must be file or global"):
        import_trace(files, "long-jsonl", request_scope="world")


def test_dropped_tokens_name_the_missing_layers(tmp_path: Path) -> None:
    records = [
        {"req_id": 0, "token_idx": t, "layer": layer, "topk_ids": [t % 5, 5 + layer]}
        for t in range(4)
        for layer in range(3)
        if not (t == 2 and layer == 1)
    ]
    with pytest.warns(
        MoeprofImportWarning, match=r"dropped 1 of 4 tokens that lack .*layers missing: 1;"
    ):
        trace = import_trace(_write(tmp_path / "x.jsonl", records), "long-jsonl")
    assert trace.positions.tolist() == [0, 1, 3]


def test_none_switches_a_column_off(tmp_path: Path) -> None:
    records = [
        {"req_id": r, "token_idx": 9, "layer": 0, "topk_ids": [r, 3 + i], "weights": [0.5, 0.5]}
        for i in range(3)
        for r in range(2)
    ]
    path = _write(tmp_path / "x.jsonl", records)
    with pytest.raises(MoeprofError, match="a second row for request '0', position 9"):
        import_trace(path, "long-jsonl")
    trace = import_trace(path, "long-jsonl", position_col="none", weights_col="None")
    assert trace.gate_weights is None
    assert trace.positions.tolist() == [0, 1, 2, 0, 1, 2]
    assert trace.expert_ids[:, 0].tolist() == [[0, 3], [0, 4], [0, 5], [1, 3], [1, 4], [1, 5]]
    one = import_trace(path, "long-jsonl", request_col="none", position_col="none")
    assert (one.n_requests, one.positions.tolist()) == (1, list(range(6)))
    with pytest.raises(MoeprofError, match="layer_col cannot be none"):
        import_trace(path, "long-jsonl", layer_col="none")


def _pass_log(tmp_path: Path, pass_sizes: list[int]) -> tuple[Path, list[list[int]]]:
    """One constant request id; token_idx counts rows within each forward pass."""
    rng = np.random.default_rng(2)
    records, routes = [], []
    for n in pass_sizes:
        per_pass = {layer: _routes(rng, n) for layer in (0, 1)}
        routes.extend([[per_pass[0][i], per_pass[1][i]] for i in range(n)])
        for layer in (0, 1):
            for i in range(n):
                records.append(
                    {"req_id": 7, "token_idx": i, "layer": layer, "topk_ids": per_pass[layer][i]}
                )
    return _write(tmp_path / "passes.jsonl", records), routes


def test_steps_from_position_resets(tmp_path: Path) -> None:
    sizes = [6, 3, 3, 1, 2]
    path, routes = _pass_log(tmp_path, sizes)
    with pytest.raises(MoeprofError, match="step_from_resets numbers the passes"):
        import_trace(path, "long-jsonl")
    trace = import_trace(path, "long-jsonl", step_from_resets=True)
    expected_steps = [step for step, n in enumerate(sizes) for _ in range(n)]
    assert trace.steps is not None and trace.steps.tolist() == expected_steps
    assert trace.positions.tolist() == list(range(sum(sizes)))
    assert trace.expert_ids.tolist() == routes
    plan = next(iter(get_policy("recorded").plans(trace, [1])))
    assert plan.batch_tokens.tolist() == sizes
    with pytest.raises(MoeprofError, match="step_from_resets needs a position column"):
        import_trace(path, "long-jsonl", step_from_resets=True, position_col="none")


def test_recorded_policy_on_the_command_line(run_cli, tmp_path: Path) -> None:
    path, _ = _pass_log(tmp_path, [4, 2, 2])
    out = tmp_path / "t.moe"
    assert run_cli("import", path, "-o", out, "--step-from-resets").exit_code == 0
    result = run_cli("analyze", out, "--policy", "recorded", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert (doc["results"][0]["n_batches"], doc["results"][0]["tokens"]) == (3, 8)


def _brute_warmup(ids: np.ndarray, min_rows: int) -> list[bool]:
    found = [False] * ids.shape[0]
    for layer in range(ids.shape[1]):
        routes = [frozenset(row) for row in ids[:, layer].tolist()]
        start = 0
        for t in range(1, len(routes) + 1):
            if t == len(routes) or routes[t] != routes[start]:
                if t - start >= min_rows:
                    found[start:t] = [True] * (t - start)
                start = t
    return found


def test_warmup_tokens_against_brute_force() -> None:
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 3, size=(400, 2, 1))
    ids[10:300, 1, 0] = 2  # a run of 290 in layer 1 only
    ids[320:360, 0, 0] = 1  # too short
    for min_rows in (2, 5, 40, 256):
        assert warmup_tokens(ids, min_rows).tolist() == _brute_warmup(ids, min_rows)


def _warm_trace(tmp_path: Path) -> Path:
    rng = np.random.default_rng(5)
    n_warm, n_real = 300, 200
    warm = np.broadcast_to(np.array([1, 4]), (n_warm, 2))
    real = np.stack([rng.permutation(16)[:2] for _ in range(n_real)])
    records = [
        {
            "req_id": 0 if t < n_warm else 1 + t // 50,
            "token_idx": t,
            "layer": 0,
            "experts": row.tolist(),
        }
        for t, row in enumerate(np.concatenate([warm, real]))
    ]
    return _write(tmp_path / "warm.jsonl", records)


def test_warmup_is_reported_and_dropped(tmp_path: Path) -> None:
    path = _warm_trace(tmp_path)
    with pytest.warns(MoeprofImportWarning, match=r"300 tokens \(rows 0\.\.299\) repeat one route"):
        kept = import_trace(path, "long-jsonl")
    assert kept.n_tokens == 500
    with warnings.catch_warnings():
        warnings.simplefilter("error", MoeprofImportWarning)
        dropped = import_trace(path, "long-jsonl", drop_warmup=True)
    assert dropped.n_tokens == 200
    assert dropped.expert_ids.tolist() == kept.expert_ids[300:].tolist()
    assert dropped.meta["source"]["dropped_warmup_tokens"] == 300


def test_info_and_import_warn_of_warmup(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "t.moe"
    imported = run_cli("import", _warm_trace(tmp_path), "-o", out)
    assert imported.exit_code == 0
    assert "--drop-warmup removes them" in " ".join(imported.stderr.split())
    info = run_cli("info", out)
    assert info.exit_code == 0
    assert "300 tokens (rows 0..299) repeat one route" in " ".join(info.stderr.split())
    quiet = Trace.from_arrays(np.arange(300).reshape(300, 1, 1) % 7, n_experts=7)
    quiet.save(tmp_path / "q.moe")
    assert "warning" not in run_cli("info", tmp_path / "q.moe").stderr
