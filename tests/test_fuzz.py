"""Fuzzing: mutated traces and import files give a valid result or a MoeprofError, never another
exception. A short run is part of the default test run; the long one is marked `slow` and runs
when selected (`pytest -m slow tests/test_fuzz.py`) or with MOEPROF_FUZZ_LONG=1.
scripts/fuzz.sh runs the command line on a corpus in child processes (signals, hangs)."""

from __future__ import annotations

import json
import os
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moeprof
from moeprof.errors import MoeprofError
from moeprof.importers import import_trace
from moeprof.trace import load_trace

SHORT = 60
LONG = int(os.environ.get("MOEPROF_FUZZ_EXAMPLES", "3000"))


def _long_run_selected(config: pytest.Config) -> bool:
    return os.environ.get("MOEPROF_FUZZ_LONG") == "1" or "slow" in (
        config.getoption("markexpr") or ""
    )


def _base_trace() -> bytes:
    trace = moeprof.synthesize(n_experts=8, top_k=2, n_layers=2, n_requests=3, tokens_per_request=5)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.moe"
        trace.save(path)
        return path.read_bytes()


BASE_TRACE = _base_trace()
BASE_JSONL = "".join(
    json.dumps(
        {
            "req_id": r,
            "token_idx": t,
            "layer": layer,
            "topk_ids": [t % 4, 4 + layer],
            "topk_weights": [0.5, 0.5],
        }
    )
    + "\n"
    for r in range(2)
    for t in range(3)
    for layer in range(2)
).encode()
BASE_CSV = b"request_id,position,layer,experts,weights\n" + b"".join(
    f'{r},{t},{layer},"{t % 4} {4 + layer}","0.5 0.5"\n'.encode()
    for r in range(2)
    for t in range(3)
    for layer in range(2)
)


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """`base` after a few byte-level mutations: bit flips, truncation, insertions, repeats."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "repeat", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            chunk = draw(
                st.sampled_from(
                    [
                        b"null",
                        b"[" * 300,
                        b"{}",
                        b"\xff\xfe",
                        b"\xef\xbb\xbf",
                        b'"',
                        b",",
                        b"\n",
                        b"-1",
                        b"1e400",
                        b"99999999999999999999999",
                        b'{"a":',
                        b"NaN",
                        b"\x00",
                    ]
                )
            )
            data[at:at] = chunk
        elif kind == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 64))] * draw(st.integers(1, 8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


def _header_edit(doc_change: dict) -> bytes:
    (n,) = struct.unpack("<Q", BASE_TRACE[:8])
    header = json.loads(BASE_TRACE[8 : 8 + n])
    doc = json.loads(header["__metadata__"]["moeprof"])
    doc.update(doc_change)
    header["__metadata__"]["moeprof"] = json.dumps(doc)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + BASE_TRACE[8 + n :]


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)
_META_KEYS = st.sampled_from(
    [
        "n_tokens",
        "n_layers",
        "top_k",
        "n_experts",
        "expert_bytes",
        "moe_layer_indices",
        "shared_expert_bytes",
        "model",
        "source",
        "format",
        "format_version",
        "request_labels",
    ]
)


def _check_trace_bytes(data: bytes) -> str:
    """'accepted' or 'error'; any other exception fails the test."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.moe"
        path.write_bytes(data)
        try:
            trace = load_trace(path)
            moeprof.analyze(trace, [1, 4])
            moeprof.analyze(trace, [2], policy="decode")
            del trace
        except MoeprofError as exc:
            assert "\n" not in exc.message.strip()
            return "error"
        return "accepted"


def _check_import(data: bytes, fmt: str, options: dict) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("x.csv" if fmt == "long-csv" else "x.jsonl")
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trace = import_trace(path, fmt, **options)
            moeprof.analyze(trace, [1, 2])
        except MoeprofError as exc:
            assert "\n" not in exc.message.strip()
            return "error"
        return "accepted"


IMPORT_OPTIONS = st.sampled_from(
    [
        {},
        {"position_col": "none"},
        {"step_from_resets": True},
        {"where": [("layer", "0")]},
        {"request_col": "none", "weights_col": "none"},
        {"request_scope": "global"},
    ]
)


def _trace_case(data: st.DataObject) -> bytes:
    if data.draw(st.booleans()):
        return data.draw(mutated(BASE_TRACE))
    return _header_edit(data.draw(st.dictionaries(_META_KEYS, _JSON_VALUES, min_size=1)))


def _import_case(data: st.DataObject) -> tuple[bytes, str, dict]:
    fmt = data.draw(st.sampled_from(["long-jsonl", "long-csv"]))
    base = BASE_JSONL if fmt == "long-jsonl" else BASE_CSV
    raw = data.draw(mutated(base))
    if data.draw(st.integers(0, 9)) == 0:  # another encoding of the same text
        raw = raw.decode("utf-8", "replace").encode(
            data.draw(st.sampled_from(["utf-16", "latin-1"])), "replace"
        )
    return raw, fmt, data.draw(IMPORT_OPTIONS)


_SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@settings(max_examples=SHORT, **_SETTINGS)
@given(st.data())
def test_fuzz_traces_short(data: st.DataObject) -> None:
    assert _check_trace_bytes(_trace_case(data)) in ("accepted", "error")


@settings(max_examples=SHORT, **_SETTINGS)
@given(st.data())
def test_fuzz_imports_short(data: st.DataObject) -> None:
    assert _check_import(*_import_case(data)) in ("accepted", "error")


def test_unmutated_bases_are_accepted() -> None:
    # The mutations start from valid inputs: a fuzz run that only ever met errors proves little.
    assert _check_trace_bytes(BASE_TRACE) == "accepted"
    for fmt, base in (("long-jsonl", BASE_JSONL), ("long-csv", BASE_CSV)):
        assert _check_import(base, fmt, {}) == "accepted"
    trace = import_trace_quiet(BASE_JSONL)
    assert trace.expert_ids[:, 1].tolist() == [[t % 4, 5] for _ in range(2) for t in range(3)]
    assert np.allclose(trace.gate_weights.astype(float), 0.5)


def import_trace_quiet(data: bytes):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.jsonl"
        path.write_bytes(data)
        return import_trace(path, "long-jsonl")


@pytest.mark.slow
def test_fuzz_long(request: pytest.FixtureRequest) -> None:
    if not _long_run_selected(request.config):
        pytest.skip("the long fuzz run: pytest -m slow tests/test_fuzz.py, or MOEPROF_FUZZ_LONG=1")

    @settings(max_examples=LONG, **{**_SETTINGS, "derandomize": False})
    @given(st.data())
    def traces(data: st.DataObject) -> None:
        _check_trace_bytes(_trace_case(data))

    @settings(max_examples=LONG, **{**_SETTINGS, "derandomize": False})
    @given(st.data())
    def imports(data: st.DataObject) -> None:
        _check_import(*_import_case(data))

    traces()
    imports()
