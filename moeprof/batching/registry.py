"""The batching policies by name: adding one is a class in its own module plus a line here."""

from __future__ import annotations

from moeprof.batching.base import BatchPolicy
from moeprof.batching.decode import DecodePolicy
from moeprof.batching.recorded import RecordedPolicy
from moeprof.batching.serve import ServePolicy
from moeprof.batching.tokens import TokensPolicy
from moeprof.errors import MoeprofError

REGISTRY: dict[str, BatchPolicy] = {
    p.name: p
    for p in (
        TokensPolicy(),
        DecodePolicy(),
        RecordedPolicy(),
        ServePolicy(),
    )
}
POLICIES = tuple(REGISTRY)


def get_policy(name: str) -> BatchPolicy:
    policy = REGISTRY.get(name)
    if policy is None:
        raise MoeprofError(f"unknown policy {name!r}; choose one of {', '.join(REGISTRY)}")
    return policy


def policy_help() -> str:
    """`--policy` help: every registered policy with its few words."""
    listed = ", ".join(f"{p.name} ({p.help})" for p in REGISTRY.values())
    return f"How tokens form batches: {listed}."
