"""Synthetic traces: shape, determinism, distinct experts per token, skew and locality do what they say."""

from __future__ import annotations

import numpy as np
import pytest

import moeprof
from moeprof.errors import MoeprofError


def test_shape_and_determinism() -> None:
    settings = dict(
        n_experts=16,
        top_k=4,
        n_layers=3,
        n_requests=7,
        tokens_per_request=30,
        length_spread=0.5,
        zipf=1.1,
        locality=0.4,
    )
    a = moeprof.synthesize(**settings, seed=9)
    b = moeprof.synthesize(**settings, seed=9)
    c = moeprof.synthesize(**settings, seed=10)
    assert a.expert_ids.shape[1:] == (3, 4) and a.n_requests == 7
    assert np.array_equal(a.expert_ids, b.expert_ids) and np.array_equal(a.positions, b.positions)
    assert not np.array_equal(a.expert_ids, c.expert_ids)
    assert a.meta["source"]["kind"] == "synth" and a.meta["source"]["seed"] == 9


@pytest.mark.parametrize("locality", [0.0, 0.5, 0.95])
def test_experts_distinct_per_token(locality: float) -> None:
    t = moeprof.synthesize(
        n_experts=8,
        top_k=4,
        n_layers=2,
        n_requests=5,
        tokens_per_request=200,
        zipf=1.5,
        locality=locality,
        seed=1,
    )
    ids = np.sort(t.expert_ids.astype(int), axis=2)
    assert (np.diff(ids, axis=2) > 0).all()
    assert ids.max() < 8


def test_zipf_skews_popularity() -> None:
    flat = moeprof.synthesize(
        n_experts=16, top_k=1, n_layers=1, n_requests=1, tokens_per_request=20_000, seed=0
    )
    skew = moeprof.synthesize(
        n_experts=16, top_k=1, n_layers=1, n_requests=1, tokens_per_request=20_000, zipf=1.5, seed=0
    )
    f = np.bincount(flat.expert_ids.ravel(), minlength=16) / 20_000
    s = np.sort(np.bincount(skew.expert_ids.ravel(), minlength=16))[::-1] / 20_000
    assert f.max() < 0.08  # uniform: 1/16 each
    expected_top = 1.0 / np.sum(np.arange(1, 17) ** -1.5)  # Zipf rank-1 share
    assert s[0] == pytest.approx(expected_top, abs=0.02)


def test_locality_repeats_previous_slot() -> None:
    for p in (0.0, 0.3, 0.8):
        t = moeprof.synthesize(
            n_experts=64,
            top_k=2,
            n_layers=1,
            n_requests=4,
            tokens_per_request=5000,
            locality=p,
            seed=2,
        )
        ids = t.expert_ids[:, 0, :].astype(int)
        same_req = t.request_ids[1:] == t.request_ids[:-1]
        repeat = (ids[1:] == ids[:-1])[same_req].mean()
        # Fresh draws repeat by chance with probability ~k/E-ish; collisions can only lower it.
        assert repeat == pytest.approx(p + (1 - p) / 64, abs=0.03)


def test_locality_increases_savings_over_uniform() -> None:
    t = moeprof.synthesize(
        n_experts=32,
        top_k=2,
        n_layers=2,
        n_requests=2,
        tokens_per_request=2000,
        locality=0.7,
        seed=4,
    )
    row = moeprof.analyze(t, [8]).results[0]
    assert row.memory_savings > row.uniform_memory_savings + 0.1


def test_popularity_counts() -> None:
    pop = [[0, 10, 0, 30], [5, 5, 5, 5]]
    t = moeprof.synthesize(
        n_experts=4,
        top_k=1,
        n_layers=2,
        n_requests=1,
        tokens_per_request=8000,
        popularity=pop,
        seed=3,
    )
    layer0 = np.bincount(t.expert_ids[:, 0, 0], minlength=4) / 8000
    assert layer0[0] == 0 and layer0[2] == 0
    assert layer0[3] == pytest.approx(0.75, abs=0.02)
    with pytest.raises(MoeprofError, match="shape"):
        moeprof.synthesize(n_experts=4, n_layers=3, popularity=pop)
    with pytest.raises(MoeprofError, match="fewer than"):
        moeprof.synthesize(n_experts=4, top_k=3, n_layers=2, popularity=pop)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 0}, r"top-k must be a whole number between 1 and 8 .*, got 0$"),
        ({"top_k": 9}, r"top-k must be a whole number between 1 and 8 .*, got 9$"),
        ({"n_experts": 0}, r"experts must be a whole number between 1 and 65535, got 0$"),
        ({"locality": -0.1}, r"locality is a probability: between 0 and 1, got -0\.1$"),
        ({"zipf": -1}, r"Zipf exponent must be >= 0 .*, got -1\.0$"),
        ({"n_layers": 0}, r"layers must be a whole number at least 1, got 0$"),
        ({"tokens_per_request": 0}, r"tokens per request must be a whole number at least 1"),
        ({"length_spread": 1.0}, r"length spread must be in \[0, 1\), got 1\.0$"),
    ],
)
def test_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(MoeprofError, match=message):
        moeprof.synthesize(**kwargs)


def test_synth_help_shows_the_defaults(run_cli) -> None:
    # Rich markup once swallowed "[default: 8]", leaving "Routed experts per MoE layer ."
    out = " ".join(run_cli("synth", "--help").stdout.split()).replace("│ │", "")
    for text in ("Routed experts per MoE layer (default:", "MoE layers (default: 4)."):
        assert text in out
    assert "layer ." not in out and "layers ." not in out
