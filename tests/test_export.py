"""Export: one row per token x layer, parquet and CSV, and back through the long-table importer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

import moeprof
from moeprof import export as export_mod
from moeprof.cli import main
from moeprof.errors import MoeprofError
from moeprof.export import export_trace
from moeprof.importers import import_trace
from moeprof.synth import synthesize
from moeprof.trace import Trace


def small_trace() -> Trace:
    """3 tokens, 2 layers (model layers 4 and 6), top-2 of 5 experts, one empty slot."""
    ids = np.array([[[0, 1], [2, 5]], [[4, 3], [1, 0]], [[2, 1], [3, 4]]])
    weights = np.array(
        [[[0.5, 0.25], [1.0, 0.0]], [[0.75, 0.125], [0.5, 0.5]], [[1, 0], [0.25, 0.75]]]
    )
    return Trace.from_arrays(
        ids,
        n_experts=5,
        request_ids=[7, 7, 9],
        positions=[0, 1, 3],
        gate_weights=weights,
        steps=[0, 1, 0],
        phase=[0, 1, 0],
        token_ids=[11, 12, 13],
        expert_bytes=100,
        meta={"moe_layer_indices": [4, 6]},
    )


def expected_rows(trace: Trace) -> list[dict]:
    """The table written out by loops, independently of the exporter."""
    rows = []
    for t in range(trace.n_tokens):
        for layer in range(trace.n_layers):
            row = {
                "request_id": int(trace.request_ids[t]),
                "position": int(trace.positions[t]),
                "step": None if trace.steps is None else int(trace.steps[t]),
                "phase": None
                if trace.phase is None
                else ("prefill", "decode")[int(trace.phase[t])],
                "token_id": None if trace.token_ids is None else int(trace.token_ids[t]),
                "layer": layer,
                "model_layer": trace.moe_layer_indices[layer],
            }
            for k in range(trace.top_k):
                e = int(trace.expert_ids[t, layer, k])
                row[f"expert_{k}"] = None if e == int(trace.n_experts[layer]) else e
            if trace.gate_weights is not None:
                for k in range(trace.top_k):
                    row[f"weight_{k}"] = float(trace.gate_weights[t, layer, k])
            rows.append(row)
    return rows


def test_parquet_rows_and_metadata(tmp_path: Path) -> None:
    trace = small_trace()
    out = tmp_path / "t.parquet"
    assert export_trace(trace, out) == 6
    table = pq.read_table(out)
    assert table.to_pylist() == expected_rows(trace)
    meta = json.loads(table.schema.metadata[b"moeprof"])
    assert meta["n_experts"] == [5, 5] and meta["moe_layer_indices"] == [4, 6]
    assert table.schema.field("expert_0").type == "uint8"


def test_optional_columns_are_null_when_absent(tmp_path: Path) -> None:
    trace = synthesize(n_layers=3, n_requests=2, tokens_per_request=4, seed=1)
    out = tmp_path / "t.parquet"
    export_trace(trace, out, "parquet")
    rows = pq.read_table(out).to_pylist()
    assert rows == expected_rows(trace)
    assert all(r["step"] is None and r["phase"] is None and r["token_id"] is None for r in rows)
    assert "weight_0" not in rows[0]
    # Empty optional columns read back as absent.
    export_trace(trace, tmp_path / "t.csv", "csv")
    back = import_trace(tmp_path / "t.csv", "long-csv", experts=8)
    assert (back.expert_ids == trace.expert_ids).all()
    assert back.steps is None and back.phase is None and back.token_ids is None


def test_csv_round_trip_through_importer(tmp_path: Path) -> None:
    trace = small_trace()
    out = tmp_path / "t.csv"
    export_trace(trace, out, "csv")
    assert pcsv.read_csv(out).num_rows == 6
    back = import_trace(out, "long-csv", experts=5)
    assert (back.expert_ids == trace.expert_ids).all()
    assert (back.gate_weights == trace.gate_weights).all()  # fp16 values survive float32 text
    for name in ("positions", "steps", "phase", "token_ids"):
        assert (getattr(back, name) == getattr(trace, name)).all(), name
    # Request ids are renumbered by first appearance; the labels keep the exported ids.
    assert back.request_ids.tolist() == [0, 0, 1]
    assert back.meta["request_labels"] == ["7", "9"]
    assert back.moe_layer_indices == [4, 6]


def test_chunked_writing_equals_one_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = synthesize(
        n_experts=300, top_k=3, n_layers=5, n_requests=7, tokens_per_request=13, seed=2
    )
    one = tmp_path / "one.parquet"
    export_trace(trace, one)
    monkeypatch.setattr(export_mod, "_ROWS_PER_CHUNK", 17)  # 3 tokens of 5 layers per chunk
    calls: list[tuple[int, int]] = []
    many = tmp_path / "many.csv"
    export_trace(trace, many, "csv", progress=lambda d, t: calls.append((d, t)))
    assert len(calls) == -(-trace.n_tokens // 3) and calls[-1] == (trace.n_tokens, trace.n_tokens)
    assert pcsv.read_csv(many).to_pylist() == pq.read_table(one).to_pylist() == expected_rows(trace)


def test_bad_format_and_lazy_attribute(tmp_path: Path) -> None:
    with pytest.raises(MoeprofError, match="unknown export format 'xlsx'"):
        export_trace(small_trace(), tmp_path / "t.xlsx", "xlsx")
    assert not (tmp_path / "t.xlsx").exists()
    assert moeprof.export_trace is export_trace


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return int(exc.value.code or 0), capsys.readouterr().err


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace_path = tmp_path / "t.moe"
    small_trace().save(trace_path)
    out = tmp_path / "t.parquet"
    code, err = run_cli(["export", str(trace_path), "-o", str(out)], capsys)
    assert code == 0 and "6 rows" in err
    assert pq.read_table(out).num_rows == 6
    code, err = run_cli(["export", str(trace_path), "-o", str(out)], capsys)
    assert code == 2 and "exists; pass --force" in err
    code, err = run_cli(
        ["export", str(trace_path), "-o", str(tmp_path / "x.json"), "--format", "json"], capsys
    )
    assert code == 2 and err.startswith("moeprof: error: unknown export format 'json'")
    code, err = run_cli(
        ["export", str(tmp_path / "missing.moe"), "-o", str(tmp_path / "y.csv")], capsys
    )
    assert code == 2 and "not found" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.moe", "t.parquet"]
