"""Temporal locality in synthetic traces (generator version 2): kept slots repeat the previous
token's final expert at the rate the locality asks, fresh slots avoid the kept ones, locality
stops at request boundaries, and the trace does not depend on chunks, threads or numba."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import moeprof
from moeprof import synth


def repeat_rate(trace: moeprof.Trace) -> float:
    """Fraction of (token, layer, slot) whose expert equals the previous token's in that slot,
    over tokens that are not a request's first."""
    ids = trace.expert_ids.astype(int)
    same_req = trace.request_ids[1:] == trace.request_ids[:-1]
    return float((ids[1:] == ids[:-1])[same_req].mean())


@pytest.mark.parametrize("p", [0.0, 0.3, 0.8])
def test_kept_fraction_is_the_locality(p: float) -> None:
    # Uniform popularity over 256 experts: a fresh slot repeats its previous expert only by
    # chance, about 1/256 (less: it avoids the token's other experts), so the rate is about
    # p + (1 - p) / 256.
    t = moeprof.synthesize(
        n_experts=256,
        top_k=4,
        n_layers=2,
        n_requests=20,
        tokens_per_request=2000,
        length_spread=0.3,
        locality=p,
        seed=11,
    )
    expected = p + (1 - p) / 256
    assert repeat_rate(t) == pytest.approx(expected, abs=0.01)
    assert (np.diff(np.sort(t.expert_ids.astype(int), axis=2), axis=2) > 0).all()


def test_locality_with_skew_counts_chance_repeats() -> None:
    # top-1 of 4 experts with popularity [0.4, 0.3, 0.2, 0.1]: a fresh draw repeats the previous
    # expert x with probability p_x, and the previous expert is x with probability p_x (the
    # stationary law of this chain is the popularity), so repeat = L + (1 - L) sum p_x^2.
    pop = [[4, 3, 2, 1]]
    t = moeprof.synthesize(
        n_experts=4,
        top_k=1,
        n_layers=1,
        n_requests=4,
        tokens_per_request=20_000,
        popularity=pop,
        locality=0.5,
        seed=5,
    )
    expected = 0.5 + 0.5 * (0.16 + 0.09 + 0.04 + 0.01)
    assert repeat_rate(t) == pytest.approx(expected, abs=0.01)
    share = np.bincount(t.expert_ids[:, 0, 0], minlength=4) / t.n_tokens
    assert share == pytest.approx([0.4, 0.3, 0.2, 0.1], abs=0.015)


def test_locality_never_crosses_requests() -> None:
    # With locality 1 every token of a request repeats the request's first token exactly.
    t = moeprof.synthesize(
        n_experts=64, top_k=4, n_layers=3, n_requests=30, tokens_per_request=50, locality=1.0
    )
    ids = t.expert_ids.astype(int)
    first = np.flatnonzero(t.positions == 0)
    assert np.array_equal(ids, ids[first][t.request_ids])
    # The first tokens are drawn afresh: 30 requests do not all start alike.
    assert len({ids[i].tobytes() for i in first}) > 20


@pytest.mark.parametrize("n_experts, top_k, locality", [(8, 8, 0.5), (5, 4, 0.9), (64, 6, 0.3)])
def test_synthesized_experts_distinct_and_deterministic(
    n_experts: int, top_k: int, locality: float
) -> None:
    kwargs = dict(
        n_experts=n_experts,
        top_k=top_k,
        n_layers=3,
        n_requests=6,
        tokens_per_request=300,
        length_spread=0.5,
        zipf=1.2,
        locality=locality,
    )
    a = moeprof.synthesize(**kwargs, seed=4)
    b = moeprof.synthesize(**kwargs, seed=4)
    assert np.array_equal(a.expert_ids, b.expert_ids)
    ids = a.expert_ids.astype(int)
    assert (np.diff(np.sort(ids, axis=2), axis=2) > 0).all()
    assert ids.max() < n_experts
    assert not np.array_equal(ids, moeprof.synthesize(**kwargs, seed=5).expert_ids)
    assert a.meta["source"]["generator_version"] == synth.GENERATOR_VERSION == 2


def test_chunks_and_threads_do_not_change_the_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = dict(
        n_experts=6, top_k=3, n_layers=5, n_requests=3, tokens_per_request=500, locality=0.8
    )
    whole = moeprof.synthesize(**kwargs, seed=1).expert_ids
    monkeypatch.setattr(synth, "_CHUNK_DECISIONS", 15 * 37)  # 37 tokens per chunk
    assert np.array_equal(moeprof.synthesize(**kwargs, seed=1).expert_ids, whole)
    monkeypatch.setattr(synth.os, "cpu_count", lambda: 1)  # one thread for all layers
    assert np.array_equal(moeprof.synthesize(**kwargs, seed=1).expert_ids, whole)
    monkeypatch.setattr(synth.os, "cpu_count", lambda: 4)  # layers split 1/1/2/1 or so
    assert np.array_equal(moeprof.synthesize(**kwargs, seed=1).expert_ids, whole)


def test_plain_python_gives_the_compiled_trace() -> None:
    # Where numba is missing the same loop runs as plain Python: same trace, bit for bit.
    kwargs = dict(
        n_experts=10,
        top_k=4,
        n_layers=2,
        n_requests=3,
        tokens_per_request=40,
        zipf=2.0,
        locality=0.6,
        seed=7,
    )
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import moeprof, moeprof.synth as s\n"
        f"t = moeprof.synthesize(**{kwargs!r})\n"
        "assert s._compiled_fill()[1] is False\n"
        "sys.stdout.write(t.expert_ids.tobytes().hex())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert bytes.fromhex(out) == moeprof.synthesize(**kwargs).expert_ids.tobytes()


def test_popularity_with_locality() -> None:
    pop = [[0, 10, 0, 30, 5, 5], [1, 1, 1, 1, 1, 1]]
    t = moeprof.synthesize(
        n_experts=6,
        top_k=3,
        n_layers=2,
        n_requests=4,
        tokens_per_request=2000,
        popularity=pop,
        locality=0.6,
        seed=2,
    )
    ids = t.expert_ids.astype(int)
    assert not np.isin(ids[:, 0], [0, 2]).any()  # never-chosen experts never appear
    assert (np.diff(np.sort(ids, axis=2), axis=2) > 0).all()
    assert t.meta["source"]["popularity"] == "given"
