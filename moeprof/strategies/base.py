"""The interface every expert residency strategy implements (docs/replay.md, "What is
replayed")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from moeprof.batching import BatchPlan
from moeprof.strategies.schedule import LayerSchedule, Schedule, total_slots
from moeprof.trace import Trace


@dataclass(frozen=True)
class CountedLoads:
    """analyze's counts for one plan at the replayed layers: what strategies are checked
    against and sized from, without building a schedule."""

    requests: np.ndarray  # int64 [L]: (token, expert) requests per layer
    unique_per_batch: np.ndarray  # int64 [n_batches, L]: distinct experts per batch and layer

    @property
    def widest(self) -> list[int]:
        """Most distinct experts in one batch, per layer (at least 1)."""
        return [max(int(w), 1) for w in self.unique_per_batch.max(axis=0, initial=0)]


class Strategy:
    """How experts are kept on the device. Subclasses set the class attributes and methods."""

    name: ClassVar[str]  # the registry key, `--strategies` value and the results' "strategy"
    help: ClassVar[str]  # a few words for `--strategies` help
    uses_cache: ClassVar[bool] = False  # keeps `cache_experts` experts per layer across batches
    cache_label: ClassVar[str] = ""  # how reports name its cache ("LRU"), where uses_cache
    shared_slots: ClassVar[bool] = True  # all layers use one slot space (else one each)
    counted_basis: ClassVar[str]  # where counted_copies comes from, in the results JSON

    def layer_schedule(
        self, trace: Trace, plan: BatchPlan, layer: int, cache_experts: int
    ) -> LayerSchedule:
        """What this strategy issues at MoE layer `layer` for every batch of `plan`."""
        raise NotImplementedError

    def slots_needed(self, counted: CountedLoads, cache_experts: int) -> list[int]:
        """Slots per layer, from counts alone (the up-front memory check); equal to the
        schedule's ``n_slots``."""
        raise NotImplementedError

    def counted_copies(self, counted: CountedLoads, schedule: Schedule) -> int:
        """The copies the counting predicts, which the replayed copies must equal."""
        raise NotImplementedError

    def schedule(
        self, trace: Trace, plan: BatchPlan, layers: Sequence[int], cache_experts: int = 0
    ) -> Schedule:
        per_layer = tuple(
            self.layer_schedule(trace, plan, layer, cache_experts) for layer in layers
        )
        return Schedule(
            self.name,
            plan,
            per_layer,
            shared_slots=self.shared_slots,
            cache_experts=cache_experts if self.uses_cache else 0,
        )

    def total_slots(self, counted: CountedLoads, cache_experts: int) -> int:
        """Device slots the whole schedule needs, from counts alone."""
        return total_slots(self.slots_needed(counted, cache_experts), self.shared_slots)
