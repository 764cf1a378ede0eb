"""Trace format v1: exact round trip, memory-mapped loading, and refusal of what it cannot read."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, random_trace

import moeprof
from moeprof.errors import MoeprofError
from moeprof.trace import FORMAT_VERSION, Trace, load_trace


def full_trace(rng: np.random.Generator) -> Trace:
    n = 30
    ids = np.stack([np.argsort(rng.random((n, 8)), axis=1)[:, :2] for _ in range(3)], axis=1)
    return Trace.from_arrays(
        ids,
        n_experts=[8, 8, 8],
        request_ids=rng.integers(0, 4, n),
        positions=rng.permutation(n),
        gate_weights=rng.random((n, 3, 2)).astype(np.float16),
        steps=rng.integers(0, 10, n),
        phase=rng.integers(0, 2, n),
        token_ids=rng.integers(0, 50_000, n),
        expert_bytes=[11, 22, 33],
        meta={
            "model": {"id": "m", "architecture": "MixtralForCausalLM", "revision": "abc"},
            "moe_layer_indices": [1, 3, 5],
            "shared_expert_bytes": 7,
            "source": {"kind": "test"},
        },
    )


def test_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    trace = full_trace(rng)
    path = tmp_path / "t.moe"
    trace.save(path)
    loaded = load_trace(path)
    for name, arr in trace.arrays().items():
        got = getattr(loaded, name)
        assert got.dtype == arr.dtype and np.array_equal(got, arr), name
    assert set(loaded.arrays()) == {
        "expert_ids",
        "request_ids",
        "positions",
        "gate_weights",
        "steps",
        "phase",
        "token_ids",
    }
    assert loaded.n_experts.tolist() == [8, 8, 8]
    assert loaded.expert_bytes.tolist() == [11, 22, 33]
    assert loaded.meta == trace.meta
    assert loaded.moe_layer_indices == [1, 3, 5]
    assert loaded.metadata() == trace.metadata()


def test_round_trip_random_shapes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for i in range(25):
        trace = random_trace(rng)
        path = tmp_path / f"t{i}.moe"
        trace.save(path)
        loaded = load_trace(path)
        for name, arr in trace.arrays().items():
            assert np.array_equal(getattr(loaded, name), arr)
        assert loaded.n_experts.tolist() == trace.n_experts.tolist()


def test_loading_is_a_memory_map(tmp_path: Path) -> None:
    trace = moeprof.synthesize(n_layers=2, seed=0)
    path = tmp_path / "t.moe"
    trace.save(path)
    loaded = load_trace(path)
    assert not loaded.expert_ids.flags.owndata and not loaded.expert_ids.flags.writeable
    import mmap

    base = loaded.expert_ids
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    assert isinstance(base, mmap.mmap)


def test_ids_use_one_byte_up_to_255_experts() -> None:
    ids = np.array([[[0, 254]]])
    assert Trace.from_arrays(ids, n_experts=255).expert_ids.dtype == np.uint8
    assert Trace.from_arrays(ids, n_experts=256).expert_ids.dtype == np.uint16


def test_rows_put_in_request_major_order() -> None:
    ids = np.arange(5).reshape(5, 1, 1)
    trace = Trace.from_arrays(
        ids, n_experts=8, request_ids=[2, 1, 2, 1, 0], positions=[1, 5, 0, 2, 0]
    )
    assert trace.request_ids.tolist() == [0, 1, 1, 2, 2]
    assert trace.positions.tolist() == [0, 2, 5, 0, 1]
    assert trace.expert_ids[:, 0, 0].tolist() == [4, 3, 1, 2, 0]


def test_default_positions_follow_appearance_within_request() -> None:
    ids = np.arange(5).reshape(5, 1, 1)
    trace = Trace.from_arrays(ids, n_experts=8, request_ids=[1, 0, 1, 0, 1])
    assert trace.positions.tolist() == [0, 1, 0, 1, 2]
    assert trace.expert_ids[:, 0, 0].tolist() == [1, 3, 0, 2, 4]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"expert_ids": np.zeros((2, 2), int)}, r"expert_ids must have shape \[tokens"),
        ({"expert_ids": np.full((1, 1, 1), 9)}, "expert id 9 at token 0, layer 0 is out of range"),
        ({"expert_ids": np.full((1, 1, 1), -1)}, "expert_ids must not be negative"),
        (
            {"expert_ids": np.zeros((2, 1, 1), int), "request_ids": [0]},
            r"request_ids must have shape \[2\]",
        ),
        (
            {"expert_ids": np.zeros((2, 1, 1), int), "positions": [0, 0]},
            "request 0 has two tokens at position 0",
        ),
        (
            {"expert_ids": np.zeros((1, 2, 1), int), "n_experts": [4, 4, 4]},
            "n_experts must be one int or one value per MoE layer",
        ),
        (
            {"expert_ids": np.zeros((1, 1, 1), int), "phase": [3]},
            r"phase must be 0 \(prefill\) or 1 \(decode\)",
        ),
        (
            {"expert_ids": np.array([[[0, 1]]]), "gate_weights": np.zeros((1, 1, 3))},
            r"gate_weights must have shape \(1, 1, 2\)",
        ),
        ({"expert_ids": np.array([[[1, 2, 1]]])}, "names expert 1 twice in layer 0"),
        (
            {"expert_ids": np.array([[[2**63, 0]]], dtype=np.uint64)},
            "expert id 9223372036854775808 .* out of range",
        ),
        (
            {"expert_ids": np.zeros((1, 1, 1), int), "phase": [256]},
            r"phase must be 0 \(prefill\) or 1 \(decode\)",
        ),
        (
            {"expert_ids": np.zeros((1, 1, 1), int), "request_ids": [2**31]},
            "request_ids must lie in",
        ),
        (
            {"expert_ids": np.zeros((1, 1, 1), int), "positions": [-(2**40)]},
            "positions must lie in",
        ),
        ({"expert_ids": np.zeros((1, 1, 1), int), "steps": [2**32]}, "steps must lie in"),
        ({"expert_ids": np.zeros((1, 1, 1), int), "token_ids": [2**31]}, "token_ids must lie in"),
        (
            {"expert_ids": np.zeros((1, 1, 1), int), "gate_weights": [[["x"]]]},
            "gate_weights must be numbers",
        ),
        (
            {"expert_ids": np.zeros((1, 1, 1), int), "expert_bytes": 2**41},
            "expert_bytes must be between 0 and",
        ),
        (
            {"expert_ids": np.zeros((1, 1, 1), int), "meta": {"model": "m"}},
            "metadata 'model' must be an object",
        ),
        (
            {"expert_ids": np.zeros((1, 1, 1), int), "meta": {"source": [1]}},
            "metadata 'source' must be an object",
        ),
        (
            {"expert_ids": np.zeros((1, 2, 1), int), "meta": {"moe_layer_indices": [0]}},
            "moe_layer_indices names 1 layers, expert_ids has 2",
        ),
        (
            {"expert_ids": np.zeros((1, 1, 1), int), "meta": {"moe_layer_indices": ["a"]}},
            "moe_layer_indices must be a list of whole numbers",
        ),
        (
            {"expert_ids": np.zeros((1, 1, 1), int), "meta": {"shared_expert_bytes": "1"}},
            "shared_expert_bytes must be a whole number of bytes",
        ),
    ],
)
def test_from_arrays_rejects_bad_input(kwargs: dict, match: str) -> None:
    kwargs.setdefault("n_experts", 4)
    ids = kwargs.pop("expert_ids")
    with pytest.raises(MoeprofError, match=match):
        Trace.from_arrays(ids, **kwargs)


def test_sentinel_is_allowed() -> None:
    trace = Trace.from_arrays(np.array([[[0, 4]]]), n_experts=4)
    assert trace.expert_ids.tolist() == [[[0, 4]]]


def _rewrite_metadata(path: Path, update: dict) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update(update)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    trace = moeprof.synthesize(n_layers=2, seed=0)
    good = tmp_path / "good.moe"
    trace.save(good)
    raw = good.read_bytes()

    cases = {  # file name: (bytes, what the refusal says)
        "missing.moe": (None, r"trace file .*missing\.moe not found"),
        "random.moe": (np.random.default_rng(0).bytes(4096), r"\(bad header length\)"),
        "tiny.moe": (b"abc", r"\(file too short\)"),
        "truncated.moe": (raw[: len(raw) - 100], r"\(file is truncated\)"),
        "headeronly.moe": (raw[:50], r"\(bad header length\)"),
        "empty.moe": (b"", r"\(file too short\)"),
    }
    for name, (data, message) in cases.items():
        p = tmp_path / name
        if data is not None:
            p.write_bytes(data)
        with pytest.raises(MoeprofError, match=message):
            load_trace(p)

    newer = tmp_path / "newer.moe"
    newer.write_bytes(raw)
    _rewrite_metadata(newer, {"format_version": str(FORMAT_VERSION + 1)})
    with pytest.raises(MoeprofError, match="newer"):
        load_trace(newer)

    other = tmp_path / "other.safetensors"
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, np.float32)}, str(other))
    with pytest.raises(MoeprofError, match="moeprof"):
        load_trace(other)


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = moeprof.synthesize(n_layers=1, seed=0)
    path = tmp_path / "t.moe"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        trace.save(path)
    assert list(tmp_path.iterdir()) == []


def test_checked_in_v1_fixture_still_reads() -> None:
    """A file written by format v1 must stay readable by every later moeprof."""
    trace = load_trace(DATA / "format-v1" / "all-arrays.moe")
    expected = json.loads((DATA / "format-v1" / "expected.json").read_text())
    assert trace.metadata()["format_version"] == 1
    for name, values in expected["arrays"].items():
        arr = getattr(trace, name)
        assert str(arr.dtype) == values["dtype"]
        assert np.asarray(arr).tolist() == values["data"]
    assert trace.n_experts.tolist() == expected["n_experts"]
    assert trace.expert_bytes.tolist() == expected["expert_bytes"]


def _write_raw(path: Path, arrays: dict[str, np.ndarray], doc: dict, version: str = "1") -> None:
    """A safetensors file with moeprof metadata, bypassing Trace's own checks."""
    from safetensors.numpy import save_file

    meta = {"format": "moeprof-trace", "format_version": version, "moeprof": json.dumps(doc)}
    save_file(arrays, str(path), metadata=meta)


def _raw_case(change: str) -> tuple[dict[str, np.ndarray], dict, str]:
    """A valid 2-token trace's arrays and metadata, then one named defect applied."""
    arrays = {
        "expert_ids": np.array([[[0, 1]], [[2, 3]]], dtype=np.uint8),
        "request_ids": np.array([0, 0], dtype=np.int32),
        "positions": np.array([0, 1], dtype=np.int32),
    }
    doc: dict = {"n_experts": [4], "expert_bytes": [10], "moe_layer_indices": [0]}
    version = "1"
    if change == "n_experts float":
        doc["n_experts"] = [4.5]
    elif change == "n_experts zero":
        doc["n_experts"] = [0]
    elif change == "n_experts too many":
        doc["n_experts"] = [4, 4]
    elif change == "expert_bytes negative":
        doc["expert_bytes"] = [-1]
    elif change == "expert_bytes string":
        doc["expert_bytes"] = ["10"]
    elif change == "ids dtype":
        arrays["expert_ids"] = arrays["expert_ids"].astype(np.uint16)
    elif change == "rows unsorted":
        arrays["positions"] = np.array([1, 0], dtype=np.int32)
    elif change == "rows repeated":
        arrays["positions"] = np.array([0, 0], dtype=np.int32)
    elif change == "version not integer":
        version = "1.0"
    elif change == "layer indices length":
        doc["moe_layer_indices"] = [0, 1]
    elif change == "model not object":
        doc["model"] = "mixtral"
    elif change == "shared bytes float":
        doc["shared_expert_bytes"] = 1.5
    elif change == "id out of range":
        arrays["expert_ids"] = np.array([[[0, 1]], [[2, 5]]], dtype=np.uint8)
    elif change == "duplicate id":
        arrays["expert_ids"] = np.array([[[0, 1]], [[3, 3]]], dtype=np.uint8)
    elif change == "phase value":
        arrays["phase"] = np.array([0, 2], dtype=np.uint8)
    elif change == "doc not object":
        doc = [1]  # type: ignore[assignment]
    return arrays, doc, version


DEFECTS = {
    "n_experts float": r"n_experts must be whole numbers, got \[4\.5\]",
    "n_experts zero": "n_experts must be between 1 and 65535",
    "n_experts too many": "n_experts must be one int or one value per MoE layer",
    "expert_bytes negative": "expert_bytes must be between 0 and",
    "expert_bytes string": "expert_bytes must be whole numbers",
    "ids dtype": "expert_ids is uint16, expected uint8",
    "rows unsorted": r"rows are not in \(request, position\) order at row 1",
    "rows repeated": r"request 0 has two tokens at position 0: .*\(request, position\) order",
    "version not integer": "format version is not a whole number",
    "layer indices length": "moe_layer_indices names 2 layers, expert_ids has 1",
    "model not object": "metadata 'model' must be an object",
    "shared bytes float": "shared_expert_bytes must be a whole number of bytes",
    "id out of range": "expert id 5 at token 1, layer 0 is out of range",
    "duplicate id": "token 1 names expert 3 twice in layer 0",
    "phase value": r"phase must be 0 \(prefill\) or 1 \(decode\)",
    "doc not object": "metadata document is not a JSON object",
}


def test_raw_case_is_valid_before_its_defect(tmp_path: Path) -> None:
    arrays, doc, version = _raw_case("none")
    _write_raw(tmp_path / "ok.moe", arrays, doc, version)
    assert load_trace(tmp_path / "ok.moe").expert_ids.tolist() == [[[0, 1]], [[2, 3]]]


@pytest.mark.parametrize("change", sorted(DEFECTS))
def test_load_refuses_inconsistent_files(tmp_path: Path, change: str) -> None:
    arrays, doc, version = _raw_case(change)
    path = tmp_path / "bad.moe"
    _write_raw(path, arrays, doc, version)
    with pytest.raises(MoeprofError, match=DEFECTS[change]):
        load_trace(path)


def test_load_refuses_bytes_outside_the_arrays(tmp_path: Path) -> None:
    trace = moeprof.synthesize(n_layers=2, seed=0)
    good = tmp_path / "good.moe"
    trace.save(good)
    trailing = tmp_path / "trailing.moe"
    trailing.write_bytes(good.read_bytes() + b"\0" * 16)
    with pytest.raises(MoeprofError, match="size does not match"):
        load_trace(trailing)

    # Two arrays claiming the same bytes (and so leaving a gap elsewhere).
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["positions"]["data_offsets"] = header["request_ids"]["data_offsets"]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    overlap = tmp_path / "overlap.moe"
    overlap.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])
    with pytest.raises(MoeprofError, match="overlap or leave gaps"):
        load_trace(overlap)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format_version": "²"}, "version"),
        ({"format_version": "١"}, "version"),
        ({"n_experts": [2**70]}, "n_experts"),
        ({"expert_bytes": [2**64]}, "expert_bytes"),
        ({"moe_layer_indices": [2**31]}, "moe_layer_indices"),
    ],
)
def test_load_refuses_out_of_range_metadata(tmp_path: Path, change: dict, match: str) -> None:
    arrays, doc, version = _raw_case("none")
    version = change.pop("format_version", version)
    doc.update(change)
    _write_raw(tmp_path / "bad.moe", arrays, doc, version)
    with pytest.raises(MoeprofError, match=match):
        load_trace(tmp_path / "bad.moe")


def _rewrite_header(src: Path, dst: Path, edit) -> None:
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = edit(raw[8 : 8 + n].decode())
    new = text.encode() + b" " * (-len(text.encode()) % 8)
    dst.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_load_refuses_hostile_headers(tmp_path: Path) -> None:
    arrays, doc, version = _raw_case("none")
    good = tmp_path / "good.moe"
    _write_raw(good, arrays, doc, version)
    header = json.loads(_header_text(good))
    shape = header["positions"]["shape"]
    offsets = header["positions"]["data_offsets"]

    def replace(old: str, new: str):
        return lambda text: text.replace(old, new, 1)

    bad_range = r"array 'positions' has a bad shape or byte range"
    cases = {  # name: (header edit, what the refusal says)
        "inf shape": (replace(json.dumps(shape).replace(" ", ""), "[1e400]"), bad_range),
        "float offset": (
            replace(json.dumps(offsets).replace(" ", ""), f"[{offsets[0]}.0,{offsets[1]}]"),
            bad_range,
        ),
        "wrapping shape": (
            replace(json.dumps(shape).replace(" ", ""), f"[{2**62},4,0]"),
            r"array 'positions' size does not match its shape",
        ),
        "deep header": (lambda text: "[" * 100_000 + "]" * 100_000, r"header is not JSON"),
        "huge int": (
            replace(json.dumps(shape).replace(" ", ""), "[" + "9" * 5000 + "]"),
            r"header is not JSON",
        ),
    }
    for name, (edit, message) in cases.items():
        bad = tmp_path / f"{name}.moe"
        _rewrite_header(good, bad, edit)
        assert bad.read_bytes() != good.read_bytes(), name
        with pytest.raises(MoeprofError, match=message):
            load_trace(bad)


def _header_text(path: Path) -> str:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + n].decode()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_experts": 8.9}, "whole numbers"),
        ({"n_experts": "abc"}, "whole numbers"),
        ({"n_experts": None}, "whole numbers"),
        ({"n_experts": 4, "expert_bytes": 10**23}, "expert_bytes"),
        ({"n_experts": [4, 2**70]}, "n_experts"),
    ],
)
def test_from_arrays_checks_per_layer_values_before_casting(kwargs: dict, match: str) -> None:
    ids = np.zeros(
        (1, len(kwargs["n_experts"]) if isinstance(kwargs["n_experts"], list) else 1, 1), int
    )
    with pytest.raises(MoeprofError, match=match):
        Trace.from_arrays(ids, **kwargs)
