"""Executors: one interface for running picklable work items in parallel, in a local process pool
or as Ray tasks (docs/sweep.md, "Executors"). One class per executor in its own module, plus a
line in :mod:`moeprof.executors.registry`; Ray is imported only when the Ray executor is built."""

from __future__ import annotations

from moeprof.executors.base import Executor
from moeprof.executors.registry import EXECUTORS, check_executor, executor_help, get_executor

__all__ = ["EXECUTORS", "Executor", "check_executor", "executor_help", "get_executor"]
