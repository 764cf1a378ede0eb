"""Batching policies: which tokens are loaded together. Shared by analyze and replay.

One class per policy (``tokens``, ``decode``, ``recorded``, one module each) in a registry
(:mod:`moeprof.batching.registry`); each turns a trace into a :class:`BatchPlan`. Definitions:
docs/method.md, "Batches".
"""

from __future__ import annotations

from moeprof.batching.base import BatchPolicy
from moeprof.batching.plan import (
    MAX_BATCH_SIZE,
    BatchPlan,
    check_batch_size,
    check_batch_sizes,
)
from moeprof.batching.registry import POLICIES, REGISTRY, get_policy, policy_help
from moeprof.trace import Trace

__all__ = [
    "MAX_BATCH_SIZE",
    "POLICIES",
    "REGISTRY",
    "BatchPlan",
    "BatchPolicy",
    "check_batch_size",
    "check_batch_sizes",
    "get_policy",
    "plan_batches",
    "policy_help",
]


def plan_batches(trace: Trace, policy: str, batch_size: int) -> BatchPlan:
    """The batches of `trace` under the policy named `policy` with B = `batch_size`."""
    return get_policy(policy).plan(trace, batch_size)
