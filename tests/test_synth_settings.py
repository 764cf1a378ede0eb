"""Synthetic trace settings: every one range-checked up front with a MoeprofError, sizes capped
before anything is allocated, and the CLI turns each refusal into one line and exit 2."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

import moeprof
from moeprof import synth
from moeprof.errors import MoeprofError
from moeprof.trace import MAX_EXPERT_BYTES


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"expert_bytes": -1}, "expert bytes"),
        ({"expert_bytes": MAX_EXPERT_BYTES + 1}, "expert bytes"),
        ({"expert_bytes": 10**30}, "expert bytes"),
        ({"expert_bytes": [1, 2, 3]}, "one per layer"),
        ({"expert_bytes": [1, 2, 3, -4]}, "expert bytes"),
        ({"expert_bytes": 1.5}, "expert bytes"),
        ({"n_experts": 0}, "experts"),
        ({"n_experts": 65536}, "experts"),
        ({"n_experts": 8.0}, "experts"),
        ({"top_k": 0}, "top-k"),
        ({"top_k": 9}, "top-k"),
        ({"top_k": True}, "top-k"),
        ({"n_layers": 0}, "layers"),
        ({"n_requests": 0}, "requests"),
        ({"tokens_per_request": 0}, "tokens per request"),
        ({"tokens_per_request": [5, 0] + [5] * 14}, "tokens per request"),
        ({"tokens_per_request": [5, 6, 7]}, "one per request"),
        ({"tokens_per_request": 2.5}, "tokens per request"),
        ({"zipf": -0.5}, "Zipf"),
        ({"zipf": math.nan}, "Zipf"),
        ({"zipf": math.inf}, "Zipf"),
        ({"locality": -0.1}, "locality"),
        ({"locality": 1.5}, "locality"),
        ({"locality": math.nan}, "locality"),
        ({"length_spread": 1.0}, "length spread"),
        ({"length_spread": math.nan}, "length spread"),
        ({"popularity": [[1, 2], [3]]}, "popularity"),
        ({"popularity": [[1.0, math.inf] * 4] * 4}, "popularity"),
        ({"popularity": [["a"] * 8] * 4}, "popularity"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(MoeprofError, match=match):
        moeprof.synthesize(**kwargs)


def test_limits_are_accepted() -> None:
    t = moeprof.synthesize(
        n_experts=3,
        top_k=3,
        n_layers=1,
        n_requests=2,
        tokens_per_request=[1, 2],
        expert_bytes=MAX_EXPERT_BYTES,
        seed=2**70,  # any non-negative seed
        zipf=1e6,  # steep: log-space popularity does not underflow
        locality=1.0,
    )
    assert t.n_tokens == 3 and int(t.expert_bytes[0]) == MAX_EXPERT_BYTES
    steep = moeprof.synthesize(
        n_experts=16, top_k=4, n_layers=1, n_requests=1, tokens_per_request=100, zipf=1e4
    )
    # The four most popular experts of the layer, every time.
    assert len({tuple(sorted(r)) for r in steep.expert_ids[:, 0].tolist()}) == 1
    assert moeprof.synthesize(expert_bytes=0).expert_bytes.tolist() == [0] * 4
    assert moeprof.synthesize(expert_bytes=None).expert_bytes.tolist() == [0] * 4
    assert moeprof.synthesize(expert_bytes=[1, 2, 3, 4]).expert_bytes.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_requests": 10**6, "tokens_per_request": 10**6},
        {"n_requests": 1, "tokens_per_request": 10**40},
        {"n_requests": 10**30, "tokens_per_request": 1},
        {"tokens_per_request": 2**24, "n_layers": 32, "top_k": 8, "n_experts": 64},
        # Few decisions but popularity tables of layers x 65535 experts.
        {"n_experts": 65535, "top_k": 1, "n_layers": 512, "tokens_per_request": 1},
        # Few decisions per token but more tokens than int32 request ids and positions hold.
        {"n_layers": 1, "top_k": 1, "n_requests": 2**16, "tokens_per_request": 2**15},
    ],
)
def test_absurd_sizes_refused_before_allocating(
    kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_rng(*a: object, **k: object) -> None:
        raise AssertionError("random numbers drawn before the size check")

    monkeypatch.setattr(np.random, "default_rng", no_rng)
    start = time.monotonic()
    with pytest.raises(MoeprofError, match="too large"):
        moeprof.synthesize(**kwargs)
    assert time.monotonic() - start < 1.0


def test_size_limit_counts_length_spread() -> None:
    # 16 requests x 2**24 tokens x 4 layers x top-4 = 2**32 decisions: over the limit only once
    # lengths can grow by the spread (and rounding).
    kwargs = dict(n_experts=8, top_k=4, n_layers=4, n_requests=16, tokens_per_request=2**24)
    assert 16 * 2**24 * 4 * 4 == synth.MAX_DECISIONS
    with pytest.raises(MoeprofError, match="too large"):
        moeprof.synthesize(**kwargs, length_spread=0.5)


def test_cli_refusals(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "s.moe"
    for args in (
        ["--seed", "-1"],
        ["--expert-bytes", "-5"],
        ["--expert-bytes", str(MAX_EXPERT_BYTES + 1)],
        ["--expert-bytes", str(10**30)],
        ["--experts", "70000"],
        ["--layers", "0"],
        ["--requests", "0"],
        ["--tokens", "0"],
        ["--zipf", "nan"],
        ["--zipf", "inf"],
        ["--locality", "nan"],
        ["--requests", "1000000", "--tokens", "1000000"],
    ):
        r = run_cli("synth", "-o", out, *args)
        assert r.exit_code == 2, (args, r.stderr)
        assert r.stderr.startswith("moeprof: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert not out.exists() and list(tmp_path.iterdir()) == []
    r = run_cli("synth", "-o", out, "--seed", "7", "--locality", "0.5", "--expert-bytes", "0")
    assert r.exit_code == 0, r.stderr
    assert moeprof.load_trace(out).meta["source"]["seed"] == 7
