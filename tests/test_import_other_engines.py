"""Other engines' trace files (docs/import.md "Other engines"): rtrace softmax record streams,
npz-idx arrays and layer_idx/selected_ids JSONL rows. Fixtures are written here from the format
descriptions (struct / np.savez / json), and every expectation is computed in plain Python."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from moeprof import Trace
from moeprof.errors import MoeprofError
from moeprof.importers import import_trace
from moeprof.importers.npz_idx import read_npz_idx
from moeprof.importers.rtrace import read_rtrace

E = 6


def _rtrace_bytes(records: list[tuple[int, int, list[float]]], n_experts: int = E, version=1):
    head = struct.pack("<8sii", b"RTRACE01", n_experts, version)
    body = b"".join(
        struct.pack("<ii", t, layer) + struct.pack(f"<{len(p)}f", *p) for t, layer, p in records
    )
    return head + body


def _rtrace_records(seed: int = 0) -> list[tuple[int, int, list[float]]]:
    """5 tokens x model layers 3 and 1, written layer by layer; record 1 has a tie at the k=2 cut."""
    rng = np.random.default_rng(seed)
    records = []
    for layer in (3, 1):
        for t in range(5):
            p = rng.dirichlet(np.ones(E)).astype(np.float32).tolist()
            records.append((t, layer, p))
    records[1] = (1, 3, [0.1, 0.3, 0.05, 0.3, 0.2, 0.05])  # tie 0.3 at ids 1 and 3: 1 first
    records[2] = (2, 3, [0.05, 0.1, 0.3, 0.05, 0.2, 0.3])  # tie at the second slot: 2 before 5
    return records


def _brute_top(probs: list[float], k: int) -> list[int]:
    return sorted(range(len(probs)), key=lambda e: (-probs[e], e))[:k]


def _expected_rtrace(records, k: int, expert_bytes: int = 0) -> Trace:
    tokens = sorted({t for t, _, _ in records})
    layers = sorted({layer for _, layer, _ in records})
    by_cell = {(t, layer): p for t, layer, p in records}
    f32 = [[[np.float32(x) for x in by_cell[(t, layer)]] for layer in layers] for t in tokens]
    ids = [[_brute_top(f32[i][j], k) for j in range(len(layers))] for i in range(len(tokens))]
    weights = [
        [[float(f32[i][j][e]) for e in ids[i][j]] for j in range(len(layers))]
        for i in range(len(tokens))
    ]
    return Trace.from_arrays(
        ids,
        n_experts=E,
        positions=tokens,
        gate_weights=weights,
        expert_bytes=expert_bytes,
        meta={"moe_layer_indices": layers},
    )


def _same_routing(got: Trace, want: Trace) -> None:
    assert got.expert_ids.tolist() == want.expert_ids.tolist()
    assert got.request_ids.tolist() == want.request_ids.tolist()
    assert got.positions.tolist() == want.positions.tolist()
    assert got.moe_layer_indices == want.moe_layer_indices
    assert got.n_experts.tolist() == want.n_experts.tolist()
    if want.gate_weights is None:
        assert got.gate_weights is None
    else:
        assert got.gate_weights is not None
        np.testing.assert_allclose(got.gate_weights, want.gate_weights, rtol=1e-6)


def _analysis(run_cli, trace: Path, out: Path) -> list:
    result = run_cli("analyze", trace, "-b", "1,2,4", "--json", out)
    assert result.exit_code == 0, result.stderr
    return json.loads(out.read_text())["results"]


def _cli_matches(run_cli, tmp_path: Path, src: Path, want: Trace, *flags: str) -> None:
    """import exits 0, info reads the file, analyze equals analysing the expected trace."""
    tmp_path = tmp_path / f"cli-{src.name}"
    tmp_path.mkdir()
    out = tmp_path / "imported.moe"
    result = run_cli("import", src, "-o", out, "--expert-bytes", "1000", *flags)
    assert result.exit_code == 0, result.stderr
    info = run_cli("info", out)
    assert info.exit_code == 0, info.stderr
    expected = tmp_path / "expected.moe"
    want.save(expected)
    assert _analysis(run_cli, out, tmp_path / "a.json") == _analysis(
        run_cli, expected, tmp_path / "b.json"
    )


# ---------------------------------------------------------------------- rtrace


def test_rtrace_top_k_against_brute_force(tmp_path: Path) -> None:
    records = _rtrace_records()
    path = tmp_path / "s.rtrace"
    path.write_bytes(_rtrace_bytes(records))
    for k in (1, 2, 3, E):
        trace = import_trace(path, top_k=k)  # guessed from the ending
        _same_routing(trace, _expected_rtrace(records, k))
    trace = import_trace(path, top_k=2)
    assert trace.meta["source"]["format"] == "rtrace"
    assert trace.expert_ids[1, 1].tolist() == [1, 3]  # model layer 3 is MoE layer 1
    assert trace.expert_ids[2, 1].tolist() == [2, 5]


def test_rtrace_files_are_requests(tmp_path: Path) -> None:
    a, b = _rtrace_records(1), _rtrace_records(2)[:4] + _rtrace_records(2)[5:9]
    (tmp_path / "a.rtrace").write_bytes(_rtrace_bytes(a))
    (tmp_path / "b.rtrace").write_bytes(_rtrace_bytes(b))
    trace = import_trace(tmp_path, "rtrace", top_k=2)
    assert trace.meta["request_labels"] == ["a.rtrace", "b.rtrace"]
    assert trace.request_ids.tolist() == [0] * 5 + [1] * 4
    want_a, want_b = _expected_rtrace(a, 2), _expected_rtrace(b, 2)
    assert trace.expert_ids.tolist() == want_a.expert_ids.tolist() + want_b.expert_ids.tolist()


def test_rtrace_command_line(run_cli, tmp_path: Path) -> None:
    records = _rtrace_records()
    path = tmp_path / "s.rtrace"
    path.write_bytes(_rtrace_bytes(records))
    _cli_matches(run_cli, tmp_path, path, _expected_rtrace(records, 2, 1000), "--top-k", "2")
    out = tmp_path / "none.moe"
    result = run_cli("import", path, "-o", out)
    assert result.exit_code == 2 and "--top-k says how many experts" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def _bad_rtrace(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bad.rtrace"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda r: b"RTRACE", "6 bytes, shorter than the 16-byte rtrace header"),
        (
            lambda r: b"RTRACE02" + _rtrace_bytes(r)[8:],
            r"not an rtrace stream \(starts b'RTRACE02'",
        ),
        (lambda r: _rtrace_bytes(r, version=2), "rtrace version 2; moeprof reads version 1"),
        (lambda r: _rtrace_bytes([], n_experts=0), "expert count 0 is outside 1..65535"),
        (lambda r: _rtrace_bytes(r)[:-5], r"record 9 is truncated \(27 of 32 bytes at byte 304\)"),
        (lambda r: _rtrace_bytes([]), "the stream holds no records"),
        (
            lambda r: _rtrace_bytes(r[:3] + [(3, 3, [math.nan] + [0.2] * 5)] + r[4:]),
            r"record 3 \(token 3, layer 3\): probability nan of expert 0 is not a probability",
        ),
        (
            lambda r: _rtrace_bytes(r[:4] + [(4, 3, [0.5, -0.25, 0.75, 0, 0, 0])] + r[5:]),
            r"record 4 \(token 4, layer 3\): probability -0.25 of expert 1",
        ),
        (lambda r: _rtrace_bytes([(0, 1, [1.5] + [0.0] * 5)]), "probability 1.5 of expert 0"),
        (lambda r: _rtrace_bytes([(-1, 1, [1.0] + [0.0] * 5)]), "negative token index -1"),
        (
            lambda r: _rtrace_bytes(r + [r[6]]),
            r"record 10 \(token 1, layer 1\): a second record for this token and layer "
            r"\(first: record 6\)",
        ),
        (
            lambda r: _rtrace_bytes(r[:2] + r[3:]),
            r"layer 3 has 4 records for 5 tokens \(token 2 has none\)",
        ),
    ],
)
def test_rtrace_refusals(tmp_path: Path, make, match: str) -> None:
    path = _bad_rtrace(tmp_path, make(_rtrace_records()))
    with pytest.raises(MoeprofError, match=match):
        read_rtrace([path], top_k=2)


def test_rtrace_option_refusals(tmp_path: Path) -> None:
    path = _bad_rtrace(tmp_path, _rtrace_bytes(_rtrace_records()))
    with pytest.raises(MoeprofError, match="top_k says how many experts to route"):
        import_trace(path, "rtrace")
    with pytest.raises(MoeprofError, match="top_k must be between 1 and 6"):
        import_trace(path, "rtrace", top_k=7)
    with pytest.raises(MoeprofError, match="the stream has 6 experts, n_experts says 8"):
        import_trace(path, "rtrace", top_k=2, experts=8)
    other = tmp_path / "z.rtrace"
    other.write_bytes(_rtrace_bytes([(0, 1, [1.0, 0, 0, 0]), (0, 3, [0, 1.0, 0, 0])], 4))
    with pytest.raises(MoeprofError, match="4 experts, but .*bad.rtrace has 6"):
        import_trace([path, other], "rtrace", top_k=2)
    with pytest.raises(MoeprofError, match="top_k applies to rtrace and npz-idx only, not vllm"):
        np.save(tmp_path / "v.npy", np.zeros((2, 1, 1), dtype=np.int16))
        import_trace(tmp_path / "v.npy", "vllm", top_k=2)


# ---------------------------------------------------------------------- npz-idx


def _idx_fixture(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = np.stack(
        [np.stack([rng.choice(E, 2, replace=False) for _ in range(7)]) for _ in range(3)]
    ).astype(np.int32)  # [3 layers, 7 tokens, k=2]
    idx[1, 4, 1] = -1  # an empty slot
    return idx


def _expected_npz(idx_tll: list, bounds: list[int], weights=None, expert_bytes: int = 0) -> Trace:
    """idx_tll: [T][L][k] routes; bounds: cumulative offsets."""
    requests, positions = [], []
    for r in range(len(bounds) - 1):
        for t in range(bounds[r], bounds[r + 1]):
            requests.append(r)
            positions.append(t - bounds[r])
    ids = [[[E if e < 0 else e for e in slots] for slots in tok] for tok in idx_tll]
    return Trace.from_arrays(
        ids,
        n_experts=E,
        request_ids=requests,
        positions=positions,
        gate_weights=weights,
        expert_bytes=expert_bytes,
    )


def _token_major(idx: np.ndarray) -> list:
    n_layers, n_tokens, _ = idx.shape
    return [[idx[layer, t].tolist() for layer in range(n_layers)] for t in range(n_tokens)]


@pytest.mark.parametrize(
    "bounds",
    [np.array([0, 3, 4, 7]), np.array([[0, 3], [3, 4], [4, 7]]), None],
    ids=["offsets", "pairs", "absent"],
)
def test_npz_idx_against_brute_force(tmp_path: Path, bounds) -> None:
    idx = _idx_fixture()
    path = tmp_path / "r.npz"
    np.savez(path, idx=idx, **({} if bounds is None else {"seq_bounds": bounds}))
    trace = import_trace(path)  # an .npz holding idx is npz-idx, not vLLM's
    assert trace.meta["source"]["format"] == "npz-idx"
    cumulative = [0, 7] if bounds is None else [0, 3, 4, 7]
    _same_routing(trace, _expected_npz(_token_major(idx), cumulative))
    assert trace.meta["request_labels"][-1] == f"r.npz:{len(cumulative) - 2}"


def _softmax_top(scores: list[float], k: int) -> tuple[list[int], list[float]]:
    top = _brute_top(scores, k)
    peak = max(scores)
    total = sum(math.exp(s - peak) for s in scores)
    return top, [math.exp(scores[e] - peak) / total for e in top]


def test_npz_logits_against_brute_force(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 5, E)).astype(np.float32)
    logits[0, 1] = [1.0, 2.0, 0.5, 2.0, -np.inf, 0.0]  # a tie (ids 1, 3) and a masked expert
    np.savez(tmp_path / "l.npz", logits=logits, seq_bounds=np.array([0, 2, 5]))
    trace = import_trace(tmp_path / "l.npz", "npz-idx", top_k=3)
    routes = [[_softmax_top(logits[lay, t].tolist(), 3) for lay in range(2)] for t in range(5)]
    want = _expected_npz(
        [[r[0] for r in tok] for tok in routes], [0, 2, 5], [[r[1] for r in tok] for tok in routes]
    )
    _same_routing(trace, want)
    assert trace.expert_ids[1, 0].tolist() == [1, 3, 0]


def test_vllm_npz_is_still_vllm(tmp_path: Path) -> None:
    np.savez(tmp_path / "v.npz", routed_experts=np.array([[[1, 2]], [[0, 3]]], dtype=np.int16))
    assert import_trace(tmp_path / "v.npz").meta["source"]["format"] == "vllm"


def test_npz_idx_command_line(run_cli, tmp_path: Path) -> None:
    idx = _idx_fixture(5)
    np.savez(tmp_path / "r.npz", idx=idx, seq_bounds=np.array([0, 3, 4, 7]))
    want = _expected_npz(_token_major(idx), [0, 3, 4, 7], expert_bytes=1000)
    _cli_matches(run_cli, tmp_path, tmp_path / "r.npz", want, "--format", "npz-idx")
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(2, 4, E))
    np.savez(tmp_path / "l.npz", logits=logits)
    routes = [[_softmax_top(logits[lay, t].tolist(), 2) for lay in range(2)] for t in range(4)]
    want = _expected_npz(
        [[r[0] for r in tok] for tok in routes],
        [0, 4],
        [[r[1] for r in tok] for tok in routes],
        expert_bytes=1000,
    )
    _cli_matches(run_cli, tmp_path, tmp_path / "l.npz", want, "--top-k", "2")


def _refused_npz(tmp_path: Path, match: str, top_k: int | None = None, **arrays) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(MoeprofError, match=match):
        read_npz_idx([path], top_k=top_k)


def test_npz_idx_refusals(tmp_path: Path) -> None:
    idx = _idx_fixture()
    logits = np.zeros((3, 7, E))
    _refused_npz(tmp_path, "found neither", seq_bounds=np.array([0, 7]))
    _refused_npz(tmp_path, "not both", idx=idx, logits=logits)
    _refused_npz(tmp_path, "holds 'extra.npy'; an npz-idx file holds only", idx=idx, extra=idx)
    _refused_npz(tmp_path, r"'idx' must have shape \[layers, tokens, k\], got \[7, 2\]", idx=idx[0])
    _refused_npz(tmp_path, "'idx' must hold integer expert ids, got float64", idx=idx * 1.0)
    bad = idx.copy()
    bad[2, 5, 0] = -2
    _refused_npz(tmp_path, r"'idx'\[2, 5, 0\]: expert id -2 is negative", idx=bad)
    bad[2, 5] = [4, 4]
    _refused_npz(tmp_path, r"'idx'\[2, 5\]: expert id 4 appears twice", idx=bad)
    bad[2, 5] = [70000, 1]
    _refused_npz(tmp_path, "expert id 70000 is out of range", idx=bad)
    _refused_npz(tmp_path, "top_k 3 applies to 'logits' only", top_k=3, idx=idx)
    _refused_npz(tmp_path, "top_k says how many experts to route", logits=logits)
    nan = logits.copy()
    nan[1, 2, 3] = np.nan
    _refused_npz(tmp_path, r"'logits'\[1, 2, 3\] is nan", top_k=2, logits=nan)
    masked = logits.copy()
    masked[0, 6] = -np.inf
    _refused_npz(tmp_path, r"'logits'\[0, 6\] masks every expert", top_k=2, logits=masked)
    for bounds, match in (
        (np.zeros((3, 3), dtype=int), r"'seq_bounds' has shape \[3, 3\]; give offsets"),
        (np.array([0, 5]), "'seq_bounds' runs from 0 to 5; it must cover tokens 0..7"),
        (np.array([0, 3, 3, 7]), r"request 1 spans 3..3; every request needs at least one"),
        (np.array([[0, 3], [4, 7]]), "request 1 starts at 4, not where request 0 ends"),
        (np.array([0.0, 7.0]), "'seq_bounds' must hold integer token offsets"),
    ):
        _refused_npz(tmp_path, match, idx=idx, seq_bounds=bounds)
    np.savez(tmp_path / "o.npz", idx=np.array([[[1]]], dtype=object))
    with pytest.raises(MoeprofError, match="o.npz: not a readable .npz file"):
        import_trace(tmp_path / "o.npz", "npz-idx")
    (tmp_path / "g.npz").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(MoeprofError, match="g.npz: not a readable .npz file"):
        import_trace(tmp_path / "g.npz", "npz-idx")
    np.savez(tmp_path / "a.npz", idx=idx)
    np.savez(tmp_path / "b.npz", idx=idx[:2])
    with pytest.raises(MoeprofError, match=r"'idx' of shape \[2, tokens, 2\], but .*a.npz has"):
        import_trace([tmp_path / "a.npz", tmp_path / "b.npz"], "npz-idx")


def test_damaged_files_give_a_trace_or_one_line(tmp_path: Path) -> None:
    """Seeded bit flips and truncations of valid files: a trace or a one-line MoeprofError."""
    rng = np.random.default_rng(11)
    np.savez(tmp_path / "idx.npz", idx=_idx_fixture(), seq_bounds=np.array([0, 3, 4, 7]))
    np.savez(tmp_path / "lg.npz", logits=np.zeros((2, 3, E), dtype=np.float32))
    sources = {
        "rtrace": _rtrace_bytes(_rtrace_records()),
        "npz-idx": (tmp_path / "idx.npz").read_bytes(),
        "npz-idx ": (tmp_path / "lg.npz").read_bytes(),
    }
    outcomes = {"accepted": 0, "error": 0}
    for fmt, data in sources.items():
        for case in range(150):
            buf = bytearray(data)
            if case % 3 == 0:
                buf = buf[: int(rng.integers(0, len(buf)))]
            else:
                for at in rng.integers(0, len(buf), size=int(rng.integers(1, 4))):
                    buf[at] ^= 1 << int(rng.integers(0, 8))
            path = tmp_path / f"m{case}.bin"
            path.write_bytes(bytes(buf))
            try:
                import_trace(path, fmt.strip(), top_k=2)
                outcomes["accepted"] += 1
            except MoeprofError as exc:
                assert "\n" not in exc.message.strip()
                outcomes["error"] += 1
    assert outcomes["accepted"] > 0 and outcomes["error"] > 0


# ---------------------------------------------------------------------- JSONL rows


def _jsonl_rows(tmp_path: Path) -> tuple[Path, dict[tuple[int, int], tuple[list, list]]]:
    rng = np.random.default_rng(9)
    truth, lines = {}, []
    for layer in (5, 2):
        for token in range(4):
            ids = rng.choice(E, 2, replace=False).tolist()
            weights = [0.75, 0.25]
            truth[(token, layer)] = (ids, weights)
            row = {"layer_idx": layer, "token_idx": token, "selected_ids": ids}
            lines.append(json.dumps({**row, "gate_weights": weights}))
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, truth


def test_selected_ids_rows_are_found(run_cli, tmp_path: Path) -> None:
    path, truth = _jsonl_rows(tmp_path)
    trace = import_trace(path)
    assert trace.meta["source"]["columns"] == {
        "position": "token_idx",
        "layer": "layer_idx",
        "experts": ["selected_ids"],
        "weights": ["gate_weights"],
    }
    want = Trace.from_arrays(
        [[truth[(t, layer)][0] for layer in (2, 5)] for t in range(4)],
        n_experts=E,
        positions=list(range(4)),
        gate_weights=[[truth[(t, layer)][1] for layer in (2, 5)] for t in range(4)],
        expert_bytes=1000,
        meta={"moe_layer_indices": [2, 5]},
    )
    assert trace.moe_layer_indices == [2, 5]
    assert trace.expert_ids.tolist() == want.expert_ids.tolist()
    _cli_matches(run_cli, tmp_path, path, want)
