"""Sweeps: grids of traces x analysis settings x batch sizes from one YAML file, run in a local
process pool, resumable (docs/sweep.md)."""

from __future__ import annotations

from moeprof.sweep.analyses import REGISTRY, Analysis
from moeprof.sweep.runner import SweepRun, run_source, run_sweep
from moeprof.sweep.spec import Experiment, Sweep, TraceSource, load_sweep, parse_sweep

__all__ = [
    "REGISTRY",
    "Analysis",
    "Experiment",
    "Sweep",
    "SweepRun",
    "TraceSource",
    "load_sweep",
    "parse_sweep",
    "run_source",
    "run_sweep",
]
