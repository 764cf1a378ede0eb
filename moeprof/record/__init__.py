"""Record per-token, per-MoE-layer routing from a running PyTorch model into a trace.

    with moeprof.record(model) as rec:
        model.generate(**inputs, max_new_tokens=32)
    trace = rec.to_trace()

Adapters (:mod:`moeprof.record.adapters`) say where each model routes; register your own with
:func:`register_adapter`. Expert sizes come from the model's tensors (:mod:`moeprof.record.sizes`).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from moeprof.record.adapters import (
    Adapter,
    MoeLayer,
    adapters,
    find_moe_layers,
    register_adapter,
    unregister_adapter,
)
from moeprof.record.recorder import Recorder, record

__all__ = [
    "Adapter",
    "MoeLayer",
    "Recorder",
    "adapters",
    "find_moe_layers",
    "record",
    "register_adapter",
    "unregister_adapter",
]


class _CallableModule(types.ModuleType):
    """``moeprof.record`` names both this package and its main function.

    Importing ``moeprof.record`` (the package) binds it as an attribute of ``moeprof``, which
    would shadow the lazy ``moeprof.record`` -> :func:`record` mapping; calling the package
    calls the function, so ``moeprof.record(model)`` works either way.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Recorder:
        return record(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
