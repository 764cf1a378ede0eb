"""Temporal locality in synthetic traces: kept slots carry the previous token's *final* expert,
fresh slots avoid the kept ones, locality stops at request boundaries, results are exact and
deterministic however the work is chunked."""

from __future__ import annotations

import numpy as np
import pytest

import moeprof
from moeprof import synth
from moeprof.synth import _apply_locality


def reference(cand: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The specification, one token at a time: a kept slot repeats the previous token's final
    expert in that slot; the fresh slots, in slot order, take the best-ranked draws that no kept
    slot holds."""
    n, top_k = cand.shape
    out = np.empty_like(cand)
    for t in range(n):
        kept = {k: int(out[t - 1, k]) for k in range(top_k) if t > 0 and keep[t, k]}
        free = iter(int(c) for c in cand[t] if int(c) not in kept.values())
        for k in range(top_k):
            out[t, k] = kept[k] if k in kept else next(free)
    return out


def random_case(
    rng: np.random.Generator, n: int, n_experts: int, top_k: int, p: float, n_requests: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Ranked distinct draws and keep flags, with keep False at each request's first token."""
    cand = np.argsort(rng.random((n, n_experts)), axis=1)[:, :top_k]
    keep = rng.random((n, top_k)) < p
    starts = np.sort(rng.choice(np.arange(1, n), size=n_requests - 1, replace=False))
    keep[np.concatenate(([0], starts))] = False
    return cand, keep


def test_carries_the_final_value_not_the_drawn_one() -> None:
    # Token 1 keeps slot 0 (expert 3), which its fresh slot 1 also drew, so slot 1 takes its
    # other draw (5). Token 2 keeps both slots: it must repeat token 1's final experts [3, 5],
    # not slot 1's drawn 3 (which would collide again).
    cand = np.array([[3, 1], [5, 3], [7, 6]])
    keep = np.array([[False, False], [True, False], [True, True]])
    out = _apply_locality(cand, keep)
    assert out.tolist() == [[3, 1], [3, 5], [3, 5]]
    assert np.array_equal(out, reference(cand, keep))


@pytest.mark.parametrize(
    "n_experts, top_k, p",
    [(8, 2, 0.3), (8, 2, 0.9), (6, 4, 0.5), (8, 8, 0.5), (4, 4, 0.95), (5, 4, 0.8), (16, 1, 0.7)],
)
def test_matches_token_by_token_reference(n_experts: int, top_k: int, p: float) -> None:
    rng = np.random.default_rng(n_experts * 100 + top_k)
    cand, keep = random_case(rng, 3000, n_experts, top_k, p, n_requests=7)
    out = _apply_locality(cand, keep)
    assert np.array_equal(out, reference(cand, keep))
    # Kept slots hold the previous token's final value; no token names an expert twice.
    assert (out[1:][keep[1:]] == out[:-1][keep[1:]]).all()
    assert (np.diff(np.sort(out, axis=1), axis=1) > 0).all()


def test_streams_chunks_and_windows_do_not_change_the_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(5)
    cases = [random_case(rng, 2000, 6, 4, 0.8, n_requests=3) for _ in range(3)]
    expected = np.stack([reference(c, k) for c, k in cases], axis=1)  # [T, streams, top_k]
    cand = np.stack([c for c, _ in cases], axis=1)
    keep = np.stack([k for _, k in cases], axis=1)
    assert np.array_equal(_apply_locality(cand, keep), expected)
    # In chunks, each continuing from the previous chunk's last final row.
    parts, carry = [], None
    for lo in range(0, 2000, 333):
        parts.append(_apply_locality(cand[lo : lo + 333], keep[lo : lo + 333], carry))
        carry = parts[-1][-1]
    assert np.array_equal(np.concatenate(parts), expected)
    for lo_w, hi_w in ((1, 1), (2, 8), (4096, 4096)):
        monkeypatch.setattr(synth, "_WINDOW_MIN", lo_w)
        monkeypatch.setattr(synth, "_WINDOW_MAX", hi_w)
        assert np.array_equal(_apply_locality(cand, keep), expected)


def test_kept_fraction_is_the_locality() -> None:
    n_experts, p = 256, 0.5
    t = moeprof.synthesize(
        n_experts=n_experts,
        top_k=4,
        n_layers=2,
        n_requests=20,
        tokens_per_request=2000,
        length_spread=0.3,
        locality=p,
        seed=11,
    )
    ids = t.expert_ids.astype(int)
    same_req = t.request_ids[1:] == t.request_ids[:-1]
    repeat = (ids[1:] == ids[:-1])[same_req].mean()
    # A fresh slot repeats its previous expert only by chance (about top_k/experts, ~1.6%).
    assert p - 0.01 <= repeat <= p + 0.02, repeat
    assert (np.diff(np.sort(ids, axis=2), axis=2) > 0).all()


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
    assert not np.array_equal(ids, moeprof.synthesize(**kwargs, seed=5).expert_ids)


def test_locality_chunks_do_not_change_the_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = dict(
        n_experts=6, top_k=3, n_layers=2, n_requests=3, tokens_per_request=500, locality=0.8
    )
    whole = moeprof.synthesize(**kwargs, seed=1).expert_ids
    monkeypatch.setattr(synth, "_LOCALITY_DECISIONS", 6 * 37)  # 37 tokens per chunk
    assert np.array_equal(moeprof.synthesize(**kwargs, seed=1).expert_ids, whole)


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
