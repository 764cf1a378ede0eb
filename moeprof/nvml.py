"""The one gateway to NVML (module ``pynvml`` from nvidia-ml-py); no other module imports pynvml.

In nvitop's style: the library is imported and initialised lazily on the first call, and every
call goes through :meth:`Nvml.call`, which turns each NVML failure into a typed
:class:`NotAvailable` with a reason (binding missing, no driver, Not Supported, GPU lost, ...)
instead of an exception. Callers test ``isinstance(x, NotAvailable)``; units live in names.

PCIe traffic (DESIGN.md "Measuring PCIe"), best method first:

1. ``nvml_counters``: the cumulative byte counters ``NVML_FI_DEV_PCIE_COUNT_RX_BYTES`` / ``TX_BYTES``
   read through ``nvmlDeviceGetFieldValues`` (driver R555+). Each value's type says how wide the
   counter is, so deltas are taken modulo 2**bits; a counter narrower than 64 bits is polled by a
   background thread often enough that it cannot wrap twice between two reads.
2. ``nvml_throughput``: ``nvmlDeviceGetPcieThroughput`` (KiB/s averaged over ~20 ms) sampled by a
   background thread and integrated over time: an estimate, labelled as such.
3. ``counted_only``: nothing measured; the report shows counted payload only, with the reason.

Host-to-device copies are the GPU's RX side.
"""

from __future__ import annotations

import ctypes
import importlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

__all__ = [
    "METHOD_COUNTED",
    "METHOD_COUNTERS",
    "METHOD_THROUGHPUT",
    "CounterReading",
    "DeviceInfo",
    "NotAvailable",
    "Nvml",
    "PcieMeasurement",
    "PcieMonitor",
    "SystemInfo",
    "available",
    "counter_delta",
    "gateway",
    "reset",
    "system_info",
]

METHOD_COUNTERS = "nvml_counters"
METHOD_THROUGHPUT = "nvml_throughput"
METHOD_COUNTED = "counted_only"

# NVML constants we rely on, with the values of nvml.h; read from the binding when it has them.
_FI_PCIE_TX_BYTES = 197  # NVML_FI_DEV_PCIE_COUNT_TX_BYTES
_FI_PCIE_RX_BYTES = 198  # NVML_FI_DEV_PCIE_COUNT_RX_BYTES
_PCIE_UTIL_TX = 0  # NVML_PCIE_UTIL_TX_BYTES
_PCIE_UTIL_RX = 1  # NVML_PCIE_UTIL_RX_BYTES

# nvmlValueType_t -> (member of the c_nvmlValue_t union, counter width in bits). Signed types
# are read as two's complement of their width. Double (0) is not a counter.
_VALUE_TYPES: dict[int, tuple[str, int]] = {
    1: ("uiVal", 32),  # NVML_VALUE_TYPE_UNSIGNED_INT
    2: ("ulVal", 8 * ctypes.sizeof(ctypes.c_ulong)),  # UNSIGNED_LONG: 64 on Linux, 32 on Windows
    3: ("ullVal", 64),  # UNSIGNED_LONG_LONG
    4: ("sllVal", 64),  # SIGNED_LONG_LONG
    5: ("siVal", 32),  # SIGNED_INT
    6: ("usVal", 16),  # UNSIGNED_SHORT
}

# Fastest PCIe link we plan for (Gen6 x16 is ~121 GB/s); bounds how long a narrow counter may go
# unread before it could wrap twice unnoticed.
MAX_LINK_BYTES_PER_S = 128e9

# Kinds of NotAvailable, named after the failures seen in the field.
LIBRARY_MISSING = "library_missing"  # nvidia-ml-py not installed
DRIVER_MISSING = "driver_missing"  # libnvidia-ml.so not found / driver not loaded
NOT_SUPPORTED = "not_supported"
GPU_LOST = "gpu_lost"
NO_PERMISSION = "no_permission"
FUNCTION_MISSING = "function_missing"  # binding or driver too old for this call
NO_DEVICE = "no_device"
ERROR = "error"


@dataclass(frozen=True)
class NotAvailable:
    """A value NVML could not give, and why. Falsy, so ``value or default`` reads naturally."""

    kind: str
    reason: str
    code: int | None = None  # NVML return code, where there is one

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return f"N/A ({self.reason})"


def available(value: object) -> bool:
    return not isinstance(value, NotAvailable)


def _import_pynvml() -> ModuleType:
    """Import the binding. Tests replace this function to plug in a fake pynvml."""
    return importlib.import_module("pynvml")


def _error_kind(module: ModuleType, code: int) -> str:
    def const(name: str, default: int) -> int:
        return int(getattr(module, name, default))

    table = {
        const("NVML_ERROR_NOT_SUPPORTED", 3): NOT_SUPPORTED,
        const("NVML_ERROR_NO_PERMISSION", 4): NO_PERMISSION,
        const("NVML_ERROR_DRIVER_NOT_LOADED", 9): DRIVER_MISSING,
        const("NVML_ERROR_LIBRARY_NOT_FOUND", 12): DRIVER_MISSING,
        const("NVML_ERROR_FUNCTION_NOT_FOUND", 13): FUNCTION_MISSING,
        const("NVML_ERROR_GPU_IS_LOST", 15): GPU_LOST,
        const("NVML_ERROR_NOT_FOUND", 6): NO_DEVICE,
        const("NVML_ERROR_INVALID_ARGUMENT", 2): NO_DEVICE,
    }
    return table.get(code, ERROR)


_KIND_TEXT = {
    NOT_SUPPORTED: "Not Supported by this GPU or driver",
    NO_PERMISSION: "insufficient permissions",
    DRIVER_MISSING: "no NVIDIA driver (NVML library not found or driver not loaded)",
    FUNCTION_MISSING: "function not in this NVML driver library (driver too old)",
    GPU_LOST: "GPU is lost (fell off the bus)",
    NO_DEVICE: "no such device",
}


class Nvml:
    """Lazy, thread-safe access to NVML. Every call returns a value or a :class:`NotAvailable`."""

    def __init__(self, loader: Callable[[], ModuleType] | None = None) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._module: ModuleType | None = None
        self._state: bool | NotAvailable | None = None  # None: not tried; True: initialised

    def _ensure(self) -> ModuleType | NotAvailable:
        with self._lock:
            if isinstance(self._state, NotAvailable):
                return self._state
            if self._state is True and self._module is not None:
                return self._module
            loader = self._loader or _import_pynvml
            try:
                module = loader()
            except ImportError:
                self._state = NotAvailable(
                    LIBRARY_MISSING, "nvidia-ml-py (module pynvml) is not installed"
                )
                return self._state
            result = self._invoke(module, "nvmlInit", ())
            if isinstance(result, NotAvailable):
                self._state = result
                return result
            self._module = module
            self._state = True
            return module

    @staticmethod
    def _invoke(module: ModuleType, name: str, args: tuple[Any, ...]) -> Any:
        fn = getattr(module, name, None)
        if fn is None:
            return NotAvailable(FUNCTION_MISSING, f"{name} is not in this nvidia-ml-py")
        error_type = getattr(module, "NVMLError", None)
        try:
            return fn(*args)
        except Exception as exc:  # every failure of the binding becomes a typed N/A
            if error_type is not None and isinstance(exc, error_type):
                code = int(getattr(exc, "value", -1))
                kind = _error_kind(module, code)
                text = _KIND_TEXT.get(kind) or _safe_str(exc) or f"NVML error {code}"
                return NotAvailable(kind, f"{name}: {text}", code)
            return NotAvailable(ERROR, f"{name}: {type(exc).__name__}: {_safe_str(exc)}")

    def call(self, name: str, *args: Any) -> Any:
        """``pynvml.<name>(*args)``, or a NotAvailable saying why not."""
        module = self._ensure()
        if isinstance(module, NotAvailable):
            return module
        return self._invoke(module, name, args)

    def constant(self, name: str, default: int) -> int:
        module = self._ensure()
        if isinstance(module, NotAvailable):
            return default
        return int(getattr(module, name, default))

    @property
    def status(self) -> bool | NotAvailable:
        """True when NVML is usable, else why not (initialises on first use)."""
        module = self._ensure()
        return module if isinstance(module, NotAvailable) else True

    def shutdown(self) -> None:
        with self._lock:
            if self._state is True and self._module is not None:
                self._invoke(self._module, "nvmlShutdown", ())
            self._state = None
            self._module = None

    # ------------------------------------------------------------------ devices
    def handle(self, *, pci_bus_id: str | None = None, index: int = 0) -> Any:
        """The NVML handle of a device: by PCI bus id when known (CUDA and NVML may number GPUs
        differently), else by NVML index."""
        if pci_bus_id:
            found = self.call("nvmlDeviceGetHandleByPciBusId", pci_bus_id)
            if not isinstance(found, NotAvailable) or found.kind in (LIBRARY_MISSING, GPU_LOST):
                return found
        return self.call("nvmlDeviceGetHandleByIndex", index)

    def device_count(self) -> int | NotAvailable:
        count = self.call("nvmlDeviceGetCount")
        return count if isinstance(count, NotAvailable) else int(count)


def _safe_str(obj: object) -> str:
    try:
        return str(obj)
    except Exception:  # a binding's __str__ may itself call NVML
        return ""


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


_default: Nvml | None = None
_default_lock = threading.Lock()


def gateway() -> Nvml:
    """The process-wide gateway (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Nvml()
        return _default


def reset() -> None:
    """Forget the process-wide gateway (tests; or after a driver reload)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.shutdown()
        _default = None


# ---------------------------------------------------------------------- PCIe byte counters


@dataclass(frozen=True)
class CounterReading:
    """One read of the cumulative PCIe byte counters."""

    rx_bytes: int
    tx_bytes: int
    counter_bits: int  # both counters wrap at 2**counter_bits
    timestamp_s: float  # host monotonic clock at the read


def counter_delta(before: int, after: int, bits: int) -> int:
    """Bytes between two reads of a counter that wraps at 2**bits (at most one wrap between)."""
    return (after - before) % (1 << bits)


def _field_value(fv: Any) -> tuple[int, int] | str:
    """(value, bits) of one nvmlFieldValue_t, or why it is unusable."""
    vtype = int(getattr(fv, "valueType", -1))
    if vtype not in _VALUE_TYPES:
        return f"unexpected value type {vtype} for a byte counter"
    member, bits = _VALUE_TYPES[vtype]
    raw = int(getattr(fv.value, member))
    return raw % (1 << bits), bits  # two's complement for the signed types


def read_pcie_counters(
    nv: Nvml, handle: Any, clock: Callable[[], float] = time.perf_counter
) -> CounterReading | NotAvailable:
    """Read RX and TX cumulative byte counters, checking each field's status and value type."""
    fields = [
        nv.constant("NVML_FI_DEV_PCIE_COUNT_RX_BYTES", _FI_PCIE_RX_BYTES),
        nv.constant("NVML_FI_DEV_PCIE_COUNT_TX_BYTES", _FI_PCIE_TX_BYTES),
    ]
    values = nv.call("nvmlDeviceGetFieldValues", handle, fields)
    now = clock()
    if isinstance(values, NotAvailable):
        return values
    parsed: list[tuple[int, int]] = []
    for name, fv in zip(("RX", "TX"), values):
        ret = int(getattr(fv, "nvmlReturn", 0))
        if ret != 0:
            module = nv._ensure()
            kind = _error_kind(module, ret) if isinstance(module, ModuleType) else ERROR
            text = _KIND_TEXT.get(kind, f"NVML error {ret}")
            return NotAvailable(kind, f"PCIe {name} byte counter field: {text}", ret)
        got = _field_value(fv)
        if isinstance(got, str):
            return NotAvailable(ERROR, f"PCIe {name} byte counter field: {got}")
        parsed.append(got)
    if len(parsed) != 2:
        return NotAvailable(ERROR, "nvmlDeviceGetFieldValues returned too few values")
    (rx, rx_bits), (tx, tx_bits) = parsed
    if rx_bits != tx_bits:
        # Never seen; handle it anyway by wrapping each at the narrower width.
        bits = min(rx_bits, tx_bits)
        rx, tx = rx % (1 << bits), tx % (1 << bits)
    else:
        bits = rx_bits
    return CounterReading(rx_bytes=rx, tx_bytes=tx, counter_bits=bits, timestamp_s=now)


def read_pcie_throughput_kib_s(nv: Nvml, handle: Any) -> tuple[int, int] | NotAvailable:
    """(RX, TX) PCIe throughput in KiB/s, each averaged by the driver over ~20 ms."""
    rx_counter = nv.constant("NVML_PCIE_UTIL_RX_BYTES", _PCIE_UTIL_RX)
    tx_counter = nv.constant("NVML_PCIE_UTIL_TX_BYTES", _PCIE_UTIL_TX)
    rx = nv.call("nvmlDeviceGetPcieThroughput", handle, rx_counter)
    if isinstance(rx, NotAvailable):
        return rx
    tx = nv.call("nvmlDeviceGetPcieThroughput", handle, tx_counter)
    if isinstance(tx, NotAvailable):
        return tx
    return int(rx), int(tx)


# ---------------------------------------------------------------------- measuring a run


@dataclass(frozen=True)
class PcieMeasurement:
    """PCIe bytes seen by NVML over one measured window (None where not measured, with a reason)."""

    method: str  # METHOD_COUNTERS, METHOD_THROUGHPUT or METHOD_COUNTED
    rx_bytes: int | None
    tx_bytes: int | None
    reason: str | None  # why nothing was measured, or the caveat of the method used
    window_s: float
    samples: int
    counter_bits: int | None = None
    max_sample_gap_s: float | None = None
    wrap_safe: bool | None = None  # counters: reads never far enough apart to miss a wrap

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


THROUGHPUT_CAVEAT = (
    "estimated: nvmlDeviceGetPcieThroughput (KiB/s over ~20 ms windows) sampled and integrated"
)


@dataclass
class _Accumulator:
    # Exact ints for the counters (a float would lose bytes past 2**53); floats once a
    # throughput integral is added.
    rx_bytes: int | float = 0
    tx_bytes: int | float = 0
    last: CounterReading | None = None
    last_t: float | None = None
    samples: int = 0
    max_gap_s: float = 0.0
    failure: NotAvailable | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class PcieMonitor:
    """Measures PCIe RX/TX bytes between :meth:`start` and :meth:`stop` with the best method.

    The method is chosen once, at construction, by probing: byte counters, else throughput
    sampling, else counted-only (with the reason). ``background=False`` leaves sampling to the
    caller's :meth:`sample` calls (tests drive a fake clock this way).
    """

    def __init__(
        self,
        handle: Any,
        *,
        nv: Nvml | None = None,
        counter_poll_s: float = 0.005,
        throughput_poll_s: float = 0.02,
        clock: Callable[[], float] = time.perf_counter,
        background: bool = True,
        unavailable: NotAvailable | None = None,
        settle_s: float = 0.05,
    ) -> None:
        self._nv = nv or gateway()
        # Wait this long after the caller synchronised before the first and the last read: a
        # driver that refreshes its counters (or its 20 ms throughput window) periodically then
        # has the run's last bytes in them. On an idle link this costs a few KB of background.
        self.settle_s = settle_s
        self._handle = handle
        self._clock = clock
        self._background = background
        self._acc = _Accumulator()
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._t0 = 0.0
        self.counter_bits: int | None = None
        self.probe_notes: list[str] = []
        self.method, self.reason = self._probe(unavailable)
        self._poll_s = counter_poll_s if self.method == METHOD_COUNTERS else throughput_poll_s

    def _probe(self, unavailable: NotAvailable | None) -> tuple[str, str | None]:
        if unavailable is not None:
            return METHOD_COUNTED, unavailable.reason
        if isinstance(self._handle, NotAvailable):
            return METHOD_COUNTED, self._handle.reason
        reading = read_pcie_counters(self._nv, self._handle, self._clock)
        if not isinstance(reading, NotAvailable):
            self.counter_bits = reading.counter_bits
            return METHOD_COUNTERS, None
        self.probe_notes.append(f"byte counters: {reading.reason}")
        if reading.kind == GPU_LOST:
            return METHOD_COUNTED, reading.reason
        rate = read_pcie_throughput_kib_s(self._nv, self._handle)
        if not isinstance(rate, NotAvailable):
            return METHOD_THROUGHPUT, THROUGHPUT_CAVEAT
        self.probe_notes.append(f"throughput: {rate.reason}")
        return METHOD_COUNTED, "; ".join(self.probe_notes)

    @property
    def polls(self) -> bool:
        """Whether a background thread samples between start and stop."""
        if self.method == METHOD_THROUGHPUT:
            return True
        return self.method == METHOD_COUNTERS and (self.counter_bits or 64) < 64

    # ------------------------------------------------------------------ sampling
    def sample(self) -> None:
        """Take one sample now (the background thread calls this; so may tests)."""
        if self.method == METHOD_COUNTERS:
            self._sample_counters()
        elif self.method == METHOD_THROUGHPUT:
            self._sample_throughput()

    def _fail(self, why: NotAvailable) -> None:
        with self._acc.lock:
            if self._acc.failure is None:
                self._acc.failure = why

    def _sample_counters(self) -> None:
        reading = read_pcie_counters(self._nv, self._handle, self._clock)
        if isinstance(reading, NotAvailable):
            self._fail(reading)
            return
        acc = self._acc
        with acc.lock:
            if acc.last is not None:
                bits = min(acc.last.counter_bits, reading.counter_bits)
                acc.rx_bytes += counter_delta(acc.last.rx_bytes, reading.rx_bytes, bits)
                acc.tx_bytes += counter_delta(acc.last.tx_bytes, reading.tx_bytes, bits)
                acc.max_gap_s = max(acc.max_gap_s, reading.timestamp_s - acc.last.timestamp_s)
            acc.last = reading
            acc.samples += 1

    def _sample_throughput(self) -> None:
        rate = read_pcie_throughput_kib_s(self._nv, self._handle)
        now = self._clock()
        if isinstance(rate, NotAvailable):
            self._fail(rate)
            return
        acc = self._acc
        with acc.lock:
            if acc.last_t is not None:
                # The driver's rate covers the ~20 ms before the read: credit it to the interval
                # since the previous sample.
                dt = now - acc.last_t
                acc.rx_bytes += rate[0] * 1024.0 * dt
                acc.tx_bytes += rate[1] * 1024.0 * dt
                acc.max_gap_s = max(acc.max_gap_s, dt)
            acc.last_t = now
            acc.samples += 1

    def _run(self) -> None:
        while not self._stop_event.wait(self._poll_s):
            self.sample()

    # ------------------------------------------------------------------ window
    def start(self) -> None:
        """Open the window (call with the copy stream synchronised)."""
        self._acc = _Accumulator()
        self._stop_event.clear()
        if self.method == METHOD_COUNTED:
            self._t0 = self._clock()
            return
        if self.settle_s > 0:
            time.sleep(self.settle_s)
        self._t0 = self._clock()
        self.sample()
        if self._background and self.polls:
            self._thread = threading.Thread(target=self._run, name="moeprof-pcie", daemon=True)
            self._thread.start()

    def stop(self) -> PcieMeasurement:
        """Close the window (call with the copy stream synchronised) and return the bytes seen."""
        if self.method != METHOD_COUNTED and self.settle_s > 0:
            time.sleep(self.settle_s)  # the poller, if any, keeps reading meanwhile
        if self._thread is not None:
            self._stop_event.set()
            self._thread.join()
            self._thread = None
        window_s = self._clock() - self._t0
        if self.method == METHOD_COUNTED:
            return PcieMeasurement(METHOD_COUNTED, None, None, self.reason, window_s, 0)
        self.sample()
        acc = self._acc
        if acc.failure is not None:
            return PcieMeasurement(
                self.method,
                None,
                None,
                f"measurement failed: {acc.failure.reason}",
                window_s,
                acc.samples,
            )
        if self.method == METHOD_COUNTERS:
            bits = self.counter_bits or 64
            # Two wraps between reads would go unseen: reads must come faster than one wrap.
            wrap_safe = acc.max_gap_s * MAX_LINK_BYTES_PER_S < float(1 << bits)
            return PcieMeasurement(
                METHOD_COUNTERS,
                int(acc.rx_bytes),
                int(acc.tx_bytes),
                None if wrap_safe else "counter reads too far apart: a wrap may have been missed",
                window_s,
                acc.samples,
                counter_bits=bits,
                max_sample_gap_s=acc.max_gap_s,
                wrap_safe=wrap_safe,
            )
        return PcieMeasurement(
            METHOD_THROUGHPUT,
            int(round(acc.rx_bytes)),
            int(round(acc.tx_bytes)),
            self.reason,
            window_s,
            acc.samples,
            max_sample_gap_s=acc.max_gap_s,
        )


# ---------------------------------------------------------------------- device info (doctor)


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
        return {"supported": True, "counter_bits": value.counter_bits}
    if isinstance(value, tuple):
        return list(value)
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
