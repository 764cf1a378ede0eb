"""Record per-token, per-MoE-layer routing from a running PyTorch model into a trace.

    from moeprof.record import record       # or: moeprof.record_routing

    with record(model) as rec:
        model.generate(**inputs, max_new_tokens=32)
    trace = rec.to_trace()

Adapters (:mod:`moeprof.record.adapters`) say where each model routes; register your own with
:func:`register_adapter`. Expert sizes come from the model's tensors (:mod:`moeprof.record.sizes`).
"""

from __future__ import annotations

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
