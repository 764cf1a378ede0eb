"""Replay results: dataclasses out, and the results-JSON they become (docs/replay.md).

The document is the results JSON of `analyze` for the replayed batches and layers, plus, per
batch-size row, ``replay.strategies`` (one entry per strategy: copies, bytes, seconds, GB/s, NVML
bytes, and measured-versus-counted savings), and a top-level ``replay`` object describing the
run (device, calibration, measurement method, sizes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeprof.analyze import AnalysisResult
from moeprof.nvml import PcieMeasurement
from moeprof.strategies import BASELINE

AGREEMENT_TOLERANCE = 0.10  # measured cost ratio within 10% of the counted one


@dataclass(frozen=True)
class LatencyStats:
    batches: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> LatencyStats | None:
        if not seconds:
            return None
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        return cls(
            batches=int(ms.shape[0]),
            mean_ms=float(ms.mean()),
            p50_ms=float(np.percentile(ms, 50)),
            p90_ms=float(np.percentile(ms, 90)),
            max_ms=float(ms.max()),
        )


@dataclass(frozen=True)
class StrategyRun:
    """One strategy replayed at one batch size."""

    strategy: str
    batch_size: int
    n_batches: int
    copies: int  # host->device copies issued
    counted_copies: int  # what the counting predicts (Strategy.counted_copies)
    counted_basis: str  # where that count comes from (Strategy.counted_basis)
    layer_copies: tuple[int, ...]
    hits: int  # expert uses served from experts kept on the device (a cache's hits)
    bytes_copied: int  # payload actually moved (replayed block size)
    bytes_copied_full_size: int  # the same copies at the trace's expert size
    seconds: float  # device time from the first copy to the last operation
    wall_seconds: float  # host time, including issuing every copy from Python
    peak_gbps: float | None
    pcie: PcieMeasurement
    batch_latency: LatencyStats | None = None
    issue_seconds: float | None = None  # host time to issue the run's work (before waiting)
    host_bound: bool | None = None  # GPU: the GPU waited for Python (engine._host_bound); CPU: None

    @property
    def gbps(self) -> float:
        return self.bytes_copied / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def share_of_peak(self) -> float | None:
        return self.gbps / self.peak_gbps if self.peak_gbps else None

    @property
    def measured_to_counted(self) -> float | None:
        if self.pcie.rx_bytes is None or self.bytes_copied == 0:
            return None
        return self.pcie.rx_bytes / self.bytes_copied

    def to_dict(self) -> dict[str, Any]:
        scaled = self.bytes_copied_full_size != self.bytes_copied
        return {
            "strategy": self.strategy,
            "n_batches": self.n_batches,
            "copies": self.copies,
            "counted_copies": self.counted_copies,
            "counted_basis": self.counted_basis,
            "copies_match_counted": self.copies == self.counted_copies,
            "layer_copies": list(self.layer_copies),
            "hits": self.hits,
            "bytes_copied": self.bytes_copied,
            "bytes_copied_full_size": self.bytes_copied_full_size,
            "seconds": self.seconds,
            "wall_seconds": self.wall_seconds,
            "issue_seconds": self.issue_seconds,
            "host_bound": self.host_bound,
            "gbps": self.gbps,
            "share_of_peak": self.share_of_peak,
            "projected_seconds_full_size": (
                self.bytes_copied_full_size / (self.gbps * 1e9) if scaled and self.gbps else None
            ),
            "nvml_method": self.pcie.method,
            "nvml_rx_bytes": self.pcie.rx_bytes,
            "nvml_tx_bytes": self.pcie.tx_bytes,
            "nvml_reason": self.pcie.reason,
            "nvml_window_seconds": self.pcie.window_s,
            "nvml_samples": self.pcie.samples,
            "nvml_counter_bits": self.pcie.counter_bits,
            "nvml_raw": {
                "first": self.pcie.first_reading,
                "last": self.pcie.last_reading,
                "samples": self.pcie.samples,
                "max_sample_gap_seconds": self.pcie.max_sample_gap_s,
                "wrap_safe": self.pcie.wrap_safe,
                "wrap32_fixes": self.pcie.wrap32_fixes,
                "anomalies": self.pcie.anomalies,
                "settle_start_seconds": self.pcie.settle_start_s,
                "settle_stop_seconds": self.pcie.settle_stop_s,
                "settled": self.pcie.settled,
            },
            "measured_to_counted": self.measured_to_counted,
            "batch_latency": None if self.batch_latency is None else vars(self.batch_latency),
        }


def compare_with_naive(run: StrategyRun, naive: StrategyRun | None) -> dict[str, Any]:
    """Savings against the baseline strategy (naive), counted (payload) and measured (NVML RX
    bytes, else seconds).

    They agree when the measured cost ratio strategy/naive is within 10% of the counted one.
    """
    out: dict[str, Any] = {
        "counted_savings": None,
        "measured_savings_seconds": None,
        "measured_savings_nvml": None,
        "basis": None,
        "agrees_within_10pct": None,
        "reason": None,
    }
    if run.strategy == BASELINE:
        out["reason"] = "baseline"
        return out
    if naive is None:
        out["reason"] = f"{BASELINE} was not replayed at this batch size"
        return out
    if naive.bytes_copied == 0:
        out["reason"] = f"{BASELINE} copied nothing"
        return out
    counted_cost = run.bytes_copied / naive.bytes_copied
    out["counted_savings"] = 1.0 - counted_cost
    measured_cost: float | None = None
    if naive.seconds > 0:
        out["measured_savings_seconds"] = 1.0 - run.seconds / naive.seconds
        measured_cost = run.seconds / naive.seconds
        out["basis"] = "seconds"
    if run.pcie.rx_bytes is not None and naive.pcie.rx_bytes:
        nvml_cost = run.pcie.rx_bytes / naive.pcie.rx_bytes
        out["measured_savings_nvml"] = 1.0 - nvml_cost
        measured_cost = nvml_cost
        out["basis"] = "nvml_rx_bytes"
    if measured_cost is None:
        out["reason"] = "nothing measured"
    elif counted_cost == 0:
        out["reason"] = "the strategy copied nothing: no ratio to compare"
    else:
        out["agrees_within_10pct"] = bool(
            abs(measured_cost / counted_cost - 1.0) <= AGREEMENT_TOLERANCE
        )
    return out


@dataclass(frozen=True)
class ReplayResult:
    analysis: AnalysisResult  # counted, for exactly the replayed batches and layers
    runs: tuple[StrategyRun, ...]
    info: dict[str, Any]
    batches_total: dict[int, int] = field(default_factory=dict)  # batch size -> batches in plan
    interrupted: bool = False

    def runs_for(self, batch_size: int) -> list[StrategyRun]:
        return [r for r in self.runs if r.batch_size == batch_size]

    def to_dict(self) -> dict[str, Any]:
        doc = self.analysis.to_dict()
        for row in doc["results"]:
            b = int(row["batch_size"])
            runs = self.runs_for(b)
            naive = next((r for r in runs if r.strategy == BASELINE), None)
            strategies = []
            for r in runs:
                entry = r.to_dict()
                entry["vs_naive"] = compare_with_naive(r, naive)
                strategies.append(entry)
            row["replay"] = {
                "batches_replayed": int(row["n_batches"]),
                "batches_total": self.batches_total.get(b, int(row["n_batches"])),
                "strategies": strategies,
            }
        doc["replay"] = dict(self.info, interrupted=self.interrupted)
        return doc
