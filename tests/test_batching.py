"""Batching policies: the registry, what it feeds (validation, help, analyze), and plan
properties. The batches themselves are checked against a brute-force simulation in
test_analyze.py."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_trace
from test_analyze import reference_counts

import moeprof
from moeprof.analyze import expert_masks, unique_per_batch
from moeprof.batching import (
    POLICIES,
    REGISTRY,
    BatchPlan,
    BatchPolicy,
    check_batch_sizes,
    get_policy,
    plan_batches,
    policy_help,
)
from moeprof.errors import MoeprofError
from moeprof.trace import Trace


def test_registry_names() -> None:
    assert (
        POLICIES == tuple(REGISTRY) == moeprof.POLICIES == ("tokens", "decode", "recorded", "serve")
    )
    for name, policy in REGISTRY.items():
        assert policy.name == name and policy.help
    assert [p.takes_batch_size for p in REGISTRY.values()] == [True, True, False, True]


def test_unknown_policy_message() -> None:
    with pytest.raises(
        MoeprofError,
        match=r"^unknown policy 'greedy'; choose one of tokens, decode, recorded, serve$",
    ):
        get_policy("greedy")
    with pytest.raises(MoeprofError, match="unknown policy 'greedy'"):
        plan_batches(moeprof.synthesize(n_layers=1, seed=0), "greedy", 4)


def test_help_lists_every_policy() -> None:
    text = policy_help()
    for policy in REGISTRY.values():
        assert f"{policy.name} ({policy.help})" in text


def test_a_policy_without_batch_size_plans_once() -> None:
    trace = random_trace(np.random.default_rng(3), n_tokens=30)
    plans = get_policy("recorded").plans(trace, [1, 4, 9])
    assert len(plans) == 1 and plans[0].batch_size == int(plans[0].batch_tokens.max())
    plans = get_policy("decode").plans(trace, [1, 4, 9])
    assert [p.batch_size for p in plans] == [1, 4, 9]


def test_equal_contiguous() -> None:
    # Two requests interleave under decode; tokens batches are always consecutive rows.
    trace = Trace.from_arrays(
        np.zeros((7, 1, 1), dtype=np.int64), n_experts=2, request_ids=[0] * 4 + [1] * 3
    )
    tokens = plan_batches(trace, "tokens", 3)
    assert tokens.equal_contiguous and tokens.batch_tokens.tolist() == [3, 3, 1]
    assert plan_batches(trace, "tokens", 100).equal_contiguous  # one batch, the whole trace
    assert tokens.head(2).equal_contiguous
    decode = plan_batches(trace, "decode", 2)
    assert not decode.is_identity and not decode.equal_contiguous
    # The property is the plan's, not the policy name's: one request decoded one token a step.
    single = Trace.from_arrays(np.zeros((5, 1, 1), dtype=np.int64), n_experts=2)
    one = plan_batches(single, "decode", 1)
    assert one.is_identity and one.equal_contiguous
    uneven = BatchPlan("x", 3, np.arange(5), np.array([0, 2, 5]))
    assert uneven.is_identity and not uneven.equal_contiguous


def test_head() -> None:
    trace = moeprof.synthesize(n_layers=1, n_requests=3, tokens_per_request=10, seed=0)
    plan = plan_batches(trace, "decode", 2)
    assert plan.head(None) is plan and plan.head(plan.n_batches + 5) is plan
    first = plan.head(3)
    assert first.n_batches == 3 and first.n_rows == int(plan.starts[3])
    assert [first.rows(b).tolist() for b in range(3)] == [plan.rows(b).tolist() for b in range(3)]
    with pytest.raises(MoeprofError, match="max_batches must be at least 1, got 0"):
        plan.head(0)


@pytest.mark.parametrize("policy", ["tokens", "decode", "recorded"])
def test_counting_the_first_batches_counts_only_their_rows(policy: str) -> None:
    """A plan cut to its first batches (replay's max_batches) counts those batches' rows only,
    also when its rows are the first rows in stored order."""
    rng = np.random.default_rng(21)
    for _ in range(20):
        trace = random_trace(rng)
        plan = plan_batches(trace, policy, int(rng.integers(1, 4)))
        first = plan.head(max(1, plan.n_batches // 2))
        batches = [first.rows(b).tolist() for b in range(first.n_batches)]
        want = [reference_counts(trace, [rows])[1] for rows in batches]
        assert unique_per_batch(expert_masks(trace), first).tolist() == want
    single = Trace.from_arrays(np.arange(10).reshape(10, 1, 1) % 8, n_experts=8)
    first = plan_batches(single, "decode", 1).head(3)  # identity order, not the tokens policy
    assert unique_per_batch(expert_masks(single), first).ravel().tolist() == [1, 1, 1]


@pytest.mark.parametrize(
    "bad,message",
    [
        ([0], "batch size must be at least 1, got 0"),
        ([4, -1], "batch size must be at least 1, got -1"),
        ([True], "batch size must be a whole number, got True"),
        ([1.5], "batch size must be a whole number, got 1.5"),
        (["8"], "batch size must be a whole number, got '8'"),
        ([2**31], "batch size must be at most 2,147,483,647"),
        ([], "no batch sizes given"),
        ("1,8", "batch sizes must be whole numbers, not the text '1,8'"),
    ],
)
def test_check_batch_sizes(bad: object, message: str) -> None:
    assert check_batch_sizes([8, np.int64(2), 8]) == [2, 8]
    with pytest.raises(MoeprofError, match=f"^{message}"):
        check_batch_sizes(bad)  # type: ignore[arg-type]


class Reversed(BatchPolicy):
    """A policy added for the test: rows from last to first, in chunks of B."""

    name = "reversed"
    help = "stored rows backwards"

    def plan(self, trace: Trace, batch_size: int) -> BatchPlan:
        n = trace.n_tokens
        starts = np.concatenate((np.arange(0, n, batch_size), [n])).astype(np.int64)
        return BatchPlan(self.name, batch_size, np.arange(n - 1, -1, -1, dtype=np.int64), starts)


def test_a_registered_policy_is_validated_helped_and_analyzed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Adding a policy is a class and a registry entry: validation, help, analyze and replay
    pick it up with no other change."""
    trace = random_trace(np.random.default_rng(8), n_tokens=25)
    with pytest.raises(MoeprofError, match="unknown policy 'reversed'"):
        moeprof.analyze(trace, [4], policy="reversed")
    monkeypatch.setitem(REGISTRY, "reversed", Reversed())
    assert "reversed (stored rows backwards)" in policy_help()
    with pytest.raises(
        MoeprofError, match="choose one of tokens, decode, recorded, serve, reversed"
    ):
        get_policy("sideways")
    row = moeprof.analyze(trace, [4], policy="reversed").results[0]
    rows = list(range(trace.n_tokens))[::-1]
    batches = [rows[i : i + 4] for i in range(0, len(rows), 4)]
    requests, unique = reference_counts(trace, batches)
    assert row.policy == "reversed" and row.n_batches == len(batches)
    assert [lr.unique for lr in row.layers] == unique
    assert [lr.requests for lr in row.layers] == requests
    from moeprof.replay import replay

    doc = replay(
        trace,
        strategies=["dedup"],
        batch_sizes=[4],
        policy="reversed",
        expert_bytes=64,
        calibrate=False,
    ).to_dict()
    assert doc["replay"]["policy"] == "reversed"
    assert doc["results"][0]["replay"]["strategies"][0]["copies"] == sum(unique)
