"""Import: long tables (CSV / JSONL), vLLM arrays, SGLang per_token dumps, model configs, bad input."""

from __future__ import annotations

import json
import math
import warnings
from collections import deque
from pathlib import Path

import numpy as np
import pytest

import moeprof
from moeprof.cli import main
from moeprof.errors import MoeprofError
from moeprof.importers import MoeprofImportWarning, import_trace
from moeprof.importers.model_config import load_model_config
from moeprof.importers.sglang import link_sequences
from moeprof.synth import synthesize
from moeprof.trace import PHASE_DECODE, PHASE_PREFILL, load_trace

DATA = Path(__file__).parent / "data" / "import"
CONFIGS = DATA / "configs"


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


# ---------------------------------------------------------------------- long tables


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


BAD_CASES = [
    ("wrong_count.csv", r"bad/wrong_count\.csv:4: 3 expert ids where rows have 2"),
    (
        "non_integer.csv",
        r"bad/non_integer\.csv:3: expert id 'x' in column 'experts' is not an integer",
    ),
    ("missing_column.csv", r"bad/missing_column\.csv: no experts column found"),
    ("ragged.csv", r"bad/ragged\.csv:3: row has 3 fields, the header has 4"),
    ("bad_json.jsonl", r"bad/bad_json\.jsonl:2: not valid JSON"),
    (
        "float_id.jsonl",
        r"bad/float_id\.jsonl:3: expert id 1\.5 in column 'experts' is not an integer",
    ),
    ("missing_key.jsonl", r"bad/missing_key\.jsonl:2: no expert ids"),
    ("duplicate.csv", r"bad/duplicate\.csv:3: expert id 3 appears twice in one row"),
    # Numbers beyond 64 bits: Arrow refuses the text (CSV) or reads a float (JSONL), or the slow
    # JSONL path (a column whose type changes) gets a Python int beyond any Arrow type.
    (
        "huge_int.csv",
        r"bad/huge_int\.csv:3: expert id 99999999999999999999999 in column 'experts' "
        r"does not fit in a 64-bit integer",
    ),
    (
        "huge_int.jsonl",
        r"bad/huge_int\.jsonl:2: layer 1e\+23 in column 'layer' does not fit in a 64-bit integer",
    ),
    (
        "huge_position.jsonl",
        r"bad/huge_position\.jsonl:3: position 18446744073709551615 in column 'position' "
        r"does not fit in a 64-bit integer",
    ),
    # Fits in 64 bits but not in the trace's 32-bit token ids.
    (
        "big_token_id.csv",
        r"bad/big_token_id\.csv:4: token id 9999999999 is out of range "
        r"\(-2147483648\.\.2147483647\)",
    ),
]


@pytest.mark.parametrize(("name", "message"), BAD_CASES)
def test_malformed_rows_name_file_and_line(name: str, message: str) -> None:
    with pytest.raises(MoeprofError, match=message):
        import_trace(DATA / "bad" / name)


@pytest.mark.parametrize(("name", "message"), [*BAD_CASES[:3], *BAD_CASES[-4:]])
def test_cli_malformed_exit_2_one_line_no_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, message: str
) -> None:
    out_path = tmp_path / "t.moe"
    code, _, err = run_cli(["import", str(DATA / "bad" / name), "-o", str(out_path)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeprof: error: ")
    assert "Traceback" not in err
    import re

    assert re.search(message, lines[0])
    assert not out_path.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left either


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
        ('layer,experts\n0,"1 2"\n', {"layer_col": "blk"}, r"no column 'blk' \(--layer-col\)"),
        ('layer,experts\n0,"1 2"\n', {"experts": 0}, r"--experts must be between 1 and 65535"),
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


def test_bad_sources_and_options(tmp_path: Path) -> None:
    with pytest.raises(MoeprofError, match="not found"):
        import_trace(tmp_path / "missing.csv", "long-csv")
    with pytest.raises(MoeprofError, match="holds no long-csv files"):
        import_trace(tmp_path, "long-csv")
    with pytest.raises(MoeprofError, match="unknown import format"):
        import_trace(DATA / "routing.jsonl", "parquet")
    with pytest.raises(MoeprofError, match="cannot tell the format"):
        import_trace(DATA / "configs" / "README.md")
    with pytest.raises(MoeprofError, match="--request-col apply to long-csv and long-jsonl only"):
        import_trace(DATA / "routing.jsonl", "vllm", request_col="x")
    with pytest.raises(MoeprofError, match="not both"):
        import_trace(
            DATA / "routing.jsonl", expert_bytes=1, model_config=CONFIGS / "mixtral-8x7b.json"
        )


def test_cli_import_writes_trace_and_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "r.moe"
    code, _, err = run_cli(
        [
            "import",
            str(DATA / "routing.jsonl"),
            "-o",
            str(out_path),
            "--expert-bytes",
            "1000",
            "--phase",
            "decode",
        ],
        capsys,
    )
    assert code == 0
    assert "warning: dropped 1 of 4 tokens" in " ".join(err.split())
    trace = load_trace(out_path)
    assert trace.n_tokens == 3 and trace.expert_bytes.tolist() == [1000, 1000]
    assert trace.phase is not None and (trace.phase == PHASE_DECODE).all()
    code, _, err = run_cli(["import", str(DATA / "routing.jsonl"), "-o", str(out_path)], capsys)
    assert code == 2 and "exists; pass --force" in err


def test_progress_is_reported_per_file() -> None:
    calls: list[tuple[int, int]] = []
    import_trace(DATA / "long_csv", "long-csv", progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)]


def test_lazy_package_attribute() -> None:
    assert moeprof.import_trace is import_trace


# ---------------------------------------------------------------------- model configs


def swiglu(hidden: int, inter: int, bytes_per_value: int) -> int:
    # gate [inter, hidden], up [inter, hidden], down [hidden, inter]
    return (inter * hidden + inter * hidden + hidden * inter) * bytes_per_value


def test_expert_bytes_mixtral_and_deepseek_v2_lite() -> None:
    mixtral = load_model_config(CONFIGS / "mixtral-8x7b.json")
    assert mixtral.expert_bytes == 3 * 4096 * 14336 * 2 == 352_321_536
    assert mixtral.n_experts == 8 and mixtral.top_k == 2
    assert mixtral.moe_layer_indices == tuple(range(32))
    assert mixtral.shared_expert_bytes == 0
    assert mixtral.architecture == "MixtralForCausalLM"

    ds = load_model_config(CONFIGS / "deepseek-v2-lite.json")
    assert ds.expert_bytes == 3 * 2048 * 1408 * 2 == 17_301_504
    assert ds.n_experts == 64 and ds.top_k == 6
    assert ds.moe_layer_indices == tuple(range(1, 27))  # layer 0 is dense
    # Two shared experts run as one MLP of 2 x 1408.
    assert ds.shared_expert_bytes == swiglu(2048, 2 * 1408, 2)


def test_expert_bytes_other_architectures() -> None:
    qwen15 = load_model_config(CONFIGS / "qwen1.5-moe-a2.7b.json")
    assert qwen15.expert_bytes == swiglu(2048, 1408, 2)
    assert qwen15.n_experts == 60 and len(qwen15.moe_layer_indices) == 24
    # Shared expert of 5632 plus its sigmoid gate (a [1, hidden] linear).
    assert qwen15.shared_expert_bytes == swiglu(2048, 5632, 2) + 2048 * 2

    qwen3 = load_model_config(CONFIGS / "qwen3-30b-a3b.json")
    assert qwen3.expert_bytes == swiglu(2048, 768, 2) and qwen3.shared_expert_bytes == 0
    assert qwen3.n_experts == 128 and len(qwen3.moe_layer_indices) == 48

    olmoe = load_model_config(CONFIGS / "olmoe-1b-7b.json")
    assert olmoe.expert_bytes == swiglu(2048, 1024, 2) and olmoe.n_experts == 64

    # gpt-oss-20b in MXFP4, from its checkpoint's tensor shapes (per expert):
    # gate_up_proj_blocks [5760, 90, 16] u8, _scales [5760, 90] u8, _bias [5760] bf16,
    # down_proj_blocks [2880, 90, 16] u8, _scales [2880, 90] u8, _bias [2880] bf16.
    gpt = load_model_config(CONFIGS / "gpt-oss-20b.json")
    assert (
        gpt.expert_bytes
        == (5760 * 90 * 16 + 5760 * 90 + 5760 * 2 + 2880 * 90 * 16 + 2880 * 90 + 2880 * 2)
        == 13_236_480
    )
    assert gpt.n_experts == 32 and gpt.top_k == 4 and gpt.weight_format == "mxfp4"

    # DeepSeek-V3 FP8: weight [2048, 7168] e4m3 + weight_scale_inv [16, 56] fp32 per projection.
    v3 = load_model_config(CONFIGS / "deepseek-v3.json")
    per_proj = 2048 * 7168 + math.ceil(2048 / 128) * math.ceil(7168 / 128) * 4
    assert v3.expert_bytes == 3 * per_proj
    assert v3.moe_layer_indices == tuple(range(3, 61))
    assert v3.shared_expert_bytes == 3 * per_proj  # one shared expert, same shape


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"model_type": "llama", "torch_dtype": "bfloat16"}, "not one moeprof knows"),
        ({"model_type": "mixtral", "hidden_size": 8}, "no 'torch_dtype' or 'dtype'"),
        (
            {
                "model_type": "mixtral",
                "torch_dtype": "bfloat16",
                "hidden_size": 8,
                "num_hidden_layers": 2,
                "num_local_experts": 4,
            },
            "'intermediate_size' is missing",
        ),
        (
            {
                "model_type": "mixtral",
                "torch_dtype": "bfloat16",
                "quantization_config": {"quant_method": "gptq"},
            },
            "quantization 'gptq' is not supported",
        ),
    ],
)
def test_bad_model_configs(tmp_path: Path, cfg: dict, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(MoeprofError, match=message):
        load_model_config(tmp_path)  # a folder holding config.json works too


def test_import_with_model_config_sets_sizes_counts_and_model(tmp_path: Path) -> None:
    with pytest.warns(
        MoeprofImportWarning, match="routes 2 experts per token; the model config says 6"
    ):
        trace = import_trace(
            DATA / "long_csv", "long-csv", model_config=CONFIGS / "deepseek-v2-lite.json"
        )
    assert trace.n_experts.tolist() == [64, 64]  # from the config, not largest id + 1
    assert trace.expert_bytes.tolist() == [17_301_504, 17_301_504]
    assert trace.meta["shared_expert_bytes"] == swiglu(2048, 2816, 2)
    assert trace.meta["model"]["architecture"] == "DeepseekV2ForCausalLM"
    assert trace.meta["model"]["hidden_size"] == 2048  # replay's FFN shape
    assert trace.meta["model"]["expert_intermediate_size"] == 1408
    # A config with fewer experts than the ids: the row is named.
    tiny = {**json.loads((CONFIGS / "mixtral-8x7b.json").read_text()), "num_local_experts": 4}
    (tmp_path / "config.json").write_text(json.dumps(tiny))
    with pytest.raises(
        MoeprofError, match=r"req_b\.csv:2: expert id 5 is out of range for 4 experts"
    ):
        import_trace(DATA / "long_csv", "long-csv", model_config=tmp_path / "config.json")


# ---------------------------------------------------------------------- vLLM


def vllm_request(
    rng: np.random.Generator, prompt: int, generated: int, layers: int, k: int, e: int
):
    """Arrays as vLLM returns them: int16 [tokens, moe_layers, top_k]; the last generated token
    never runs, so routed_experts has generated - 1 rows."""

    def draw(n: int) -> np.ndarray:
        return np.argsort(rng.random((n, layers, e)), axis=2)[:, :, :k].astype(np.int16)

    return {
        "prompt_routed_experts": draw(prompt),
        "routed_experts": draw(generated - 1),
        "prompt_token_ids": rng.integers(0, 1000, prompt),
        "token_ids": rng.integers(0, 1000, generated),
    }


def test_vllm_npz_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    reqs = [vllm_request(rng, p, g, 26, 6, 64) for p, g in ((5, 4), (3, 7), (8, 2))]
    for i, r in enumerate(reqs):
        np.savez(tmp_path / f"req_{i:03d}.npz", **r)
    trace = import_trace(tmp_path, "vllm", model_config=CONFIGS / "deepseek-v2-lite.json")
    assert trace.moe_layer_indices == list(range(1, 27))
    assert trace.expert_bytes[0] == 17_301_504 and trace.n_experts[0] == 64
    assert trace.phase is not None and trace.token_ids is not None
    row = 0
    for i, r in enumerate(reqs):
        n_p, n_g = len(r["prompt_routed_experts"]), len(r["routed_experts"])
        rows = slice(row, row + n_p + n_g)
        assert (trace.request_ids[rows] == i).all()
        assert trace.positions[rows].tolist() == list(range(n_p + n_g))
        expected = np.concatenate([r["prompt_routed_experts"], r["routed_experts"]])
        assert (trace.expert_ids[rows] == expected).all()
        assert trace.phase[rows].tolist() == [PHASE_PREFILL] * n_p + [PHASE_DECODE] * n_g
        expected_tokens = np.concatenate([r["prompt_token_ids"], r["token_ids"][:n_g]])
        assert trace.token_ids[rows].tolist() == expected_tokens.tolist()
        row += n_p + n_g
    assert row == trace.n_tokens


def test_vllm_npy_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arr = vllm_request(rng, 6, 1 + 1, 4, 2, 8)["prompt_routed_experts"]
    arr[2, 1, 1] = -1  # no expert in that slot
    np.save(tmp_path / "a.npy", arr)
    trace = import_trace(tmp_path / "a.npy", experts=8)
    assert trace.phase is None and trace.n_tokens == 6
    assert trace.expert_ids[2, 1, 1] == 8  # the sentinel
    ok = np.where(arr < 0, 8, arr)
    assert (trace.expert_ids == ok).all()

    np.save(tmp_path / "b.npy", np.zeros((3, 5, 2), np.int16))
    with pytest.raises(
        MoeprofError, match=r"b\.npy: routing has 5 layers x top-2, but .*a\.npy has 4"
    ):
        import_trace([tmp_path / "a.npy", tmp_path / "b.npy"], "vllm")
    np.save(tmp_path / "c.npy", np.array([{"x": 1}], dtype=object))
    with pytest.raises(MoeprofError, match=r"c\.npy: cannot read it without unpickling"):
        import_trace(tmp_path / "c.npy", "vllm")
    np.save(tmp_path / "d.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(MoeprofError, match="must hold integer expert ids"):
        import_trace(tmp_path / "d.npy", "vllm")
    np.savez(tmp_path / "e.npz", x=np.zeros((3, 4, 2)), y=np.zeros((3, 4, 2)))
    with pytest.raises(MoeprofError, match="expected arrays 'prompt_routed_experts'"):
        import_trace(tmp_path / "e.npz", "vllm")
    with pytest.raises(
        MoeprofError,
        match=r"a\.npy: row \d+, MoE layer \d+: expert id \d+ is out of range for 2 experts",
    ):
        import_trace(tmp_path / "a.npy", "vllm", experts=2)
    with pytest.raises(MoeprofError, match="4 MoE layers but the model config has 32"):
        import_trace(tmp_path / "a.npy", "vllm", model_config=CONFIGS / "mixtral-8x7b.json")


# ---------------------------------------------------------------------- SGLang


def simulate_sglang(
    trace,
    *,
    prompt_len: list[int],
    max_running: int,
    chunk: int,
    n_model_layers: int,
    physical_of: list[np.ndarray],
    seed: int = 0,
) -> dict:
    """An SGLang per_token dump of `trace`'s requests under continuous batching with chunked
    prefill, written the way _DetailSinglePassGatherer / _DetailAccumulator write it."""
    import torch

    rng = np.random.default_rng(seed)
    first = np.searchsorted(trace.request_ids, np.arange(trace.n_requests))
    length = np.diff(np.append(first, trace.n_tokens))
    waiting = deque(range(trace.n_requests))
    prefilling: list[int] = []
    running: list[int] = []
    done_upto = {r: 0 for r in range(trace.n_requests)}  # tokens already run
    records = []
    while waiting or prefilling or running:
        if prefilling or (waiting and len(running) + len(prefilling) < max_running):
            batch = list(prefilling)
            while waiting and len(batch) + len(running) < max_running and len(batch) < 2:
                batch.append(waiting.popleft())
            seqs = [(r, min(chunk, prompt_len[r] - done_upto[r])) for r in batch]
            mode, seq_lens = 1, [n for _, n in seqs]
        else:
            seqs, mode, seq_lens = [(r, 1) for r in running], 2, None
        rows, positions = [], []
        for r, n in seqs:
            rows.extend(first[r] + done_upto[r] + np.arange(n))
            positions.extend(done_upto[r] + np.arange(n))
            done_upto[r] += n
        prefilling = [r for r, _ in seqs if mode == 1 and done_upto[r] < prompt_len[r]]
        finished_prefill = [r for r, _ in seqs if mode == 1 and done_upto[r] == prompt_len[r]]
        running = [r for r in running if done_upto[r] < length[r]] + [
            r for r in finished_prefill if done_upto[r] < length[r]
        ]
        rows_arr = np.asarray(rows)
        topk = np.full((n_model_layers, len(rows), 8), -1, dtype=np.int32)
        for layer in range(trace.n_layers):
            logical = trace.expert_ids[rows_arr, layer].astype(np.int64)
            replicas = physical_of[layer][logical]  # [n, k, replicas]
            pick = rng.integers(0, replicas.shape[-1], logical.shape)
            topk[trace.moe_layer_indices[layer], :, : trace.top_k] = np.take_along_axis(
                replicas, pick[..., None], axis=-1
            )[..., 0]
        records.append(
            dict(
                forward_pass_id=len(records) + 100,
                rank=0,
                gatherer_key="primary",
                input_ids=trace.token_ids[rows_arr].tolist(),
                positions=[int(p) for p in positions],
                extend_seq_lens=seq_lens,
                forward_mode=mode,
                topk_ids_of_layer=torch.from_numpy(topk),
                misc_objects=[],
                global_physical_count=torch.zeros((n_model_layers, 10), dtype=torch.int32),
            )
        )
    return {"records": records}


def physical_layout(n_layers: int, n_model_layers: int, moe_layers: list[int], seed: int):
    """EPLB-style layout: 10 physical slots for 8 logical experts (two replicated)."""
    rng = np.random.default_rng(seed)
    to_logical = np.zeros((n_model_layers, 10), dtype=np.int64)
    physical_of = []
    for layer in range(n_layers):
        logical_of_slot = rng.permutation(
            np.concatenate([np.arange(8), rng.choice(8, 2, replace=False)])
        )
        to_logical[moe_layers[layer]] = logical_of_slot
        replicas = np.zeros((8, 2), dtype=np.int64)
        for e in range(8):
            slots = np.flatnonzero(logical_of_slot == e)
            replicas[e] = [slots[0], slots[-1]]
        physical_of.append(replicas)
    return to_logical, physical_of


def test_sglang_per_token_dump_round_trip(tmp_path: Path) -> None:
    import torch

    n_requests = 7
    source = synthesize(
        n_experts=8,
        top_k=2,
        n_layers=3,
        n_requests=n_requests,
        tokens_per_request=[9, 14, 6, 11, 20, 8, 13],
        seed=3,
    )
    lengths = np.bincount(source.request_ids)
    token_ids = np.random.default_rng(5).integers(0, 30000, source.n_tokens)
    source = moeprof.Trace.from_arrays(
        source.expert_ids,
        n_experts=8,
        request_ids=source.request_ids,
        positions=source.positions,
        token_ids=token_ids,
        meta={"moe_layer_indices": [1, 2, 3]},
    )
    # Lockstep pairs occur (requests 0 and 1 prefill side by side); no request finishes while
    # another stands at its position, the one case positions cannot tell apart (see sglang.py).
    prompt_len = [5, 8, 3, 7, 11, 2, 6]
    to_logical, physical_of = physical_layout(3, 4, [1, 2, 3], seed=1)
    dump = simulate_sglang(
        source,
        prompt_len=prompt_len,
        max_running=3,
        chunk=4,
        n_model_layers=4,
        physical_of=physical_of,
    )
    dump["last_physical_to_logical_map"] = torch.from_numpy(to_logical)
    path = tmp_path / "expert_distribution_recorder_1700000000.0_0.pt"
    torch.save(dump, path)

    trace = import_trace(path)  # sglang, from the .pt ending
    assert trace.n_requests == n_requests and trace.n_tokens == source.n_tokens
    assert trace.moe_layer_indices == [1, 2, 3]  # layer 0 never routes: dense
    assert trace.top_k == 2 and trace.n_experts.tolist() == [8, 8, 8]
    # Requests come out in order of first appearance, which is the scheduler's arrival order.
    assert (trace.request_ids == source.request_ids).all()
    assert (trace.positions == source.positions).all()
    assert (trace.expert_ids == source.expert_ids).all()  # physical ids mapped back to logical
    assert trace.token_ids is not None and (trace.token_ids == token_ids).all()
    assert trace.phase is not None
    expected_phase = np.where(source.positions >= np.asarray(prompt_len)[source.request_ids], 1, 0)
    assert (trace.phase == expected_phase).all()
    # Steps are the forward passes: the recorded policy replays them.
    steps_seen = {int(s) for s in trace.steps} if trace.steps is not None else set()
    assert steps_seen == {r["forward_pass_id"] for r in dump["records"]}
    assert lengths.tolist() == np.bincount(trace.request_ids).tolist()


def reference_links(passes: list[tuple[int, list[tuple[int, int]]]]) -> list[int]:
    """The linking rule written out one sequence at a time, to check the vectorised one.

    passes: (forward mode, [(start position, length), ...] in batch order)."""
    open_requests: list[dict] = []  # {"req", "next", "key", "decoding"}
    out: list[int] = []
    n_requests = 0
    for f, (mode, seqs) in enumerate(passes):
        roles = [mode == 2 or (mode == 3 and n == 1 and s > 0) for s, n in seqs]
        taken: list[dict] = []
        result: dict[int, tuple[int, tuple[int, int]]] = {}
        for role in (True, False):  # decode tokens match first, then extend chunks
            for i, (start, _length) in enumerate(seqs):
                if roles[i] != role or start == 0:
                    continue
                waiting = [
                    o
                    for o in open_requests
                    if o["next"] == start and o not in taken and (role or not o["decoding"])
                ]
                if waiting:
                    # Decode: batch order. A chunk: the latest pass first, then batch order.
                    match = min(
                        waiting, key=lambda o: o["key"] if role else (-o["key"][0], o["key"][1])
                    )
                    taken.append(match)
                    result[i] = (match["req"], match["key"] if role else (f, i))
        seen = []
        for i, (start, length) in enumerate(seqs):
            if i not in result:
                result[i] = (n_requests, (f, i))
                n_requests += 1
            req, key = result[i]
            out.append(req)
            seen.append({"req": req, "next": start + length, "key": key, "decoding": roles[i]})
        if mode in (2, 3):
            open_requests = seen  # a decode pass runs every running request
        else:
            open_requests = [o for o in open_requests if o not in taken] + seen
    return out


def test_link_sequences_matches_sequential_rule() -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        n_pass = int(rng.integers(1, 12))
        passes = []
        for _ in range(n_pass):
            mode = int(rng.choice([1, 2, 3]))
            n = int(rng.integers(1, 6))
            seqs = [
                (int(rng.integers(0, 5) * rng.integers(0, 2)), int(rng.integers(1, 3)))
                for _ in range(n)
            ]
            passes.append((mode, seqs))
        seq_pass = np.array([f for f, (_, seqs) in enumerate(passes) for _ in seqs])
        seq_start = np.array([s for _, seqs in passes for s, _ in seqs])
        seq_len = np.array([n for _, seqs in passes for _, n in seqs])
        modes = np.array([m for m, _ in passes])
        got = link_sequences(seq_pass, seq_start, seq_len, modes).tolist()
        assert got == reference_links(passes)


def test_sglang_bad_dumps(tmp_path: Path) -> None:
    import torch

    torch.save({"logical_count": torch.zeros(3)}, tmp_path / "stat.pt")
    with pytest.raises(MoeprofError, match=r"stat\.pt: no 'records' in the dump; .*per_token"):
        import_trace(tmp_path / "stat.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(MoeprofError, match=r"junk\.pt: not a readable torch\.save dump"):
        import_trace(tmp_path / "junk.pt")

    class Evil:
        def __reduce__(self):  # weights_only refuses arbitrary objects: no code runs
            return (print, ("pwned",))

    torch.save({"records": [Evil()]}, tmp_path / "evil.pt")
    with pytest.raises(MoeprofError, match=r"evil\.pt: not a readable torch\.save dump"):
        import_trace(tmp_path / "evil.pt")
    rec = {
        "forward_pass_id": 0,
        "positions": [0, 1],
        "input_ids": [1, 2],
        "forward_mode": 1,
        "extend_seq_lens": [2],
        "topk_ids_of_layer": torch.full((2, 3, 8), -1, dtype=torch.int32),
    }
    torch.save({"records": [rec]}, tmp_path / "short.pt")
    with pytest.raises(MoeprofError, match=r"short\.pt: record 0: 2 positions for 3 tokens"):
        import_trace(tmp_path / "short.pt")


def test_no_warnings_on_clean_import() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import_trace(DATA / "long_csv", "long-csv")


def test_deeply_nested_jsonl_is_refused_not_a_crash(tmp_path: Path) -> None:
    # Arrow's parser would overflow the C stack (segfault) on this; moeprof refuses it in one line.
    path = tmp_path / "deep.jsonl"
    path.write_text(
        '{"request_id": 0, "layer": 0, "experts": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    )
    with pytest.raises(MoeprofError, match=r"deep\.jsonl:1: not valid JSON"):
        import_trace(path, "long-jsonl")


# ---------------------------------------------------------------------- hostile input


DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "num_hidden_layers": 4,
    "n_routed_experts": 8,
    "hidden_size": 64,
    "moe_intermediate_size": 32,
    "torch_dtype": "bfloat16",
}
LLAMA4 = {
    "model_type": "llama4_text",
    "num_hidden_layers": 4,
    "num_local_experts": 8,
    "hidden_size": 64,
    "intermediate_size": 32,
    "torch_dtype": "bfloat16",
}
QWEN = {
    "model_type": "qwen3_moe",
    "num_hidden_layers": 4,
    "num_experts": 8,
    "hidden_size": 64,
    "moe_intermediate_size": 32,
    "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({**QWEN, "num_hidden_layers": 10**9}, "'num_hidden_layers' must be in 1..100000"),
        ({**QWEN, "num_hidden_layers": 0}, "'num_hidden_layers' must be in 1..100000"),
        ({**QWEN, "decoder_sparse_step": 0}, "'decoder_sparse_step' must be in 1"),
        ({**QWEN, "decoder_sparse_step": "2"}, "'decoder_sparse_step' must be an integer"),
        ({**QWEN, "mlp_only_layers": 5}, "'mlp_only_layers' must be a list of integers"),
        ({**QWEN, "mlp_only_layers": ["a"]}, "'mlp_only_layers' must be a list of integers"),
        ({**QWEN, "quantization_config": "fp8"}, "'quantization_config' must be an object"),
        (
            {**QWEN, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}},
            "'weight_block_size' must be a list of two positive integers",
        ),
        (
            {**QWEN, "quantization_config": {"quant_method": "fp8", "weight_block_size": [0, 0]}},
            "'weight_block_size' must be a list of two positive integers",
        ),
        ({**QWEN, "architectures": 5}, "'architectures' must be a list of strings"),
        ({**QWEN, "architectures": [1]}, "'architectures' must be a list of strings"),
        (
            {**QWEN, "shared_expert_intermediate_size": "x"},
            "'shared_expert_intermediate_size' must be an integer",
        ),
        ({**QWEN, "hidden_size": -64}, "'hidden_size' must be in 1"),
        (
            {**DEEPSEEK_V3, "moe_layer_freq": 0},
            "'moe_layer_freq' must be in 1",
        ),
        (
            {**DEEPSEEK_V3, "n_shared_experts": [1]},
            "'n_shared_experts' must be an integer",
        ),
        (
            {**LLAMA4, "interleave_moe_layer_step": 0},
            "'interleave_moe_layer_step' must be in 1",
        ),
        (
            {**LLAMA4, "moe_layers": "1,3"},
            "'moe_layers' must be a list of integers",
        ),
        (
            {**LLAMA4, "moe_layers": [1, 4]},
            "'moe_layers' names layers outside 0..3",
        ),
        (
            {
                "model_type": "jamba",
                "num_hidden_layers": 4,
                "num_experts": 8,
                "hidden_size": 64,
                "intermediate_size": 32,
                "torch_dtype": "bfloat16",
                "expert_layer_period": 0,
            },
            "'expert_layer_period' must be in 1",
        ),
        (
            {"model_type": "dbrx", "n_layers": 4, "d_model": 64, "ffn_config": "x"},
            "'ffn_config' must be an object",
        ),
    ],
)
def test_hostile_model_configs(tmp_path: Path, cfg: dict, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"torch_dtype": "bfloat16", **cfg}))
    with pytest.raises(MoeprofError, match=rf"config\.json: field {message}"):
        load_model_config(path)


def npy_header(shape: tuple[int, ...], descr: str = "<i2") -> bytes:
    """A version 1.0 .npy header declaring `shape`, with no data after it."""
    h = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    h += b" " * (63 - (10 + len(h)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h


def test_vllm_hostile_arrays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import re
    import zipfile

    from moeprof.importers import vllm

    g = np.tile(np.array([0, 1], np.int16), (3, 4, 1))

    def refused(name: str, match: str) -> None:
        with pytest.raises(MoeprofError, match=re.escape(name) + ": .*" + match):
            import_trace(tmp_path / name, "vllm")

    # A header declaring terabytes: refused before anything is allocated.
    (tmp_path / "huge.npy").write_bytes(npy_header((10**12, 4, 2)))
    refused("huge.npy", "declares shape \\[1000000000000, 4, 2\\].*truncated")
    (tmp_path / "trunc.npy").write_bytes(npy_header((100, 4, 2)) + b"\0" * 10)
    refused("trunc.npy", "only 10 bytes follow its header")
    (tmp_path / "negdim.npy").write_bytes(npy_header((-1, 4, 2)))
    refused("negdim.npy", "negative dimension")
    (tmp_path / "td.npy").write_bytes(npy_header((3, 4, 2), "<m8[s]") + b"\0" * 192)
    refused("td.npy", "must hold integer expert ids, got timedelta64")
    (tmp_path / "text.npy").write_text("hello")
    refused("text.npy", "not a numpy .npy/.npz file")
    # More values than one file may hold (the cap lowered here), though the bytes are there.
    monkeypatch.setattr(vllm, "MAX_DECISIONS", 1000)
    (tmp_path / "many.npy").write_bytes(npy_header((126, 4, 2), "|i1") + b"\0" * 1008)
    refused("many.npy", "holds 1008 values, more than the 1000 one file may hold")
    np.savez(
        tmp_path / "many.npz",
        prompt_routed_experts=g,
        routed_experts=np.zeros((125, 4, 2), np.int8),
    )
    refused("many.npz", "'routed_experts' holds 1000 values, more than the 1000")
    # .npz: zip bomb (declared size checked first), foreign and object members, bad token ids.
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("routed_experts.npy", npy_header((3, 4, 2)) + b"\0" * (2 << 20))
    assert (tmp_path / "bomb.npz").stat().st_size < 100_000
    refused("bomb.npz", "member 'routed_experts.npy' unpacks to 2097280 bytes, more than")
    monkeypatch.undo()
    with zipfile.ZipFile(tmp_path / "nonnpy.npz", "w") as z:
        z.writestr("routed_experts.npy", b"x")
    refused("nonnpy.npz", "'routed_experts' has no valid .npy header")
    with zipfile.ZipFile(tmp_path / "txt.npz", "w") as z:
        z.writestr("readme.txt", b"x")
    refused("txt.npz", "member 'readme.txt' is not a .npy array")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    refused("corrupt.npz", "not a readable numpy .npy/.npz file")
    np.savez(tmp_path / "obj.npz", routed_experts=np.array([None], dtype=object))
    refused("obj.npz", "cannot read it without unpickling")
    np.savez(
        tmp_path / "objtok.npz", prompt_routed_experts=g, prompt_token_ids=np.array([None] * 3)
    )
    refused("objtok.npz", "cannot read it without unpickling")
    np.savez(tmp_path / "strtok.npz", prompt_routed_experts=g, prompt_token_ids=np.array(["a"] * 3))
    refused("strtok.npz", "'prompt_token_ids' must hold integer token ids, got <U1")
    np.savez(tmp_path / "ftok.npz", prompt_routed_experts=g, prompt_token_ids=np.zeros(3))
    refused("ftok.npz", "'prompt_token_ids' must hold integer token ids, got float64")

    # The CLI: one line, exit 2, naming the file.
    code, _, err = run_cli(
        ["import", str(tmp_path / "huge.npy"), "-F", "vllm", "-o", str(tmp_path / "o.moe")], capsys
    )
    assert code == 2 and "huge.npy" in err and len(err.strip().splitlines()) == 1

    # Still reads what it should: Fortran order, big-endian, token ids alongside.
    np.save(tmp_path / "f.npy", np.asfortranarray(np.arange(24, dtype=">i4").reshape(3, 4, 2) % 8))
    trace = import_trace(tmp_path / "f.npy", "vllm")
    assert trace.expert_ids.tolist() == (np.arange(24).reshape(3, 4, 2) % 8).tolist()
    np.savez(tmp_path / "ok.npz", prompt_routed_experts=g, prompt_token_ids=np.arange(3))
    assert import_trace(tmp_path / "ok.npz", "vllm").token_ids.tolist() == [0, 1, 2]


def test_sglang_hostile_records(tmp_path: Path) -> None:
    import torch

    ids = torch.full((2, 3, 8), -1, dtype=torch.int32)
    ids[1, :, 0], ids[1, :, 1] = 0, 1

    def rec(**kw: object) -> dict:
        return {
            "topk_ids_of_layer": ids,
            "positions": torch.tensor([0, 1, 2]),
            "forward_mode": 1,
            **kw,
        }

    def refused(dump: object, match: str) -> None:
        torch.save(dump, tmp_path / "d.pt")
        with pytest.raises(MoeprofError, match=rf"d\.pt: {match}"):
            import_trace(tmp_path / "d.pt", "sglang")

    refused({"records": [rec(forward_mode="extend")]}, "record 0: forward_mode must be")
    refused({"records": [rec(forward_pass_id="x")]}, "record 0: forward_pass_id must be")
    refused({"records": [rec(forward_pass_id=2**70)]}, "record 0: forward_pass_id .*int64")
    refused({"records": [rec(forward_pass_id=[1, 2])]}, "record 0: forward_pass_id must be one")
    refused({"records": [rec(topk_ids_of_layer=ids.to_sparse())]}, "record 0: .* dense tensor")
    refused({"records": [rec(topk_ids_of_layer=ids.float())]}, "record 0: .* integers")
    refused({"records": [rec(topk_ids_of_layer=[[["a"]]])]}, "record 0: topk_ids_of_layer")
    refused({"records": [rec(positions=[[0, 1, 2]])]}, "record 0: positions must have 1 dim")
    refused({"records": [rec(positions=["a", "b", "c"])]}, "record 0: positions must hold")
    refused({"records": [rec(positions=[0, [1], 2])]}, "record 0: positions is not a list")
    refused({"records": [rec(positions=None)]}, "record 0: positions is missing")
    refused({"records": [rec(positions=[0, -1, 0])]}, "record 0: positions must not be negative")
    refused({"records": [rec(input_ids="abc")]}, "record 0: input_ids must be integers")
    refused({"records": [rec(extend_seq_lens=[4, -1])]}, "record 0: extend_seq_lens must not")
    refused({"records": [rec(extend_seq_lens="3")]}, "record 0: extend_seq_lens must be")
    bad_map = torch.zeros((2, 2), dtype=torch.int64)
    bad_map[1, 1] = -2
    refused({"records": [rec()], "last_physical_to_logical_map": bad_map}, "last_physical.*-2")
    refused({"records": [rec()], "last_physical_to_logical_map": "x"}, "last_physical.*must be")

    # A tensor of sequence lengths (what SGLang writes) is fine.
    torch.save({"records": [rec(extend_seq_lens=torch.tensor([2, 1]))]}, tmp_path / "ok.pt")
    trace = import_trace(tmp_path / "ok.pt", "sglang")
    assert trace.n_tokens == 3 and trace.request_ids.tolist() == [0, 0, 1]
