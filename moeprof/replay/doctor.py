"""`moeprof doctor`'s findings: can this machine replay on a GPU, and how fast is its link?

Gathers torch's view (CUDA build, devices), NVML's (driver, CUDA driver version, PCIe generation
and width, which PCIe counters work) and, when a GPU is there, the pinned host->device peak. Never
raises for a missing GPU: what is missing is listed instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moeprof import nvml
from moeprof.errors import MoeprofError


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    total_memory_bytes: int
    capability: str
    pci_bus_id: str | None
    h2d_peak_gbps: float | None = None
    h2d_bytes: int | None = None
    h2d_reason: str | None = None  # why the peak was not measured


@dataclass(frozen=True)
class DoctorReport:
    torch_version: str | None
    torch_cuda: str | None  # CUDA version torch was built with (None: CPU-only build)
    cuda_available: bool
    cuda_devices: tuple[CudaDevice, ...]
    system: nvml.SystemInfo
    missing: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ready(self) -> bool:
        """A CUDA replay can run here."""
        return self.cuda_available and bool(self.cuda_devices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ready_for_cuda_replay": self.ready,
            "torch_version": self.torch_version,
            "torch_cuda": self.torch_cuda,
            "cuda_available": self.cuda_available,
            "cuda_devices": [vars(d) for d in self.cuda_devices],
            "nvml": self.system.to_dict(),
            "missing": list(self.missing),
        }


def gather(
    *, measure_bandwidth: bool = True, calibration_bytes: int = 1 << 30, nv: nvml.Nvml | None = None
) -> DoctorReport:
    missing: list[str] = []
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]
    torch_version = None if torch is None else str(torch.__version__)
    torch_cuda = None if torch is None else getattr(torch.version, "cuda", None)
    cuda_available = bool(torch is not None and torch.cuda.is_available())
    if torch is None:
        missing.append("torch is not installed")
    elif torch_cuda is None:
        missing.append(f"torch {torch_version} is a CPU-only build (no CUDA)")
    elif not cuda_available:
        missing.append(
            "torch sees no CUDA device (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it)"
        )

    devices: list[CudaDevice] = []
    if cuda_available and torch is not None:
        from moeprof.replay.backends import CudaBackend
        from moeprof.replay.cudart import cuda_pci_bus_id

        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            peak = nbytes = None
            reason = None if measure_bandwidth else "skipped (--no-bandwidth)"
            if measure_bandwidth:
                try:
                    cal = CudaBackend(i).calibrate(calibration_bytes)
                    peak, nbytes = cal.peak_gbps, cal.nbytes
                except (MoeprofError, RuntimeError) as exc:
                    reason = f"calibration failed: {exc}"
            devices.append(
                CudaDevice(
                    index=i,
                    name=str(props.name),
                    total_memory_bytes=int(props.total_memory),
                    capability=f"{props.major}.{props.minor}",
                    pci_bus_id=cuda_pci_bus_id(props),
                    h2d_peak_gbps=peak,
                    h2d_bytes=nbytes,
                    h2d_reason=reason,
                )
            )

    system = nvml.system_info(nv)
    if isinstance(system.nvml, nvml.NotAvailable):
        missing.append(f"NVML: {system.nvml.reason}")
    elif isinstance(system.devices, nvml.NotAvailable):
        missing.append(f"NVML devices: {system.devices.reason}")
    else:
        for d in system.devices:
            if isinstance(d.pcie_counters, nvml.NotAvailable):
                fallback = (
                    "throughput sampling will be used"
                    if not isinstance(d.pcie_throughput_kib_s, nvml.NotAvailable)
                    else "no PCIe measurement possible: counted bytes only"
                )
                missing.append(
                    f"GPU {d.index}: PCIe byte counters unavailable ({d.pcie_counters.reason}); "
                    f"{fallback}"
                )
    return DoctorReport(
        torch_version=torch_version,
        torch_cuda=torch_cuda,
        cuda_available=cuda_available,
        cuda_devices=tuple(devices),
        system=system,
        missing=tuple(missing),
    )
