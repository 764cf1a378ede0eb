"""A fake pynvml for tests without a GPU, with scenarios named after real failures.

It behaves like nvidia-ml-py: NVMLError subclasses carrying ``.value``, field values with a
per-field ``nvmlReturn``, a ``valueType`` and a ``value`` union. Plug it in with
:func:`gateway_for` (a gateway of one's own) or by replacing
``moeprof.nvml.binding._import_pynvml`` with :func:`loader_for` (the process-wide gateway).
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moeprof import nvml

SUCCESS = 0
ERROR_INVALID_ARGUMENT = 2
ERROR_NOT_SUPPORTED = 3
ERROR_NOT_FOUND = 6
ERROR_LIBRARY_NOT_FOUND = 12
ERROR_GPU_IS_LOST = 15
VALUE_DOUBLE = 0
VALUE_UINT = 1
VALUE_ULL = 3
FI_TX = 197
FI_RX = 198


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return f"fake NVML error {self.value}"


class FakeClock:
    """A host clock that only moves when told (``sleep`` moves it too)."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)


@dataclass
class FakeGpu:
    """State behind the fake binding: counters, what is supported, what fails."""

    counter_bits: int = 64
    value_type: int = VALUE_ULL
    rx_bytes: int = 0  # true cumulative traffic (unwrapped)
    tx_bytes: int = 0
    counters_supported: bool = True
    field_return: int | None = None  # every counter field answers this nvmlReturn
    throughput_supported: bool = True
    throughput_kib_s: tuple[int, int] = (0, 0)  # (rx, tx)
    rx_per_read: int = 0  # traffic the device makes between two reads
    tx_per_read: int = 0
    lost_after_reads: int | None = None  # field reads before the GPU falls off the bus
    init_error: int | None = None
    bus_ids: dict[str, int] = field(default_factory=lambda: {"00000000:3B:00.0": 0})
    reads: int = 0
    init_calls: int = 0
    # Time-driven scenarios: with a clock, traffic is logged when it happens (transfer()), the
    # counters show it only `report_delay_s` later (a driver that refreshes them late), and
    # each field carries NVML's timestamp (µs) of the value shown.
    clock: FakeClock | None = None
    report_delay_s: float = 0.0
    # A driver that caches the counters: refreshed every `refresh_period_s`, each value stamped
    # with its refresh time (instead of the time it changed).
    refresh_period_s: float = 0.0
    history: list[tuple[float, int, int]] = field(default_factory=list)
    # Throughput: each call blocks `throughput_call_s` (moving the clock) and, with
    # `throughput_fn(t0, t1) -> (rx, tx) KiB/s`, reports the average over the window ending
    # at its return.
    throughput_call_s: float = 0.0
    throughput_fn: Callable[[float, float], tuple[int, int]] | None = None
    throughput_calls: list[tuple[int, float]] = field(default_factory=list)

    def transfer(self, rx: int, tx: int = 0) -> None:
        """The device moves bytes now."""
        self.rx_bytes += rx
        self.tx_bytes += tx
        if self.clock is not None:
            self.history.append((self.clock(), self.rx_bytes, self.tx_bytes))

    def _shown(self) -> tuple[int, int, float | None]:
        """(rx, tx, time of that value) the counters show now."""
        if self.clock is None:
            return self.rx_bytes, self.tx_bytes, None
        if not self.history:
            self.history.append((self.clock() - 1.0, self.rx_bytes, self.tx_bytes))
        visible = self.clock() - self.report_delay_s
        if self.refresh_period_s:
            visible = math.floor(visible / self.refresh_period_s) * self.refresh_period_s
        shown = self.history[0]
        for entry in self.history:
            if entry[0] <= visible:
                shown = entry
        return shown[1], shown[2], (visible if self.refresh_period_s else shown[0])

    def module(self) -> types.ModuleType:
        gpu = self
        m = types.ModuleType("pynvml")
        m.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
        for name, value in {
            "NVML_SUCCESS": SUCCESS,
            "NVML_ERROR_INVALID_ARGUMENT": ERROR_INVALID_ARGUMENT,
            "NVML_ERROR_NOT_SUPPORTED": ERROR_NOT_SUPPORTED,
            "NVML_ERROR_NOT_FOUND": ERROR_NOT_FOUND,
            "NVML_ERROR_LIBRARY_NOT_FOUND": ERROR_LIBRARY_NOT_FOUND,
            "NVML_ERROR_GPU_IS_LOST": ERROR_GPU_IS_LOST,
            "NVML_FI_DEV_PCIE_COUNT_TX_BYTES": FI_TX,
            "NVML_FI_DEV_PCIE_COUNT_RX_BYTES": FI_RX,
            "NVML_PCIE_UTIL_TX_BYTES": 0,
            "NVML_PCIE_UTIL_RX_BYTES": 1,
        }.items():
            setattr(m, name, value)

        def init() -> None:
            gpu.init_calls += 1
            if gpu.init_error is not None:
                raise FakeNVMLError(gpu.init_error)

        def handle_by_index(i: int) -> Any:
            gpu._check_lost()
            if i != 0:
                raise FakeNVMLError(ERROR_NOT_FOUND)
            return ("handle", 0)

        def handle_by_bus(bus: str) -> Any:
            if bus not in gpu.bus_ids:
                raise FakeNVMLError(ERROR_NOT_FOUND)
            return ("handle", gpu.bus_ids[bus])

        def field_values(handle: Any, ids: list[int]) -> list[Any]:
            gpu._check_lost()
            gpu.reads += 1
            if gpu.reads > 1 and (gpu.rx_per_read or gpu.tx_per_read):
                gpu.transfer(gpu.rx_per_read, gpu.tx_per_read)
            rx, tx, stamp = gpu._shown()
            return [gpu._field(fid, {FI_RX: rx, FI_TX: tx}[fid], stamp) for fid in ids]

        def throughput(handle: Any, counter: int) -> int:
            gpu._check_lost()
            if not gpu.throughput_supported:
                raise FakeNVMLError(ERROR_NOT_SUPPORTED)
            if gpu.clock is not None:
                gpu.clock.t += gpu.throughput_call_s
            if gpu.throughput_fn is not None and gpu.clock is not None:
                now = gpu.clock()
                rates = gpu.throughput_fn(now - nvml.THROUGHPUT_WINDOW_S, now)
            else:
                rates = gpu.throughput_kib_s
            value = rates[0] if counter == 1 else rates[1]
            gpu.throughput_calls.append((counter, gpu.clock() if gpu.clock else 0.0))
            return value

        funcs = {
            "nvmlInit": init,
            "nvmlShutdown": lambda: None,
            "nvmlDeviceGetCount": lambda: 1,
            "nvmlDeviceGetHandleByIndex": handle_by_index,
            "nvmlDeviceGetHandleByPciBusId": handle_by_bus,
            "nvmlDeviceGetFieldValues": field_values,
            "nvmlDeviceGetPcieThroughput": throughput,
            "nvmlDeviceGetName": lambda h: b"NVIDIA H200",
            "nvmlDeviceGetUUID": lambda h: "GPU-1234",
            "nvmlDeviceGetPciInfo": lambda h: types.SimpleNamespace(busId=b"00000000:3B:00.0"),
            "nvmlDeviceGetMemoryInfo": lambda h: types.SimpleNamespace(total=141 << 30),
            "nvmlDeviceGetCurrPcieLinkGeneration": lambda h: 1,  # idle links downshift
            "nvmlDeviceGetMaxPcieLinkGeneration": lambda h: 5,
            "nvmlDeviceGetGpuMaxPcieLinkGeneration": lambda h: 5,
            "nvmlDeviceGetCurrPcieLinkWidth": lambda h: 16,
            "nvmlDeviceGetMaxPcieLinkWidth": lambda h: 16,
            "nvmlSystemGetDriverVersion": lambda: "560.35.03",
            "nvmlSystemGetCudaDriverVersion": lambda: 12060,
        }
        for name, fn in funcs.items():
            setattr(m, name, fn)
        return m

    def _check_lost(self) -> None:
        if self.lost_after_reads is not None and self.reads >= self.lost_after_reads:
            raise FakeNVMLError(ERROR_GPU_IS_LOST)

    def _field(self, fid: int, true_value: int, stamp: float | None) -> Any:
        ret = self.field_return
        if ret is None:
            ret = SUCCESS if self.counters_supported else ERROR_NOT_SUPPORTED
        if ret != SUCCESS:
            return types.SimpleNamespace(
                fieldId=fid,
                nvmlReturn=ret,
                valueType=self.value_type,
                value=types.SimpleNamespace(uiVal=0, ullVal=0, dVal=0.0),
            )
        wrapped = true_value % (1 << self.counter_bits)
        # Like the C union: every member aliases the same bytes; only the typed one is right.
        garbage_high = 0xDEAD << 48 if self.value_type == VALUE_UINT else 0
        value = types.SimpleNamespace(
            uiVal=wrapped & 0xFFFFFFFF, ullVal=wrapped | garbage_high, dVal=float(wrapped)
        )
        out = types.SimpleNamespace(
            fieldId=fid, nvmlReturn=SUCCESS, valueType=self.value_type, value=value
        )
        if stamp is not None:
            out.timestamp = int(round(stamp * 1e6))
        return out


def loader_for(gpu: FakeGpu | None) -> Callable[[], types.ModuleType]:
    """What imports the binding: `gpu`'s fake pynvml, or, for None, an ImportError."""
    if gpu is None:

        def missing() -> types.ModuleType:
            raise ImportError("No module named 'pynvml'")

        return missing
    module = gpu.module()
    return lambda: module


def gateway_for(gpu: FakeGpu | None) -> nvml.Nvml:
    """A gateway of its own on `gpu`'s fake pynvml (None: nvidia-ml-py not installed)."""
    return nvml.Nvml(loader=loader_for(gpu))
