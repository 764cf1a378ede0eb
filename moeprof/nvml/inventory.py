"""What NVML says about the machine: driver, CUDA driver version and each device's PCIe link
and counters, every field a value or a NotAvailable (what ``moeprof doctor`` shows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moeprof.nvml.binding import NotAvailable, Nvml, gateway
from moeprof.nvml.counters import CounterReading, read_pcie_counters, read_pcie_throughput_kib_s

__all__ = ["DeviceInfo", "SystemInfo", "device_info", "pcie_link_gbps", "system_info"]


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str | NotAvailable
    uuid: str | NotAvailable
    pci_bus_id: str | NotAvailable
    memory_total_bytes: int | NotAvailable
    pcie_gen_current: int | NotAvailable
    pcie_gen_max: int | NotAvailable  # the link's max (device and slot)
    pcie_gen_gpu_max: int | NotAvailable  # what the GPU itself supports
    pcie_width_current: int | NotAvailable
    pcie_width_max: int | NotAvailable
    pcie_counters: CounterReading | NotAvailable  # byte counters (their width) or why not
    pcie_throughput_kib_s: tuple[int, int] | NotAvailable

    def to_dict(self) -> dict[str, Any]:
        return {k: _jsonable(getattr(self, k)) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class SystemInfo:
    nvml: bool | NotAvailable
    driver_version: str | NotAvailable
    cuda_driver_version: str | NotAvailable  # the CUDA version the driver supports, "12.4"
    devices: tuple[DeviceInfo, ...] | NotAvailable

    def to_dict(self) -> dict[str, Any]:
        devices = self.devices
        return {
            "nvml": _jsonable(self.nvml),
            "driver_version": _jsonable(self.driver_version),
            "cuda_driver_version": _jsonable(self.cuda_driver_version),
            "devices": _jsonable(devices)
            if isinstance(devices, NotAvailable)
            else [d.to_dict() for d in devices],
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, NotAvailable):
        return {"not_available": value.reason, "kind": value.kind}
    if isinstance(value, CounterReading):
        return {
            "supported": True,
            "counter_bits": value.counter_bits,
            "value_type": value.value_type,
            "rx_bytes": value.rx_bytes,  # raw cumulative values: small ones hint at 32 bits
            "tx_bytes": value.tx_bytes,
        }
    if isinstance(value, tuple):
        return list(value)
    return value


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _int_or_na(value: Any) -> int | NotAvailable:
    return value if isinstance(value, NotAvailable) else int(value)


def _cuda_version_text(value: Any) -> str | NotAvailable:
    if isinstance(value, NotAvailable):
        return value
    v = int(value)  # e.g. 12040 -> "12.4"
    return f"{v // 1000}.{(v % 1000) // 10}"


def device_info(nv: Nvml, index: int) -> DeviceInfo | NotAvailable:
    handle = nv.call("nvmlDeviceGetHandleByIndex", index)
    if isinstance(handle, NotAvailable):
        return handle
    pci = nv.call("nvmlDeviceGetPciInfo", handle)
    bus_id = pci if isinstance(pci, NotAvailable) else _text(getattr(pci, "busId", b""))
    mem = nv.call("nvmlDeviceGetMemoryInfo", handle)
    return DeviceInfo(
        index=index,
        name=_text(nv.call("nvmlDeviceGetName", handle)),
        uuid=_text(nv.call("nvmlDeviceGetUUID", handle)),
        pci_bus_id=bus_id,
        memory_total_bytes=mem if isinstance(mem, NotAvailable) else int(mem.total),
        pcie_gen_current=_int_or_na(nv.call("nvmlDeviceGetCurrPcieLinkGeneration", handle)),
        pcie_gen_max=_int_or_na(nv.call("nvmlDeviceGetMaxPcieLinkGeneration", handle)),
        pcie_gen_gpu_max=_int_or_na(nv.call("nvmlDeviceGetGpuMaxPcieLinkGeneration", handle)),
        pcie_width_current=_int_or_na(nv.call("nvmlDeviceGetCurrPcieLinkWidth", handle)),
        pcie_width_max=_int_or_na(nv.call("nvmlDeviceGetMaxPcieLinkWidth", handle)),
        pcie_counters=read_pcie_counters(nv, handle),
        pcie_throughput_kib_s=read_pcie_throughput_kib_s(nv, handle),
    )


def system_info(nv: Nvml | None = None) -> SystemInfo:
    """Driver, CUDA driver version and every NVML device, each field a value or a NotAvailable."""
    nv = nv or gateway()
    status = nv.status
    if isinstance(status, NotAvailable):
        return SystemInfo(status, status, status, status)
    count = nv.device_count()
    if isinstance(count, NotAvailable):
        devices: tuple[DeviceInfo, ...] | NotAvailable = count
    else:
        found = [device_info(nv, i) for i in range(count)]
        lost = [d for d in found if isinstance(d, NotAvailable)]
        devices = (
            lost[0]
            if lost and len(lost) == len(found)
            else tuple(d for d in found if isinstance(d, DeviceInfo))
        )
    return SystemInfo(
        nvml=True,
        driver_version=_text(nv.call("nvmlSystemGetDriverVersion")),
        cuda_driver_version=_cuda_version_text(nv.call("nvmlSystemGetCudaDriverVersion")),
        devices=devices,
    )


# PCIe raw rate per lane (GT/s) and line-code efficiency, by generation: theoretical link GB/s.
_PCIE_GT_S = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}
_PCIE_ENCODING = {1: 0.8, 2: 0.8, 3: 128 / 130, 4: 128 / 130, 5: 128 / 130, 6: 242 / 256}


def pcie_link_gbps(generation: int, width: int) -> float | None:
    """Theoretical one-direction bandwidth of a PCIe link in GB/s (1e9 bytes/s), before
    protocol overhead: Gen5 x16 -> 63.0."""
    if generation not in _PCIE_GT_S or width <= 0:
        return None
    return _PCIE_GT_S[generation] * _PCIE_ENCODING[generation] * width / 8.0
