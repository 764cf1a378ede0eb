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
        ({"expert_ids": np.zeros((2, 2), int)}, "shape"),
        ({"expert_ids": np.full((1, 1, 1), 9)}, "out of range"),
        ({"expert_ids": np.full((1, 1, 1), -1)}, "negative"),
        ({"expert_ids": np.zeros((2, 1, 1), int), "request_ids": [0]}, "request_ids"),
        ({"expert_ids": np.zeros((2, 1, 1), int), "positions": [0, 0]}, "two tokens"),
        ({"expert_ids": np.zeros((1, 2, 1), int), "n_experts": [4, 4, 4]}, "n_experts"),
        ({"expert_ids": np.zeros((1, 1, 1), int), "phase": [3]}, "phase"),
        (
            {"expert_ids": np.zeros((1, 1, 2), int), "gate_weights": np.zeros((1, 1, 3))},
            "gate_weights",
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

    cases = {
        "missing.moe": None,
        "random.moe": np.random.default_rng(0).bytes(4096),
        "tiny.moe": b"abc",
        "truncated.moe": raw[: len(raw) - 100],
        "headeronly.moe": raw[:50],
        "empty.moe": b"",
    }
    for name, data in cases.items():
        p = tmp_path / name
        if data is not None:
            p.write_bytes(data)
        with pytest.raises(MoeprofError):
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
