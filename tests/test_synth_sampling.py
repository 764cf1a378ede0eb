"""Synthetic draws follow the model exactly: fresh slots are a successive sample without
replacement (each slot in proportion to popularity among the experts still free), checked
against probabilities enumerated by brute force; the exact conditional draw (the fallback after
rejections) against the restricted popularity; Zipf popularity against the Zipf law."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import moeprof
from moeprof import synth


def successive_sampling(p: list[float], k: int) -> dict[tuple[int, ...], float]:
    """Probability of every ordered k-tuple of distinct items, one slot at a time."""
    total = float(sum(p))
    out = {}
    for tup in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, total
        for e in tup:
            prob, left = prob * p[e] / left if left > 0 else 0.0, left - p[e]
        out[tup] = prob
    return out


def chi_square(
    observed: dict[tuple[int, ...], int], expected: dict[tuple[int, ...], float], n: int
) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom; tuples expected fewer than 5 times are
    pooled into one cell (the usual rule: tiny cells make the statistic meaningless)."""
    assert set(observed) <= set(expected), "a tuple the model gives probability 0"
    cells = [(observed.get(t, 0), n * q) for t, q in expected.items() if n * q >= 5]
    rare = [(observed.get(t, 0), n * q) for t, q in expected.items() if n * q < 5]
    if rare:
        cells.append((sum(o for o, _ in rare), sum(e for _, e in rare)))
    stat = sum((o - e) ** 2 / e for o, e in cells if e > 0)
    return stat, sum(e > 0 for _, e in cells) - 1


@pytest.mark.parametrize(
    "pop, k",
    [
        ([50, 20, 15, 10, 5], 3),  # mild skew: mostly first draws and rejections
        ([900, 60, 30, 9, 1], 3),  # steep: most later slots reach the exact fallback
        ([1, 1, 1, 1], 4),  # top-k = experts: every order equally likely
    ],
)
def test_ordered_slots_are_successive_sampling(pop: list[int], k: int) -> None:
    n_tokens = 40_000
    t = moeprof.synthesize(
        n_experts=len(pop),
        top_k=k,
        n_layers=1,
        n_requests=1,
        tokens_per_request=n_tokens,
        popularity=[pop],
        seed=3,
    )
    rows = [tuple(r) for r in t.expert_ids[:, 0, :].astype(int).tolist()]
    observed: dict[tuple[int, ...], int] = {}
    for r in rows:
        observed[r] = observed.get(r, 0) + 1
    stat, dof = chi_square(observed, successive_sampling([float(x) for x in pop], k), n_tokens)
    # Fixed seed, so deterministic; the bound is the chi-square quantile far in the tail
    # (mean dof, sd sqrt(2 dof)): a biased sampler with 40,000 tokens lands far beyond it.
    assert stat < dof + 6 * np.sqrt(2 * dof), (stat, dof)


def test_conditional_draw_is_the_restricted_popularity() -> None:
    # The fallback by inverse CDF: on a fine grid of uniforms, each free expert's share of the
    # grid equals its popularity among the free experts (to the grid's resolution).
    rng = np.random.default_rng(0)
    pop = rng.random(40) ** 3
    pop[[3, 17]] = 0.0  # never chosen
    sampler = synth._Sampler(rng, 1, 40, 0.0, pop[None, :], 1)
    values = np.array([int(sampler.order[0, 0]), 5, 11, 30], dtype=np.int64)  # slot 1 draws
    kept = np.array([False, False, True, False])  # slot 2 is kept (held), slot 3 fresh (not)
    held = [values[0], values[2]]
    free = np.ones(40, dtype=bool)
    free[held] = False
    want = np.where(free, pop, 0.0) / np.where(free, pop, 0.0).sum()
    grid = 20_000
    got = np.zeros(40)
    for i in range(grid):
        e = synth._conditional(
            (i + 0.5) / grid,
            1,
            values,
            kept,
            sampler.rank_of[0],
            sampler.log_w[0],
            sampler.log_tail[0],
            sampler.order[0],
        )
        got[e] += 1
    assert got[held].sum() == 0 and got[[3, 17]].sum() == 0
    assert np.abs(got / grid - want).max() < 2.0 / grid + 1e-12


def test_steep_zipf_takes_the_most_popular_free_experts() -> None:
    # zipf 1e4: weights 1, 2^-1e4, ... underflow in linear space; draws still never repeat
    # within a token and always take the most popular experts (log-space fallback).
    t = moeprof.synthesize(
        n_experts=16, top_k=4, n_layers=2, n_requests=2, tokens_per_request=100, zipf=1e4
    )
    for layer in range(2):
        assert len({tuple(r) for r in t.expert_ids[:, layer].tolist()}) == 1


def test_zipf_top1_follows_the_zipf_law_per_layer() -> None:
    n, experts, s = 60_000, 32, 1.2
    t = moeprof.synthesize(
        n_experts=experts,
        top_k=1,
        n_layers=3,
        n_requests=1,
        tokens_per_request=n,
        zipf=s,
        seed=9,
    )
    law = np.arange(1, experts + 1, dtype=float) ** -s
    law /= law.sum()
    rankings = []
    for layer in range(3):
        counts = np.bincount(t.expert_ids[:, layer, 0], minlength=experts)
        share = np.sort(counts)[::-1] / n
        # Each share within 4.5 binomial standard deviations of the law.
        assert (np.abs(share - law) < 4.5 * np.sqrt(law * (1 - law) / n) + 1e-3).all()
        rankings.append(tuple(np.argsort(-counts)[:4]))
    assert len(set(rankings)) > 1  # a random ranking per layer


def test_topk_inclusion_matches_enumeration_with_zipf() -> None:
    # top-3 of 6 experts under Zipf 1.0: how often each popularity rank is among a token's
    # experts, against the enumerated successive-sampling probability.
    experts, k, n = 6, 3, 50_000
    t = moeprof.synthesize(
        n_experts=experts,
        top_k=k,
        n_layers=1,
        n_requests=1,
        tokens_per_request=n,
        zipf=1.0,
        seed=2,
    )
    law = list(1.0 / np.arange(1, experts + 1))
    inclusion = np.zeros(experts)
    for tup, q in successive_sampling(law, k).items():
        inclusion[list(tup)] += q
    counts = np.bincount(t.expert_ids[:, 0, :].ravel(), minlength=experts) / n
    # The layer's ranking is random: match the sorted shares.
    assert np.sort(counts)[::-1] == pytest.approx(np.sort(inclusion)[::-1], abs=0.01)
