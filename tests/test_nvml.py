"""The NVML gateway against a fake pynvml, with scenarios named after real failures.

No GPU needed: the fake replaces the binding at the gateway (``moeprof.nvml._import_pynvml``)
and behaves like nvidia-ml-py: NVMLError subclasses carrying ``.value``, field values with a
per-field ``nvmlReturn``, a ``valueType`` and a ``value`` union.
"""

from __future__ import annotations

import ctypes
import json
import time
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

from moeprof import nvml

SUCCESS = 0
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


@dataclass
class FakeGpu:
    """State behind the fake binding: counters, what is supported, what fails."""

    counter_bits: int = 64
    value_type: int = VALUE_ULL
    rx_bytes: int = 0  # true cumulative traffic (unwrapped)
    tx_bytes: int = 0
    counters_supported: bool = True
    throughput_supported: bool = True
    throughput_kib_s: tuple[int, int] = (0, 0)  # (rx, tx)
    rx_per_read: int = 0  # traffic the device makes between two reads
    tx_per_read: int = 0
    lost_after_reads: int | None = None  # field reads before the GPU falls off the bus
    init_error: int | None = None
    bus_ids: dict[str, int] = field(default_factory=lambda: {"00000000:3B:00.0": 0})
    reads: int = 0
    init_calls: int = 0

    def module(self) -> types.ModuleType:
        gpu = self
        m = types.ModuleType("pynvml")
        m.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
        for name, value in {
            "NVML_SUCCESS": SUCCESS,
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
            if gpu.reads > 1:
                gpu.rx_bytes += gpu.rx_per_read
                gpu.tx_bytes += gpu.tx_per_read
            out = []
            for fid in ids:
                true = {FI_RX: gpu.rx_bytes, FI_TX: gpu.tx_bytes}[fid]
                out.append(gpu._field(fid, true))
            return out

        def throughput(handle: Any, counter: int) -> int:
            gpu._check_lost()
            if not gpu.throughput_supported:
                raise FakeNVMLError(ERROR_NOT_SUPPORTED)
            return gpu.throughput_kib_s[0] if counter == 1 else gpu.throughput_kib_s[1]

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

    def _field(self, fid: int, true_value: int) -> Any:
        if not self.counters_supported:
            return types.SimpleNamespace(
                fieldId=fid,
                nvmlReturn=ERROR_NOT_SUPPORTED,
                valueType=self.value_type,
                value=types.SimpleNamespace(uiVal=0, ullVal=0, dVal=0.0),
            )
        wrapped = true_value % (1 << self.counter_bits)
        # Like the C union: every member aliases the same bytes; only the typed one is right.
        garbage_high = 0 if self.counter_bits == 64 else 0xDEAD << 48
        value = types.SimpleNamespace(
            uiVal=wrapped & 0xFFFFFFFF, ullVal=wrapped | garbage_high, dVal=float(wrapped)
        )
        return types.SimpleNamespace(
            fieldId=fid, nvmlReturn=SUCCESS, valueType=self.value_type, value=value
        )


def gateway_for(gpu: FakeGpu | None) -> nvml.Nvml:
    if gpu is None:

        def missing() -> types.ModuleType:
            raise ImportError("No module named 'pynvml'")

        return nvml.Nvml(loader=missing)
    module = gpu.module()
    return nvml.Nvml(loader=lambda: module)


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------------- scenarios


def test_library_missing() -> None:
    nv = gateway_for(None)
    status = nv.status
    assert isinstance(status, nvml.NotAvailable)
    assert status.kind == nvml.LIBRARY_MISSING and "nvidia-ml-py" in status.reason
    assert not status  # falsy
    info = nvml.system_info(nv)
    assert isinstance(info.devices, nvml.NotAvailable)
    doc = info.to_dict()
    json.dumps(doc)
    assert doc["driver_version"]["kind"] == nvml.LIBRARY_MISSING
    mon = nvml.PcieMonitor(nv.handle(index=0), nv=nv)
    assert mon.method == nvml.METHOD_COUNTED and "nvidia-ml-py" in (mon.reason or "")
    mon.start()
    m = mon.stop()
    assert m.rx_bytes is None and m.tx_bytes is None and m.method == nvml.METHOD_COUNTED


def test_driver_missing_is_a_typed_reason_and_init_is_tried_once() -> None:
    gpu = FakeGpu(init_error=ERROR_LIBRARY_NOT_FOUND)
    nv = gateway_for(gpu)
    for _ in range(3):
        got = nv.call("nvmlDeviceGetCount")
        assert isinstance(got, nvml.NotAvailable) and got.kind == nvml.DRIVER_MISSING
        assert got.code == ERROR_LIBRARY_NOT_FOUND
    assert gpu.init_calls == 1


def test_gateway_is_lazy_and_initialises_once() -> None:
    gpu = FakeGpu()
    loads = []
    module = gpu.module()

    def loader() -> types.ModuleType:
        loads.append(1)
        return module

    nv = nvml.Nvml(loader=loader)
    assert loads == [] and gpu.init_calls == 0
    assert nv.device_count() == 1
    assert nv.call("nvmlSystemGetDriverVersion") == "560.35.03"
    assert loads == [1] and gpu.init_calls == 1


def test_module_level_gateway_is_monkeypatchable(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeGpu()
    module = gpu.module()
    monkeypatch.setattr(nvml, "_import_pynvml", lambda: module)
    nvml.reset()
    try:
        assert nvml.gateway().device_count() == 1
    finally:
        nvml.reset()


def test_not_supported_counters_and_throughput() -> None:
    gpu = FakeGpu(counters_supported=False, throughput_supported=False)
    nv = gateway_for(gpu)
    handle = nv.handle(index=0)
    reading = nvml.read_pcie_counters(nv, handle)
    assert isinstance(reading, nvml.NotAvailable) and reading.kind == nvml.NOT_SUPPORTED
    assert reading.code == ERROR_NOT_SUPPORTED
    mon = nvml.PcieMonitor(handle, nv=nv)
    assert mon.method == nvml.METHOD_COUNTED
    assert "Not Supported" in (mon.reason or "") and len(mon.probe_notes) == 2
    info = nvml.device_info(nv, 0)
    assert isinstance(info, nvml.DeviceInfo)
    assert isinstance(info.pcie_counters, nvml.NotAvailable)
    assert info.pcie_gen_max == 5 and info.pcie_width_max == 16  # the rest still works


def test_gpu_lost_mid_measurement() -> None:
    gpu = FakeGpu(rx_per_read=1000, lost_after_reads=3)
    nv = gateway_for(gpu)
    mon = nvml.PcieMonitor(
        nv.handle(index=0), nv=nv, background=False, settle_s=0
    )  # probe = read 1
    assert mon.method == nvml.METHOD_COUNTERS
    mon.start()  # read 2
    mon.sample()  # read 3
    mon.sample()  # lost
    m = mon.stop()
    assert m.rx_bytes is None and m.tx_bytes is None
    assert "GPU is lost" in (m.reason or "")


def test_gpu_lost_before_probe_gives_counted_only() -> None:
    gpu = FakeGpu(lost_after_reads=0)
    nv = gateway_for(gpu)
    handle = nv.handle(index=0)
    assert isinstance(handle, nvml.NotAvailable) and handle.kind == nvml.GPU_LOST
    mon = nvml.PcieMonitor(handle, nv=nv)
    assert mon.method == nvml.METHOD_COUNTED and "lost" in (mon.reason or "")


@pytest.mark.parametrize("bits,value_type", [(32, VALUE_UINT), (64, VALUE_ULL)])
def test_counter_wrap_around(bits: int, value_type: int) -> None:
    modulus = 1 << bits
    step = modulus // 3 + 12345  # three reads cross the wrap at least once
    gpu = FakeGpu(
        counter_bits=bits,
        value_type=value_type,
        rx_bytes=modulus - 1000,
        tx_bytes=modulus - 10,
        rx_per_read=step,
        tx_per_read=7,
    )
    nv = gateway_for(gpu)
    clock = FakeClock()
    mon = nvml.PcieMonitor(nv.handle(index=0), nv=nv, background=False, clock=clock, settle_s=0)
    assert mon.method == nvml.METHOD_COUNTERS and mon.counter_bits == bits
    assert mon.polls == (bits < 64)
    start_rx, start_tx = gpu.rx_bytes, gpu.tx_bytes
    mon.start()
    for _ in range(5):
        clock.t += 0.001
        mon.sample()
    clock.t += 0.001
    m = mon.stop()
    assert m.method == nvml.METHOD_COUNTERS and m.counter_bits == bits
    # The true (unwrapped) traffic since the read at start(), which itself added one step.
    assert m.rx_bytes == gpu.rx_bytes - start_rx - step
    assert m.tx_bytes == gpu.tx_bytes - start_tx - 7
    assert m.rx_bytes == 6 * step and m.samples == 7
    assert m.wrap_safe is True and m.reason is None


def test_counter_reads_too_far_apart_are_flagged() -> None:
    gpu = FakeGpu(counter_bits=32, value_type=VALUE_UINT, rx_per_read=10)
    nv = gateway_for(gpu)
    clock = FakeClock()
    mon = nvml.PcieMonitor(nv.handle(index=0), nv=nv, background=False, clock=clock, settle_s=0)
    mon.start()
    clock.t += 1.0  # a 32-bit counter can wrap twice in 1 s on a fast link
    m = mon.stop()
    assert m.wrap_safe is False and "wrap" in (m.reason or "")
    assert m.rx_bytes == 10  # still reported, with the caveat


def test_counter_delta() -> None:
    assert nvml.counter_delta(10, 25, 32) == 15
    assert nvml.counter_delta((1 << 32) - 5, 3, 32) == 8
    assert nvml.counter_delta((1 << 64) - 1, 0, 64) == 1
    assert nvml.counter_delta(7, 7, 16) == 0


def test_value_type_is_checked() -> None:
    gpu = FakeGpu(value_type=VALUE_DOUBLE)
    nv = gateway_for(gpu)
    reading = nvml.read_pcie_counters(nv, nv.handle(index=0))
    assert isinstance(reading, nvml.NotAvailable) and "value type" in reading.reason


def test_value_is_read_from_the_typed_union_member() -> None:
    # 32-bit counters: reading ullVal (garbage high bits in the fake) would be wrong.
    gpu = FakeGpu(counter_bits=32, value_type=VALUE_UINT, rx_bytes=123456, tx_bytes=654321)
    nv = gateway_for(gpu)
    reading = nvml.read_pcie_counters(nv, nv.handle(index=0))
    assert isinstance(reading, nvml.CounterReading)
    assert (reading.rx_bytes, reading.tx_bytes, reading.counter_bits) == (123456, 654321, 32)


def test_real_binding_field_value_struct() -> None:
    """_field_value reads nvidia-ml-py's own ctypes struct (union member per value type)."""
    pynvml = pytest.importorskip("pynvml")
    fv = pynvml.c_nvmlFieldValue_t()
    fv.fieldId = FI_RX
    fv.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
    fv.value.ullVal = (1 << 40) + 5
    assert nvml._field_value(fv) == ((1 << 40) + 5, 64)
    fv.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    fv.value.uiVal = 0xFFFFFFF0
    assert nvml._field_value(fv) == (0xFFFFFFF0, 32)
    assert pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES == FI_RX
    assert pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES == FI_TX
    assert nvml._VALUE_TYPES[pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT] == ("usVal", 16)
    assert ctypes.sizeof(ctypes.c_ulonglong) == 8


def test_throughput_only_is_integrated_over_time() -> None:
    gpu = FakeGpu(counters_supported=False, throughput_kib_s=(50_000, 2_000))
    nv = gateway_for(gpu)
    clock = FakeClock()
    mon = nvml.PcieMonitor(nv.handle(index=0), nv=nv, background=False, clock=clock, settle_s=0)
    assert mon.method == nvml.METHOD_THROUGHPUT and mon.polls
    assert "estimated" in (mon.reason or "")
    mon.start()
    gaps = [0.02, 0.021, 0.019, 0.02, 0.03]
    for gap in gaps[:-1]:
        clock.t += gap
        mon.sample()
    clock.t += gaps[-1]
    m = mon.stop()
    total_s = sum(gaps)
    assert m.method == nvml.METHOD_THROUGHPUT
    assert m.rx_bytes == round(50_000 * 1024 * total_s)
    assert m.tx_bytes == round(2_000 * 1024 * total_s)
    assert m.samples == len(gaps) + 1
    assert m.max_sample_gap_s == pytest.approx(0.03)


def test_background_thread_keeps_up_with_a_wrapping_counter() -> None:
    # Every read advances a 32-bit counter by 3 GB: only reads in between keep the count right.
    step = 3_000_000_000
    gpu = FakeGpu(counter_bits=32, value_type=VALUE_UINT, rx_per_read=step, tx_per_read=1)
    nv = gateway_for(gpu)
    mon = nvml.PcieMonitor(nv.handle(index=0), nv=nv, counter_poll_s=0.002)
    reads_before = gpu.reads
    mon.start()
    time.sleep(0.05)
    m = mon.stop()
    reads = gpu.reads - reads_before
    assert reads >= 3
    assert m.samples == reads
    assert m.rx_bytes == (reads - 1) * step  # the read at start() set the baseline
    assert m.tx_bytes == reads - 1


def test_handle_by_bus_id_falls_back_to_index() -> None:
    gpu = FakeGpu()
    nv = gateway_for(gpu)
    assert nv.handle(pci_bus_id="00000000:3B:00.0") == ("handle", 0)
    assert nv.handle(pci_bus_id="0000:99:00.0", index=0) == ("handle", 0)
    missing = nv.handle(pci_bus_id="0000:99:00.0", index=3)
    assert isinstance(missing, nvml.NotAvailable) and missing.kind == nvml.NO_DEVICE


def test_system_info_of_a_healthy_gpu() -> None:
    nv = gateway_for(FakeGpu())
    info = nvml.system_info(nv)
    assert info.driver_version == "560.35.03"
    assert info.cuda_driver_version == "12.6"
    assert isinstance(info.devices, tuple) and len(info.devices) == 1
    dev = info.devices[0]
    assert dev.name == "NVIDIA H200" and dev.pci_bus_id == "00000000:3B:00.0"
    assert (dev.pcie_gen_current, dev.pcie_gen_max, dev.pcie_width_max) == (1, 5, 16)
    assert isinstance(dev.pcie_counters, nvml.CounterReading)
    doc = info.to_dict()
    json.dumps(doc)
    assert doc["devices"][0]["pcie_counters"] == {"supported": True, "counter_bits": 64}
    assert doc["devices"][0]["memory_total_bytes"] == 141 << 30


def test_unexpected_exception_in_binding_becomes_not_available() -> None:
    gpu = FakeGpu()
    module = gpu.module()

    def broken(handle: Any) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")

    module.nvmlDeviceGetName = broken  # type: ignore[attr-defined]
    nv = nvml.Nvml(loader=lambda: module)
    got = nv.call("nvmlDeviceGetName", ("handle", 0))
    assert isinstance(got, nvml.NotAvailable) and got.kind == nvml.ERROR
    missing = nv.call("nvmlDeviceGetSomethingNew")
    assert isinstance(missing, nvml.NotAvailable) and missing.kind == nvml.FUNCTION_MISSING


def test_pcie_link_gbps() -> None:
    # Independent arithmetic: 32 GT/s x 16 lanes x 128/130 / 8 bits.
    assert nvml.pcie_link_gbps(5, 16) == pytest.approx(32 * 16 * 128 / 130 / 8)
    assert nvml.pcie_link_gbps(4, 16) == pytest.approx(31.5, abs=0.01)
    assert nvml.pcie_link_gbps(3, 8) == pytest.approx(7.88, abs=0.01)
    assert nvml.pcie_link_gbps(9, 16) is None
