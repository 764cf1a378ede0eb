"""Sharded traces: several files read as one logical trace, `moeprof merge`, and the chunked
check of a loaded file (moeprof/shards.py, moeprof/trace.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import random_trace
from safetensors.numpy import save_file

import moeprof.trace as trace_module
from moeprof import analyze
from moeprof.errors import MoeprofError
from moeprof.shards import first_difference, load_traces, open_shards, shard_paths
from moeprof.trace import Trace, load_trace


def _shards(tmp_path: Path, seed: int = 0, n: int = 3, **kw: object) -> list[Trace]:
    rng = np.random.default_rng(seed)
    shape = {"n_layers": 2, "top_k": 2, "n_experts": [8, 70]}
    shape.update(kw)
    traces = [random_trace(rng, n_tokens=int(rng.integers(5, 40)), **shape) for _ in range(n)]
    for i, t in enumerate(traces):
        t.expert_bytes = np.full(t.n_layers, 512, dtype=np.int64)  # one model: one size
        t.save(tmp_path / f"part-{i:02d}.moe")
    return traces


def _concatenated(traces: list[Trace]) -> Trace:
    """The logical trace written out by hand: rows one after another, each shard's requests and
    steps renumbered after the previous shard's."""
    ids, req, pos, steps = [], [], [], []
    next_request, next_step = 0, 0
    for t in traces:
        ids.append(np.asarray(t.expert_ids))
        numbering: dict[int, int] = {}
        for r in t.request_ids.tolist():
            numbering.setdefault(r, next_request + len(numbering))
        req.append([numbering[r] for r in t.request_ids.tolist()])
        next_request += len(numbering)
        pos.append(t.positions)
        s = t.steps.astype(np.int64)
        steps.append(s - s.min() + next_step)
        next_step += int(s.max() - s.min()) + 1
    return Trace.from_arrays(
        np.concatenate(ids),
        n_experts=traces[0].n_experts,
        request_ids=np.concatenate(req),
        positions=np.concatenate(pos),
        steps=np.concatenate(steps),
        expert_bytes=traces[0].expert_bytes,
    )


def test_shard_paths_file_folder_glob_and_list(tmp_path: Path) -> None:
    _shards(tmp_path)
    (tmp_path / "notes.txt").write_text("not a trace")
    names = ["part-00.moe", "part-01.moe", "part-02.moe"]
    assert [p.name for p in shard_paths(tmp_path)] == names
    assert [p.name for p in shard_paths(str(tmp_path / "part-0[12].moe"))] == names[1:]
    assert [p.name for p in shard_paths(tmp_path / "part-01.moe")] == names[1:2]
    listed = [tmp_path / "part-02.moe", tmp_path / "part-00.moe"]
    assert shard_paths(listed) == listed  # a list keeps the order given


@pytest.mark.parametrize(
    "spec, match",
    [
        ("empty", "holds no .moe trace files"),
        ("nothing-*.moe", "no trace files match"),
        ("twice", "named twice"),
        ("missing.moe", "not found"),
    ],
)
def test_shard_paths_refuses(tmp_path: Path, spec: str, match: str) -> None:
    _shards(tmp_path, n=1)
    (tmp_path / "empty").mkdir()
    arg: object = str(tmp_path / spec)
    if spec == "twice":
        arg = [tmp_path / "part-00.moe", tmp_path / "part-00.moe"]
    with pytest.raises(MoeprofError, match=match):
        open_shards(arg)  # type: ignore[arg-type]


def test_logical_trace_equals_the_hand_concatenation(tmp_path: Path) -> None:
    traces = _shards(tmp_path)
    expected = _concatenated(traces)
    shards = open_shards(tmp_path)
    whole = shards.to_trace()
    for name in ("expert_ids", "request_ids", "positions", "steps"):
        np.testing.assert_array_equal(getattr(whole, name), getattr(expected, name), name)
    columns = shards.columns()
    np.testing.assert_array_equal(columns.request_ids, expected.request_ids)
    np.testing.assert_array_equal(columns.steps, expected.steps)
    assert columns.expert_ids.shape == expected.expert_ids.shape
    assert columns.expert_ids.strides[0] == 0  # a placeholder: one row, whatever T
    assert whole.n_requests == sum(t.n_requests for t in traces)
    # Row ranges across shard boundaries, and one layer at a time.
    n = shards.n_tokens
    for start, stop in [(0, n), (0, 0), (3, int(shards.bounds[1]) + 2), (n - 1, n)]:
        np.testing.assert_array_equal(shards.read_ids(start, stop), expected.expert_ids[start:stop])
    for layer in range(2):
        np.testing.assert_array_equal(shards.layer_ids(layer), expected.expert_ids[:, layer])
    with pytest.raises(MoeprofError, match="outside"):
        shards.read_ids(0, n + 1)


@pytest.mark.parametrize("policy", ["tokens", "decode", "recorded"])
def test_analysis_of_shards_equals_the_concatenated_trace(tmp_path: Path, policy: str) -> None:
    traces = _shards(tmp_path, seed=3)
    expected = analyze(_concatenated(traces), [1, 3, 8], policy).to_dict()
    got = analyze(load_traces(tmp_path), [1, 3, 8], policy).to_dict()
    for doc in (expected, got):
        doc["trace"] = {k: doc["trace"][k] for k in ("n_tokens", "n_requests", "n_layers")}
    assert got == expected


def test_merge_writes_the_logical_trace(tmp_path: Path, run_cli) -> None:
    traces = _shards(tmp_path)
    out = tmp_path / "out" / "merged.moe"
    out.parent.mkdir()
    result = run_cli("merge", tmp_path, "-o", out)
    assert result.exit_code == 0, result.stderr
    merged, expected = load_trace(out), _concatenated(traces)
    np.testing.assert_array_equal(merged.expert_ids, expected.expert_ids)
    np.testing.assert_array_equal(merged.request_ids, expected.request_ids)
    assert [s["file"] for s in merged.meta["shards"]] == [f"part-0{i}.moe" for i in range(3)]
    # Refused: the output among the inputs, an existing output without --force.
    again = run_cli("merge", tmp_path / "part-00.moe", tmp_path / "part-01.moe", "-o", out)
    assert again.exit_code == 2 and "exists" in again.stderr
    inside = run_cli("merge", tmp_path, "-o", tmp_path / "part-01.moe", "--force")
    assert inside.exit_code == 2 and "is one of the shards" in inside.stderr


@pytest.mark.parametrize(
    "change, named",
    [
        ({"n_experts": [8, 64]}, "experts per layer"),
        ({"top_k": 3}, "top-k"),
        ({"n_layers": 3, "n_experts": [8, 70, 8]}, "MoE layers"),
    ],
)
def test_shards_of_different_traces_are_refused(
    tmp_path: Path, run_cli, change: dict, named: str
) -> None:
    _shards(tmp_path, n=2)
    other = random_trace(np.random.default_rng(9), n_tokens=6, **{
        "n_layers": 2, "top_k": 2, "n_experts": [8, 70], **change})  # fmt: skip
    other.expert_bytes = np.full(other.n_layers, 512, dtype=np.int64)
    other.save(tmp_path / "part-05.moe")
    result = run_cli("merge", tmp_path, "-o", tmp_path / "m.moe")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and named in result.stderr
    assert "part-05.moe" in result.stderr
    assert not (tmp_path / "m.moe").exists()


def test_first_difference_names_model_and_sizes() -> None:
    rng = np.random.default_rng(1)
    a = random_trace(rng, n_tokens=4, n_layers=1, top_k=1, n_experts=4)
    b = random_trace(rng, n_tokens=4, n_layers=1, top_k=1, n_experts=4)
    assert "expert bytes" in (first_difference(a, b) or "")
    b.expert_bytes = a.expert_bytes
    assert first_difference(a, b) is None
    b.meta["model"] = {"name": "other"}
    assert "model" in (first_difference(a, b) or "")


def test_verbs_read_a_folder_of_shards(tmp_path: Path, run_cli) -> None:
    traces = _shards(tmp_path)
    info = run_cli("info", tmp_path, "--json")
    assert info.exit_code == 0, info.stderr
    doc = json.loads(info.stdout)
    assert doc["n_tokens"] == sum(t.n_tokens for t in traces)
    assert doc["n_requests"] == sum(t.n_requests for t in traces)
    assert doc["file_bytes"] == sum(p.stat().st_size for p in tmp_path.glob("*.moe"))
    out = tmp_path / "rows.csv"
    exported = run_cli("export", str(tmp_path / "part-*.moe"), "-o", out, "-F", "csv")
    assert exported.exit_code == 0, exported.stderr
    rows = out.read_text().splitlines()
    assert len(rows) - 1 == sum(t.n_tokens for t in traces) * 2  # a row per token and layer
    replayed = run_cli(
        "replay", tmp_path / "part-00.moe", tmp_path / "part-01.moe", "-b", "4",
        "--expert-bytes", "256", "--json", tmp_path / "r.json",
    )  # fmt: skip
    assert replayed.exit_code == 0, replayed.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["trace"]["n_tokens"] == traces[0].n_tokens + traces[1].n_tokens


# ---------------------------------------------------------------------- chunked load check


def _write_raw(path: Path, ids: np.ndarray, n_experts: int) -> None:
    n = ids.shape[0]
    arrays = {
        "expert_ids": ids,
        "request_ids": np.zeros(n, dtype=np.int32),
        "positions": np.arange(n, dtype=np.int32),
    }
    doc = {"n_experts": [n_experts] * ids.shape[1], "expert_bytes": [1] * ids.shape[1]}
    meta = {"format": "moeprof-trace", "format_version": "1", "moeprof": json.dumps(doc)}
    save_file(arrays, str(path), metadata=meta)


@pytest.mark.parametrize("defect", ["out of range", "duplicate"])
def test_chunked_load_check_names_the_file_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, defect: str
) -> None:
    ids = np.tile(np.array([[[0, 1], [2, 3]]], dtype=np.uint8), (50, 1, 1))
    if defect == "out of range":
        ids[37, 1, 0] = 9
        expected = "expert id 9 at token 37, layer 1 is out of range"
    else:
        ids[37, 1] = [3, 3]
        expected = "token 37 names expert 3 twice in layer 1"
    _write_raw(tmp_path / "t.moe", ids, 8)
    with pytest.raises(MoeprofError) as whole:
        load_trace(tmp_path / "t.moe")
    monkeypatch.setattr(trace_module, "_CHECK_CHUNK_DECISIONS", 12)  # 3 rows a chunk
    with pytest.raises(MoeprofError) as chunked:
        load_trace(tmp_path / "t.moe")
    assert expected in whole.value.message
    assert chunked.value.message == whole.value.message


def test_released_pages_read_back(tmp_path: Path) -> None:
    trace = random_trace(np.random.default_rng(4), n_tokens=50, n_layers=2, top_k=2)
    trace.save(tmp_path / "t.moe")
    loaded = load_trace(tmp_path / "t.moe")
    before = np.array(loaded.expert_ids)
    loaded.release()
    np.testing.assert_array_equal(loaded.expert_ids, before)
    trace.release()  # in memory: nothing to drop, no error


def _resident_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_release_drops_the_pages_read_from_resident_memory(tmp_path: Path) -> None:
    # 48 MiB of ids: reading them all makes the map's pages resident; release drops them.
    ids = np.zeros((1 << 20, 6, 8), dtype=np.uint8)
    ids[:] = np.arange(8, dtype=np.uint8)
    Trace.from_arrays(ids, n_experts=8).save(tmp_path / "big.moe")
    trace = load_trace(tmp_path / "big.moe")
    trace.release()
    before = _resident_bytes()
    assert int(trace.expert_ids[:, :, 7].sum()) == 7 * 6 * (1 << 20)  # touches every page
    touched = _resident_bytes()
    trace.release()
    after = _resident_bytes()
    assert touched - before > 40 << 20
    assert touched - after > 40 << 20
    assert int(trace.expert_ids[-1, -1, -1]) == 7  # still readable after the release


def test_chunked_load_check_reports_what_the_whole_check_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two defects in one file (a repeat early, an out-of-range id late, rows out of order): the
    chunked check names the same one as the whole-file check."""
    ids = np.tile(np.array([[[0, 1], [2, 3]]], dtype=np.uint8), (50, 1, 1))
    ids[3, 0] = [1, 1]
    ids[45, 1, 1] = 9
    arrays = {
        "expert_ids": ids,
        "request_ids": np.zeros(50, dtype=np.int32),
        "positions": np.arange(50, dtype=np.int32)[::-1].copy(),
    }
    doc = {"n_experts": [8, 8], "expert_bytes": [1, 1]}
    meta = {"format": "moeprof-trace", "format_version": "1", "moeprof": json.dumps(doc)}
    save_file(arrays, str(tmp_path / "t.moe"), metadata=meta)
    with pytest.raises(MoeprofError) as whole:
        load_trace(tmp_path / "t.moe")
    monkeypatch.setattr(trace_module, "_CHECK_CHUNK_DECISIONS", 12)
    with pytest.raises(MoeprofError) as chunked:
        load_trace(tmp_path / "t.moe")
    assert "expert id 9 at token 45" in whole.value.message
    assert chunked.value.message == whole.value.message


def _peak_resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_a_layer_column_is_read_without_the_whole_file_resident(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One layer of 48 MiB of ids is strided through every page; read in 1 MiB row chunks, the
    # file's pages never all become resident at once.
    ids = np.zeros((1 << 20, 6, 8), dtype=np.uint8)
    ids[:] = np.arange(8, dtype=np.uint8)
    ids[:, 3] = np.arange(8, 16, dtype=np.uint8)
    Trace.from_arrays(ids, n_experts=16).save(tmp_path / "big.moe")
    trace = load_trace(tmp_path / "big.moe")
    monkeypatch.setattr(trace_module, "_LAYER_READ_BYTES", 1 << 20)
    try:  # reset the peak (VmHWM) to the current resident size
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak resident size here")
    before = _resident_bytes()
    column = trace.layer_column(3)
    grown = _peak_resident_bytes() - before
    np.testing.assert_array_equal(column, ids[:, 3])
    assert column.nbytes == 8 << 20
    assert grown < column.nbytes + (16 << 20)  # the column, not the 48 MiB file
    np.testing.assert_array_equal(open_shards(tmp_path / "big.moe").layer_ids(3), ids[:, 3])
