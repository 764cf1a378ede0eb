"""Replay: re-execute a trace's expert loads per residency strategy and measure them.

``replay(trace, device="cuda", strategies=("naive", "dedup", "lru"), batch_sizes=(8, 64))``
returns a :class:`ReplayResult`; ``.to_dict()`` is the results JSON of analyze for the same
batches plus the measured numbers (docs/replay.md). The strategies live in
:mod:`moeprof.strategies`. Torch is imported when a replay runs.
"""

from __future__ import annotations

from moeprof.replay.engine import ReplayInterrupted, replay
from moeprof.replay.results import LatencyStats, ReplayResult, StrategyRun

__all__ = [
    "LatencyStats",
    "ReplayInterrupted",
    "ReplayResult",
    "StrategyRun",
    "replay",
]
