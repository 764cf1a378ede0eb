"""NVML, the one way moeprof talks to the GPU's management library (module ``pynvml``).

- :mod:`~moeprof.nvml.binding`: the gateway, the only module importing pynvml; lazy init, every
  failure a typed :class:`NotAvailable`;
- :mod:`~moeprof.nvml.counters`: reading PCIe byte counters and throughput, counter arithmetic;
- :mod:`~moeprof.nvml.monitor`: :class:`PcieMonitor`, a run's PCIe bytes by the best method;
- :mod:`~moeprof.nvml.inventory`: driver, devices and PCIe links (what ``moeprof doctor`` shows).

``from moeprof import nvml`` and the names below are the interface for the rest of moeprof.
"""

from __future__ import annotations

from moeprof.nvml.binding import (
    DRIVER_MISSING,
    ERROR,
    FUNCTION_MISSING,
    GPU_LOST,
    LIBRARY_MISSING,
    NO_DEVICE,
    NO_PERMISSION,
    NOT_SUPPORTED,
    NotAvailable,
    Nvml,
    available,
    gateway,
    reset,
)
from moeprof.nvml.counters import (
    BACKWARDS,
    MAX_LINK_BYTES_PER_S,
    MIN_ELAPSED_S,
    PLAUSIBLE_FACTOR,
    THROUGHPUT_WINDOW_S,
    WRAP32,
    CounterReading,
    counter_delta,
    counter_step,
    plausible_bytes,
    read_pcie_counters,
    read_pcie_throughput_kib_s,
)
from moeprof.nvml.inventory import DeviceInfo, SystemInfo, device_info, pcie_link_gbps, system_info
from moeprof.nvml.monitor import (
    METHOD_COUNTED,
    METHOD_COUNTERS,
    METHOD_THROUGHPUT,
    PcieMeasurement,
    PcieMonitor,
)

__all__ = [
    "BACKWARDS",
    "DRIVER_MISSING",
    "ERROR",
    "FUNCTION_MISSING",
    "GPU_LOST",
    "LIBRARY_MISSING",
    "MAX_LINK_BYTES_PER_S",
    "METHOD_COUNTED",
    "METHOD_COUNTERS",
    "METHOD_THROUGHPUT",
    "MIN_ELAPSED_S",
    "NOT_SUPPORTED",
    "NO_DEVICE",
    "NO_PERMISSION",
    "PLAUSIBLE_FACTOR",
    "THROUGHPUT_WINDOW_S",
    "WRAP32",
    "CounterReading",
    "DeviceInfo",
    "NotAvailable",
    "Nvml",
    "PcieMeasurement",
    "PcieMonitor",
    "SystemInfo",
    "available",
    "counter_delta",
    "counter_step",
    "device_info",
    "gateway",
    "pcie_link_gbps",
    "plausible_bytes",
    "read_pcie_counters",
    "read_pcie_throughput_kib_s",
    "reset",
    "system_info",
]
