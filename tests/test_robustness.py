"""Inputs found by fuzzing (tests/data/robustness/README.md): each gives one error line and exit 2,
or, where the input is valid, a correct result."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import moeprof
from moeprof.analyze import analyze, sparse_unique_per_layer, use_bitsets
from moeprof.batching import get_policy
from moeprof.errors import MoeprofError
from moeprof.importers import import_trace
from moeprof.trace import Trace, load_trace

CASES = Path(__file__).resolve().parent / "data" / "robustness"


def _rewrite_doc(path: Path, **changes: object) -> None:
    """Edit the metadata document of a saved trace in place, keeping the arrays."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    doc = json.loads(header["__metadata__"]["moeprof"])
    doc.update(changes)
    header["__metadata__"]["moeprof"] = json.dumps(doc)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _one_line_exit_2(result, match: str) -> None:
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeprof: error:"), result.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "base.moe"
    moeprof.synthesize(n_experts=8, top_k=2, n_layers=4, n_requests=4, tokens_per_request=16).save(
        path
    )
    return path


# ------------------------------------------------------------------ trace metadata


@pytest.mark.parametrize("verb", ["info", "analyze", "export", "replay"])
def test_moe_layer_indices_null_is_refused_by_every_verb(
    run_cli, small_file: Path, tmp_path: Path, verb: str
) -> None:
    _rewrite_doc(small_file, moe_layer_indices=None)
    out = tmp_path / "out.parquet"
    args = {
        "info": ["info", small_file],
        "analyze": ["analyze", small_file],
        "export": ["export", small_file, "-o", out],
        "replay": ["replay", small_file, "--device", "cpu"],
    }[verb]
    _one_line_exit_2(run_cli(*args), "moe_layer_indices must be a list")
    assert not out.exists()


def test_moe_layer_indices_null_info_json_too(run_cli, small_file: Path) -> None:
    _rewrite_doc(small_file, moe_layer_indices=None)
    _one_line_exit_2(run_cli("info", small_file, "--json"), "moe_layer_indices")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("n_tokens", 63, "metadata n_tokens is 63, the arrays say 64"),
        ("n_layers", 5, "metadata n_layers is 5, the arrays say 4"),
        ("top_k", 1, "metadata top_k is 1, the arrays say 2"),
        ("top_k", 2.0, "metadata top_k is 2.0"),
        ("format", "other", "metadata format is 'other'"),
        ("format_version", 2, "metadata format_version is 2, the arrays say 1"),
    ],
)
def test_metadata_fields_that_repeat_the_arrays_are_checked(
    small_file: Path, field: str, value: object, match: str
) -> None:
    assert load_trace(small_file).n_tokens == 64  # the unedited file loads
    _rewrite_doc(small_file, **{field: value})
    with pytest.raises(MoeprofError, match=match):
        load_trace(small_file)


def test_from_arrays_refuses_moe_layer_indices_none() -> None:
    with pytest.raises(MoeprofError, match="moe_layer_indices must be a list"):
        Trace.from_arrays(
            np.zeros((2, 1, 1), dtype=np.uint8), n_experts=4, meta={"moe_layer_indices": None}
        )


# ------------------------------------------------------------------ imports


IMPORT_ERRORS = [
    (
        "03_nested500.jsonl",
        "long-jsonl",
        [],
        "03_nested500.jsonl:2: 1 expert ids where rows have 2",
    ),
    ("04_request_struct.jsonl", "long-jsonl", [], "must hold numbers or text, got struct"),
    (
        "04b_plain.jsonl",
        "long-jsonl",
        ["--request-col", "experts"],
        "request id column 'experts' must hold numbers or text, got list",
    ),
    ("06_slots.csv", "long-csv", [], "1 expert columns but 2 weight columns"),
    ("07_bigfield.csv", "long-csv", [], "07_bigfield.csv:3: expert id 'x'"),
    ("08_badkey.jsonl", "long-jsonl", [], "not UTF-8 text (byte 65)"),
    ("09_badvalue.jsonl", "long-jsonl", [], "not UTF-8 text (byte 17)"),
    ("10_empty_experts.jsonl", "long-jsonl", [], "10_empty_experts.jsonl:1: no expert ids"),
    ("11_plain.csv", "sglang", [], "not a readable torch.save dump (IndexError"),
    ("11_plain.csv", "vllm", [], "not a numpy .npy/.npz file"),
    ("12_bad_header.npy", "vllm", [], "has no valid .npy header"),
    ("13_mutated_a.pt", "sglang", [], "not a readable torch.save dump (KeyError"),
    ("13_mutated_b.pt", "sglang", [], "not a readable torch.save dump (KeyError"),
    ("13_mutated_c.pt", "sglang", [], "not a readable torch.save dump (IndexError"),
]


@pytest.mark.parametrize(("name", "fmt", "extra", "match"), IMPORT_ERRORS)
def test_import_reproducers_are_one_line_errors(
    run_cli, tmp_path: Path, name: str, fmt: str, extra: list[str], match: str
) -> None:
    out = tmp_path / "out.moe"
    result = run_cli("import", CASES / name, "--format", fmt, "-o", out, *extra)
    _one_line_exit_2(result, match)
    assert not out.exists()


def test_null_in_gate_weights_is_imported_as_zero() -> None:
    trace = import_trace(CASES / "05_weights_null.jsonl", "long-jsonl")
    assert trace.expert_ids[:, 0, :].tolist() == [[1, 2], [3, 4]]
    assert trace.gate_weights is not None
    assert trace.gate_weights[:, 0, :].tolist() == [[0.0, 2.0], [0.0, 2.0]]


@pytest.mark.parametrize(
    "text", [b"null\n", b'null\n{"layer":0,"experts":[1]}\n', b'[1]\n{"layer":0,"experts":[1]}\n']
)
def test_jsonl_record_that_is_not_an_object_does_not_crash(tmp_path: Path, text: bytes) -> None:
    # In a child process: the old failure was a segfault inside pyarrow, which would end pytest.
    src = tmp_path / "a.jsonl"
    src.write_bytes(text)
    out = tmp_path / "out.moe"
    proc = subprocess.run(
        [sys.executable, "-m", "moeprof", "import", str(src), "-F", "long-jsonl", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"moeprof: error: {src}:1: a record must be a JSON object"
    assert not out.exists()


def test_bom_is_read_on_both_jsonl_paths(tmp_path: Path) -> None:
    row0 = '{"request_id": 0, "position": 0, "layer": 0, "experts": [1, 2]}\n'
    same = '{"request_id": 0, "position": 1, "layer": 0, "experts": [3, 4]}\n'
    mixed = '{"request_id": "0", "position": 1, "layer": 0, "experts": [3, 4]}\n'
    found = {}
    for name, body in (("fast", row0 + same), ("python", row0 + mixed)):
        src = tmp_path / f"{name}.jsonl"
        src.write_bytes(b"\xef\xbb\xbf" + body.encode())
        trace = import_trace(src, "long-jsonl")
        found[name] = (trace.expert_ids[:, 0, :].tolist(), trace.n_requests)
    assert found["fast"] == ([[1, 2], [3, 4]], 1)
    # "0" and 0 are one request id once the column is read as text.
    assert found["python"] == ([[1, 2], [3, 4]], 1)


# ------------------------------------------------------------------ analysis


def _brute_unique(trace: Trace, batch_size: int) -> list[int]:
    """Σ over consecutive batches of distinct experts per layer, by Python sets."""
    ids = trace.expert_ids.tolist()
    out = []
    for layer in range(trace.n_layers):
        sentinel = int(trace.n_experts[layer])
        total = 0
        for start in range(0, trace.n_tokens, batch_size):
            seen = {e for row in ids[start : start + batch_size] for e in row[layer]}
            seen.discard(sentinel)
            total += len(seen)
        out.append(total)
    return out


def test_many_experts_are_counted_without_bitsets() -> None:
    rng = np.random.default_rng(0)
    n_tokens = 3000
    # Few distinct experts per layer so batches do share some; the sentinel marks empty slots.
    ids = rng.choice([5, 700, 65534, 40000, 65535], size=(n_tokens, 2, 1)).astype(np.uint16)
    trace = Trace.from_arrays(
        ids, n_experts=65535, request_ids=np.arange(n_tokens) // 100, expert_bytes=1 << 20
    )
    assert not use_bitsets(trace)
    result = analyze(trace, [1, 8, 64])
    for row in result.results:
        assert [layer.unique for layer in row.layers] == _brute_unique(trace, row.batch_size)
    plan = next(iter(get_policy("tokens").plans(trace, [8])))
    assert sparse_unique_per_layer(trace, plan).tolist() == _brute_unique(trace, 8)


def test_sparse_and_bitset_counts_agree_on_a_small_trace(monkeypatch) -> None:
    rng = np.random.default_rng(3)
    ids = np.stack([rng.permutation(40)[:3] for _ in range(500)])[:, None, :].repeat(2, axis=1)
    trace = Trace.from_arrays(ids, n_experts=40, request_ids=np.arange(500) // 37)
    assert use_bitsets(trace)
    with_bitsets = analyze(trace, [1, 4, 32], policy="decode").to_dict()
    monkeypatch.setattr(sys.modules["moeprof.analyze"], "use_bitsets", lambda t: False)
    assert (
        analyze(trace, [1, 4, 32], policy="decode").to_dict()["results"] == with_bitsets["results"]
    )


def test_out_of_memory_is_one_error(monkeypatch, small_file: Path) -> None:
    def exhausted(trace: Trace):
        raise MemoryError

    monkeypatch.setattr(sys.modules["moeprof.analyze"], "expert_masks", exhausted)
    with pytest.raises(MoeprofError, match="out of memory analysing 64 tokens x 4 MoE layers"):
        analyze(load_trace(small_file), [8])


def test_byte_totals_reaching_2_63_are_exact(tmp_path: Path) -> None:
    # Every token routes to all 8 experts of 1 TiB in 32 layers: 2^15 x 32 x 8 x 2^40 = 2^63.
    ids = np.broadcast_to(np.arange(8, dtype=np.uint8), (32768, 32, 8))
    trace = Trace.from_arrays(ids, n_experts=8, expert_bytes=1 << 40)
    row = analyze(trace, [8]).results[0]
    assert row.bytes_requested == 2**63
    # 4,096 batches of 8 tokens: each loads the 8 experts once per layer.
    assert row.bytes_unique == 4096 * 32 * 8 * (1 << 40)


def test_cli_analyze_reports_byte_totals_reaching_2_63(run_cli, tmp_path: Path) -> None:
    path = tmp_path / "t.moe"
    ids = np.broadcast_to(np.arange(8, dtype=np.uint8), (32768, 32, 8))
    Trace.from_arrays(ids, n_experts=8, expert_bytes=1 << 40).save(path)
    result = run_cli("analyze", path, "-b", "8", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["results"][0]["bytes_requested"] == 2**63


def test_decode_batches_never_filled_say_so() -> None:
    trace = Trace.from_arrays(np.arange(12).reshape(12, 1, 1) % 6, n_experts=6)
    doc = analyze(trace, [1, 4, 8], policy="decode").to_dict()
    assert [r["memory_savings"] for r in doc["results"]] == [0.0, 0.0, 0.0]
    assert doc["notes"] == [
        "decode batches hold at most 1 token (one per request, and the trace has 1 request): "
        "batch sizes 4, 8 never filled"
    ]
    assert "notes" not in analyze(trace, [1, 4, 8]).to_dict()
