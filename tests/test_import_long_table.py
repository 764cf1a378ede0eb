"""Import of long tables (moeprof/importers/long_table.py): CSV / JSONL rows of one (token, MoE
layer) each, column spellings, positions, weights, and every malformed row named by file and line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from import_helpers import BAD_CASES, DATA

from moeprof.errors import MoeprofError
from moeprof.importers import MoeprofImportWarning, import_trace
from moeprof.trace import PHASE_DECODE, PHASE_PREFILL


def test_long_csv_folder_one_request_per_file() -> None:
    trace = import_trace(DATA / "long_csv", "long-csv")
    # req_a.csv then req_b.csv; positions by order of appearance; layers 3, 5 -> 0, 1.
    assert trace.request_ids.tolist() == [0, 0, 1]
    assert trace.positions.tolist() == [0, 1, 0]
    assert trace.moe_layer_indices == [3, 5]
    assert trace.expert_ids.tolist() == [
        [[0, 1], [1, 0]],
        [[2, 3], [3, 2]],
        [[4, 5], [5, 6]],
    ]
    assert trace.n_experts.tolist() == [7, 7]  # largest id + 1
    assert trace.expert_bytes.tolist() == [0, 0]  # unknown
    assert trace.meta["request_labels"] == ["req_a.csv", "req_b.csv"]
    assert trace.meta["source"]["kind"] == "import"
    assert trace.gate_weights is None


@pytest.mark.parametrize(
    "cell", ['"[1, 5]"', '"1 5"', '"1,5"', "1;5", '"(1, 5)"', '"  [1,5] "', '"1\t5"']
)
def test_csv_expert_list_spellings(tmp_path: Path, cell: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(f'layer,experts\n0,{cell}\n1,{cell}\n0,"[2, 3]"\n1,"[3,2]"\n')
    trace = import_trace(path, "long-csv", experts=8)
    assert trace.expert_ids.tolist() == [[[1, 5], [1, 5]], [[2, 3], [3, 2]]]
    assert trace.n_experts.tolist() == [8, 8]


def test_jsonl_request_scope_positions_weights_and_dropped_tokens() -> None:
    with pytest.warns(MoeprofImportWarning, match=r"dropped 1 of 4 tokens.*'humaneval/1'"):
        trace = import_trace(DATA / "routing.jsonl")  # format from the ending
    # dataset + problem_id keep the two problem 1s apart; token_idx is the position.
    assert trace.meta["request_labels"] == ["gsm8k/1", "humaneval/1"]
    assert trace.request_ids.tolist() == [0, 0, 1]
    assert trace.positions.tolist() == [0, 1, 0]
    assert trace.expert_ids.tolist() == [
        [[0, 2], [2, 3]],
        [[3, 1], [1, 0]],
        [[1, 2], [3, 0]],
    ]
    assert trace.gate_weights is not None
    assert trace.gate_weights.astype(float).tolist() == [
        [[0.5, 0.5], [0.625, 0.375]],
        [[0.75, 0.25], [0.875, 0.125]],
        [[0.5, 0.5], [0.5, 0.5]],
    ]
    assert trace.meta["source"]["dropped_tokens"] == 1


def test_named_columns_and_split_expert_columns(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    path.write_text(
        "rq,tok,blk,e0,e1,w0,w1,step,phase,token_id\n"
        "a,0,7,1,2,0.5,0.5,0,prefill,11\n"
        "a,0,9,3,,1.0,,0,prefill,11\n"
        "b,4,7,0,1,0.25,0.75,1,decode,12\n"
        "b,4,9,2,3,0.5,0.5,1,decode,12\n"
    )
    trace = import_trace(
        path,
        "long-csv",
        request_col="rq",
        position_col="tok",
        layer_col="blk",
        experts_col="e0,e1",
        weights_col="w0,w1",
    )
    assert trace.n_experts.tolist() == [4, 4]
    # The empty slot is the sentinel (the layer's expert count): "no expert".
    assert trace.expert_ids.tolist() == [[[1, 2], [3, 4]], [[0, 1], [2, 3]]]
    assert trace.positions.tolist() == [0, 4]
    assert trace.moe_layer_indices == [7, 9]
    assert trace.steps is not None and trace.steps.tolist() == [0, 1]
    assert trace.phase is not None and trace.phase.tolist() == [PHASE_PREFILL, PHASE_DECODE]
    assert trace.token_ids is not None and trace.token_ids.tolist() == [11, 12]
    assert trace.gate_weights is not None
    assert trace.gate_weights[0, 1].astype(float).tolist() == [1.0, 0.0]


def test_positions_by_appearance_within_request_and_layer(tmp_path: Path) -> None:
    # Layer-major rows (as DeepSeek and Mixtral dumps are): position = rank within (request, layer).
    path = tmp_path / "t.jsonl"
    rows = [
        {"request_id": r, "layer": layer, "experts": [r * 10 + layer * 3 + t, 0]}
        for r in (5, 2)
        for layer in (0, 1)
        for t in range(3)
    ]
    path.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    trace = import_trace(path, "long-jsonl", experts=64)
    assert trace.meta["request_labels"] == ["5", "2"]  # order of first appearance
    expected = [[[r * 10 + layer * 3 + t, 0] for layer in (0, 1)] for r in (5, 2) for t in range(3)]
    assert trace.expert_ids.tolist() == expected
    assert trace.positions.tolist() == [0, 1, 2, 0, 1, 2]


def test_jsonl_with_mixed_types_goes_through_python_path(tmp_path: Path) -> None:
    # pyarrow refuses a column whose type changes; the slow path reads it anyway.
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"request_id": 1, "layer": 0, "experts": [1, 2]}\n'
        '{"request_id": "x", "layer": 0, "experts": "3 4"}\n'
    )
    trace = import_trace(path, "long-jsonl")
    assert trace.meta["request_labels"] == ["1", "x"]
    assert trace.expert_ids.tolist() == [[[1, 2]], [[3, 4]]]


@pytest.mark.parametrize(("name", "message"), BAD_CASES)
def test_malformed_rows_name_file_and_line(name: str, message: str) -> None:
    with pytest.raises(MoeprofError, match=message):
        import_trace(DATA / "bad" / name)


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ('layer,experts\n0,"1 2"\n0,"-1 2"\n', {}, r"t\.csv:3: expert id -1 is negative"),
        (
            'layer,experts\n0,"1 2"\n0,"9 2"\n',
            {"experts": 8},
            r"t\.csv:3: expert id 9 is out of range for 8",
        ),
        (
            'request_id,position,layer,experts\n0,0,0,"1 2"\n0,0,0,"3 4"\n',
            {},
            r"t\.csv:3: a second row for request '0', position 0, layer 0 \(first at .*t\.csv:2\)",
        ),
        (
            'layer,experts\nx,"1 2"\n',
            {},
            r"t\.csv:2: layer 'x' in column 'layer' is not an integer",
        ),
        ('layer,experts\n0,"1 2"\n', {"layer_col": "blk"}, r"no column 'blk' \(layer_col\)"),
        ('layer,experts\n0,"1 2"\n', {"experts": 0}, r"experts must be between 1 and 65535"),
        (
            'layer,experts,weights\n0,"1 2","0.5"\n',
            {},
            r"t\.csv:2: 1 gate weights where rows have 2",
        ),
        ('layer,experts,weights\n0,"1 2","0.5 a"\n', {}, r"t\.csv:2: gate weight 'a' in column"),
        ('layer,experts\n0,""\n', {}, r"t\.csv:2: no expert ids"),
        ("layer,experts\n", {}, r"t\.csv: no data rows"),
        (
            'request_id,position,layer,experts,step\n0,0,0,"1 2",0\n0,0,1,"3 4",1\n',
            {},
            r"t\.csv:3: step differs from the token's other layers",
        ),
        # Integers beyond 64 bits, in every integer column, and beyond what a trace holds.
        (
            "layer,expert_0,expert_1\n0,1,2\n1,1,\n2,3,-99999999999999999999\n",
            {},
            r"t\.csv:4: expert id -99999999999999999999 in column 'expert_1' does not fit in a "
            r"64-bit integer",
        ),
        (
            'layer,experts\n0,"1 2"\n' + "9" * 5000 + ',"1 2"\n',
            {},
            r"t\.csv:3: layer 9{57}\.\.\. in column 'layer' does not fit in a 64-bit integer$",
        ),
        (
            'request_id,position,layer,experts\n0,99999999999999999999,0,"1 2"\n',
            {},
            r"t\.csv:2: position 99999999999999999999 in column 'position' does not fit",
        ),
        (
            'request_id,position,layer,experts,step\n0,0,0,"1 2",99999999999999999999\n',
            {},
            r"t\.csv:2: step 99999999999999999999 in column 'step' does not fit",
        ),
        (
            'request_id,position,layer,experts\n0,2147483648,0,"1 2"\n',
            {},
            r"t\.csv:2: position 2147483648 is out of range \(0\.\.2147483647\)",
        ),
        (
            'layer,experts\n0,"1 2"\n-3,"1 2"\n',
            {},
            r"t\.csv:3: layer -3 is negative",
        ),
        (
            'layer,experts\n0,"1 2"\n2147483648,"1 2"\n',
            {},
            r"t\.csv:3: layer 2147483648 is out of range \(0\.\.2147483647\)",
        ),
        (
            'request_id,position,layer,experts,step\n0,0,0,"1 2",2147483648\n',
            {},
            r"t\.csv:2: step 2147483648 is out of range \(-2147483648\.\.2147483647\)",
        ),
        (
            'layer,experts\n0,"1 2"\n0,"1 70000"\n',
            {},
            r"t\.csv:3: expert id 70000 is out of range \(a trace holds at most 65535 experts",
        ),
        (
            # The value of the row named, not the smallest in the file.
            'request_id,position,layer,experts\n0,1,0,"1 2"\n0,-2,0,"1 2"\n0,-7,0,"1 2"\n',
            {},
            r"t\.csv:3: position -2 is negative",
        ),
    ],
)
def test_more_bad_rows(tmp_path: Path, text: str, kwargs: dict, message: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(MoeprofError, match=message):
        import_trace(path, "long-csv", **kwargs)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # pyarrow reads a JSON integer beyond int64 as a float; it must not wrap to a negative id.
        ('{"layer": 0, "experts": [1, 1e30]}\n', r"t\.jsonl:1: expert id 1e\+30 in column"),
        (
            '{"layer": 0, "experts": [1, 2], "step": 99999999999999999999}\n',
            r"t\.jsonl:1: step 1e\+20 in column 'step' does not fit in a 64-bit integer",
        ),
        (
            '{"layer": 0, "experts": [1, 2], "token_id": -9999999999}\n',
            r"t\.jsonl:1: token id -9999999999 is out of range",
        ),
        # The slow path (a column whose type changes between rows) with integers beyond 64 bits.
        (
            '{"layer": 0, "experts": [1, 2]}\n{"layer": 1, "experts": "1 2"}\n'
            '{"layer": 2, "experts": [1, 99999999999999999999]}\n',
            r"t\.jsonl:3: expert id 99999999999999999999 in column 'experts' does not fit",
        ),
        (
            '{"layer": 0, "experts": [1, 2]}\n{"layer": "1", "experts": [1, 2]}\n'
            '{"layer": -99999999999999999999, "experts": [1, 2]}\n',
            r"t\.jsonl:3: layer -99999999999999999999 in column 'layer' does not fit",
        ),
        (
            '{"layer": 0, "experts": [1, 2]}\n{"layer": 99999999999999999999, "experts": "1 2"}\n',
            r"t\.jsonl:2: layer 99999999999999999999 in column 'layer' does not fit",
        ),
    ],
)
def test_huge_integers_in_jsonl(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    with pytest.raises(MoeprofError, match=message):
        import_trace(path, "long-jsonl")


def test_signed_integers_and_large_integer_weights_import(tmp_path: Path) -> None:
    # Arrow's integer parser refuses a leading "+"; a huge integer weight loses precision only.
    path = tmp_path / "t.csv"
    path.write_text('layer,position,experts\n+0,+0,"+1 2"\n 0 , 1 ,"1 +3"\n')
    trace = import_trace(path)
    assert trace.positions.tolist() == [0, 1]
    assert trace.expert_ids[:, 0, :].tolist() == [[1, 2], [1, 3]]
    jsonl = tmp_path / "w.jsonl"
    jsonl.write_text('{"layer": 0, "experts": [1, 2], "weights": [1, 9007199254740993]}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = import_trace(jsonl).gate_weights
    assert weights is not None and weights[0, 0, 0] == 1


def test_deeply_nested_jsonl_is_refused_not_a_crash(tmp_path: Path) -> None:
    # Arrow's parser would overflow the C stack (segfault) on this; moeprof refuses it in one line.
    path = tmp_path / "deep.jsonl"
    path.write_text(
        '{"request_id": 0, "layer": 0, "experts": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    )
    with pytest.raises(MoeprofError, match=r"deep\.jsonl:1: not valid JSON"):
        import_trace(path, "long-jsonl")
