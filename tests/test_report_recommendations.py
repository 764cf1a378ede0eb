"""Every recommendation branch and threshold of the report, on results dicts built by hand.

Each verdict (docs/user-guide.md lists them) is pinned by its own sentence, at its threshold and
just beside it, so moving a threshold or dropping a branch fails a test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from moeprof.report.rows import (
    CLOSE_TO_UNIFORM_PP,
    DIMINISHING_PP,
    HALF,
    LAYER_SPREAD_PP,
    build_report,
)

BELOW = 1e-9  # just under a threshold, whatever its scale

# Two savings whose difference is exactly CLOSE_TO_UNIFORM_PP percentage points in floating point
# (0.5 - 0.49 would be 1.0000000000000009): the boundary itself, not a neighbour of it.
AT_PLUS_ONE_PP = (0.0125, 0.0025)
AT_MINUS_ONE_PP = (0.0025, 0.0125)


def _doc(
    rows: Sequence[tuple[int, float, float]],
    *,
    policy: str = "tokens",
    top_layers: Sequence[float] | None = None,
) -> dict[str, Any]:
    """A results dict: one (batch size, memory savings, uniform savings) per row, two layers each
    saving as much as the row (or `top_layers` for the last row); expert sizes unknown."""
    results = []
    for i, (size, savings, uniform) in enumerate(rows):
        layer_savings = top_layers if top_layers is not None and i == len(rows) - 1 else None
        layers = [
            {"layer": j, "memory_savings": s}
            for j, s in enumerate(layer_savings or [savings, savings])
        ]
        results.append(
            {
                "batch_size": size,
                "policy": policy,
                "n_batches": 10,
                "requests": 1000,
                "unique": round(1000 * (1 - savings)),
                "memory_savings": savings,
                "bandwidth_savings": savings,
                "bytes_requested": 0,
                "bytes_unique": 0,
                "uniform_memory_savings": uniform,
                "layers": layers,
            }
        )
    return {"trace": {"n_tokens": 100, "top_k": 2, "n_experts": [8, 8]}, "results": results}


def _recommendations(doc: dict[str, Any]) -> str:
    return "\n".join(build_report(doc).recommendations)


def test_the_boundary_pairs_are_exact() -> None:
    """The tests below rely on these differences being the thresholds exactly."""
    assert 100.0 * (AT_PLUS_ONE_PP[0] - AT_PLUS_ONE_PP[1]) == CLOSE_TO_UNIFORM_PP
    assert 100.0 * (AT_MINUS_ONE_PP[0] - AT_MINUS_ONE_PP[1]) == -CLOSE_TO_UNIFORM_PP
    assert 100.0 * (0.101 - 0.001) == LAYER_SPREAD_PP
    assert 100.0 * (0.1 - 0.05) == DIMINISHING_PP
    assert HALF == 0.5


# ---------------------------------------------------------------------- 50% memory savings


def test_smallest_batch_size_reaching_half_is_named_and_half_counts() -> None:
    text = _recommendations(_doc([(2, HALF - BELOW, 0.0), (4, HALF, 0.0), (8, 0.7, 0.0)]))
    assert (
        "Batch size 4 is the smallest analysed batch size that reaches 50% memory savings "
        "(50.0%): batch at least 4 tokens per expert load to halve expert traffic." in text
    )
    assert "No analysed batch size" not in text


def test_no_batch_size_reaching_half() -> None:
    text = _recommendations(_doc([(2, 0.2, 0.0), (4, HALF - BELOW, 0.0)]))
    assert (
        "No analysed batch size reaches 50% memory savings; the largest, 4, saves 50.0%. Larger "
        "batches, caching or locality-aware batching are needed to halve expert traffic." in text
    )
    assert "is the smallest analysed batch size" not in text


@pytest.mark.parametrize(
    ("savings", "verdict"), [(HALF, "reaches"), (HALF - BELOW, "does not reach")]
)
def test_recorded_batches_reach_half_or_not(savings: float, verdict: str) -> None:
    text = _recommendations(_doc([(3, savings, savings)], policy="recorded"))
    assert (
        "Deduplication over the recorded batches (10 batches of up to 3 tokens) saves 50.0% of "
        f"expert loads: the serving run as recorded {verdict} 50% memory savings. Analyse with "
        "policy 'tokens' or 'decode' to see how other batch sizes would do." in text
    )
    assert "smallest analysed batch size" not in text and "No analysed" not in text


# ---------------------------------------------------------------------- locality vs uniform

UNIFORM_LIKE = "Routing shows about as much reuse as uniform random routing would (within 1 "
MORE = "Routing shows more reuse than uniform random routing would"
LESS = "Routing shows less reuse than uniform random routing would"


def _locality_verdicts(text: str) -> list[str]:
    return [v for v in (UNIFORM_LIKE, MORE, LESS) if v in text]


def test_within_one_point_either_way_is_uniform_like() -> None:
    text = _recommendations(
        _doc([(1, 0.0, 0.05), (2, *AT_PLUS_ONE_PP), (4, *AT_MINUS_ONE_PP), (8, 0.3, 0.3)])
    )
    # Batch size 1 (5 points below uniform) is not compared: one token cannot share experts.
    assert _locality_verdicts(text) == [UNIFORM_LIKE]
    assert (
        UNIFORM_LIKE + "percentage point at every batch size): the savings come from batching "
        "alone, not from locality in this workload." in text
    )


def test_uniform_like_recorded_batches() -> None:
    text = _recommendations(_doc([(5, *AT_PLUS_ONE_PP)], policy="recorded"))
    assert _locality_verdicts(text) == [UNIFORM_LIKE]
    assert "percentage point for the recorded batches)" in text


def test_more_than_one_point_above_uniform_is_more_reuse() -> None:
    text = _recommendations(_doc([(2, 0.0135, 0.0025), (4, 0.4, 0.43)]))
    assert _locality_verdicts(text) == [MORE]
    assert (
        MORE + ": at batch size 2, 1.4% vs 0.2% (+1.1 percentage points). Skewed or local "
        "routing pays off; an expert cache or locality-aware batching can add to it." in text
    )


def test_exactly_one_point_above_is_not_more_reuse() -> None:
    """Best gain exactly +1 point, another row 5 points below: the worst row is reported."""
    text = _recommendations(_doc([(2, *AT_PLUS_ONE_PP), (4, 0.35, 0.4)]))
    assert _locality_verdicts(text) == [LESS]
    assert (
        LESS + ": at batch size 4, 35.0% vs 40.0% (-5.0 percentage points): tokens batched "
        "together tend to pick different experts." in text
    )


def test_more_than_one_point_below_uniform_is_less_reuse() -> None:
    text = _recommendations(_doc([(2, 0.0024, 0.0125), (4, 0.4, 0.4)]))
    assert _locality_verdicts(text) == [LESS]
    assert "at batch size 2, 0.2% vs 1.2% (-1.0 percentage points)" in text


# ---------------------------------------------------------------------- layers, returns, bytes


def test_layers_exactly_ten_points_apart_differ() -> None:
    text = _recommendations(_doc([(2, 0.05, 0.05)], top_layers=[0.101, 0.001]))
    assert (
        "Layers differ: at batch size 2, layer 0 saves 10.1% and layer 1 0.1% (10.0 points "
        "apart); give per-layer cache budgets to the layers that reuse least." in text
    )
    assert "Layers behave alike" not in text


def test_layers_just_under_ten_points_apart_behave_alike() -> None:
    text = _recommendations(_doc([(2, 0.05, 0.05)], top_layers=[0.101 - BELOW, 0.001]))
    assert (
        "Layers behave alike: at batch size 2 their savings lie within 10.0 percentage points "
        "of each other." in text
    )
    assert "Layers differ" not in text


def test_diminishing_returns_below_five_points_only() -> None:
    text = _recommendations(_doc([(2, 0.05, 0.05), (4, 0.1 - BELOW, 0.1)]))
    assert (
        "Diminishing returns: going from batch size 2 to 4 adds only 5.0 percentage points of "
        "savings." in text
    )
    text = _recommendations(_doc([(2, 0.05, 0.05), (4, 0.1, 0.1)]))
    assert "Diminishing returns" not in text


def test_bytes_avoided_only_when_every_size_is_known() -> None:
    doc = _doc([(2, 0.5, 0.5)])
    assert "deduplication avoids" not in _recommendations(doc)
    doc["trace"]["expert_bytes"] = [100, 300]
    doc["results"][0].update(bytes_requested=4000, bytes_unique=1000)
    assert (
        "At batch size 2, deduplication avoids 2.93 KiB of host-to-device expert traffic over "
        "this trace (30 B per token)." in _recommendations(doc)
    )
