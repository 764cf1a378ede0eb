"""moeprof: a trace-driven profiler for Mixture-of-Experts inference with offloaded experts.

Library first: every ``moeprof <verb>`` is one of these functions plus a renderer.
"""

from __future__ import annotations

from moeprof._version import __version__
from moeprof.analyze import AnalysisResult, BatchSizeResult, LayerResult, analyze
from moeprof.batching import POLICIES, BatchPlan, plan_batches
from moeprof.cache import CacheResult, simulate_cache
from moeprof.errors import MoeprofError
from moeprof.synth import synthesize
from moeprof.trace import FORMAT_VERSION, Trace, load_trace

__all__ = [
    "FORMAT_VERSION",
    "POLICIES",
    "AnalysisResult",
    "BatchPlan",
    "BatchSizeResult",
    "CacheResult",
    "LayerResult",
    "MoeprofError",
    "Trace",
    "__version__",
    "analyze",
    "load_trace",
    "plan_batches",
    "simulate_cache",
    "synthesize",
]

# Entry points whose modules import torch or transformers load on first use, so that
# `import moeprof` stays light for analysis-only users. No name here is also a subpackage
# (`moeprof.record`, `moeprof.replay`): importing a subpackage binds its name on `moeprof`,
# which would shadow a function of the same name.
_LAZY = {
    "record_routing": ("moeprof.record", "record"),
    "import_trace": ("moeprof.importers", "import_trace"),
    "export_trace": ("moeprof.export", "export_trace"),
    "replay_trace": ("moeprof.replay", "replay"),
}


def __getattr__(name: str) -> object:
    import importlib

    if name == "demo":
        return importlib.import_module("moeprof.demo")
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'moeprof' has no attribute {name!r}")
