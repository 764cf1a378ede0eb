"""Replay: re-execute a trace's expert loads (naive, dedup, LRU-cached) and measure them.

``replay(trace, device="cuda", strategies=("naive", "dedup", "lru"), batch_sizes=(8, 64))``
returns a :class:`ReplayResult`; ``.to_dict()`` is the results JSON of analyze for the same
batches plus the measured numbers (docs/replay.md). Torch is imported when a replay runs.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from moeprof.replay.engine import ReplayInterrupted, replay
from moeprof.replay.results import LatencyStats, ReplayResult, StrategyRun
from moeprof.replay.schedule import STRATEGIES, Schedule, build_schedule

__all__ = [
    "STRATEGIES",
    "LatencyStats",
    "ReplayInterrupted",
    "ReplayResult",
    "Schedule",
    "StrategyRun",
    "build_schedule",
    "replay",
]


class _CallableModule(types.ModuleType):
    """`moeprof.replay` names both this package and the function: importing the package binds
    the attribute to the module, so the module forwards calls to :func:`replay`."""

    def __call__(self, *args: Any, **kwargs: Any) -> ReplayResult:
        return replay(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
