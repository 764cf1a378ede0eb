"""The one gateway to NVML (module ``pynvml`` from nvidia-ml-py); no other module imports pynvml.

In nvitop's style: the library is imported and initialised lazily on the first call, and every
call goes through :meth:`Nvml.call`, which turns each NVML failure into a typed
:class:`NotAvailable` with a reason (binding missing, no driver, Not Supported, GPU lost, ...)
instead of an exception. Callers test ``isinstance(x, NotAvailable)``; units live in names.

PCIe traffic (DESIGN.md "Measuring PCIe"), best method first:

1. ``nvml_counters``: the cumulative byte counters ``NVML_FI_DEV_PCIE_COUNT_RX_BYTES`` / ``TX_BYTES``
   read through ``nvmlDeviceGetFieldValues`` (driver R555+). Each value's type says how wide the
   counter is, so deltas are taken modulo 2**bits; a background thread reads them every few ms
   while a run is measured, so no counter wraps twice unseen, and a 64-bit-typed delta no link
   could carry is read as a 32-bit wrap (a driver may report a 32-bit counter in a 64-bit field).
   Before and after a run the counters are read until they stop growing.
2. ``nvml_throughput``: ``nvmlDeviceGetPcieThroughput`` (documented in KB/s, taken as KiB/s,
   averaged over ~20 ms; the call blocks about that long) read back to back by a background
   thread, each rate integrated over the time since the previous read: an estimate, labelled as
   such.
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
    """One read of the cumulative PCIe byte counters, as NVML gave it."""

    rx_bytes: int
    tx_bytes: int
    counter_bits: int  # both counters wrap at 2**counter_bits (as far as the value type says)
    timestamp_s: float  # host monotonic clock at the read
    value_type: int | None = None  # nvmlValueType_t of the fields
    rx_nvml_timestamp_us: int | None = None  # the fields' own timestamps, where NVML gives them
    tx_nvml_timestamp_us: int | None = None

    def raw(self, t0: float) -> dict[str, Any]:
        """The reading for the results JSON; ``t_s`` is seconds after `t0` (host clock)."""
        return {
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "counter_bits": self.counter_bits,
            "value_type": self.value_type,
            "t_s": self.timestamp_s - t0,
            "rx_nvml_timestamp_us": self.rx_nvml_timestamp_us,
            "tx_nvml_timestamp_us": self.tx_nvml_timestamp_us,
        }


def counter_delta(before: int, after: int, bits: int) -> int:
    """Bytes between two reads of a counter that wraps at 2**bits (at most one wrap between)."""
    return (after - before) % (1 << bits)


# A delta above this share of the fastest link over the time between two reads cannot be traffic.
PLAUSIBLE_FACTOR = 1.5
MIN_ELAPSED_S = 0.001

WRAP32 = "wrap32"
BACKWARDS = "backwards"


def plausible_bytes(elapsed_s: float) -> float:
    """The most bytes a PCIe link can move in `elapsed_s` (at least 1 ms), with margin."""
    return PLAUSIBLE_FACTOR * MAX_LINK_BYTES_PER_S * max(elapsed_s, MIN_ELAPSED_S)


def counter_step(before: int, after: int, bits: int, elapsed_s: float) -> tuple[int, str | None]:
    """Bytes between two reads of one counter `elapsed_s` apart, and what was odd about them.

    The width comes from the value type, but a driver may report a 32-bit counter in a 64-bit
    field: it then wraps at 2**32 and reads as a jump of ~2**64 bytes. A 64-bit-typed delta no
    link could carry in the time is therefore taken modulo 2**32 when both reads fit in 32 bits
    (``"wrap32"``); one that went backwards otherwise counts nothing (``"backwards"``: a reset
    or a bad read); an implausible forward jump (a counter that refreshed late) counts as read.
    """
    delta = counter_delta(before, after, bits)
    if bits < 64 or delta <= plausible_bytes(elapsed_s):
        return delta, None
    if before < (1 << 32) and after < (1 << 32):
        return counter_delta(before, after, 32), (WRAP32 if after < before else None)
    if delta >= 1 << (bits - 1):
        return 0, BACKWARDS
    return delta, None


def _field_value(fv: Any) -> tuple[int, int, int] | str:
    """(value, bits, value type) of one nvmlFieldValue_t, or why it is unusable."""
    vtype = int(getattr(fv, "valueType", -1))
    if vtype not in _VALUE_TYPES:
        return f"unexpected value type {vtype} for a byte counter"
    member, bits = _VALUE_TYPES[vtype]
    raw = int(getattr(fv.value, member))
    return raw % (1 << bits), bits, vtype  # two's complement for the signed types


def _field_timestamp(fv: Any) -> int | None:
    try:
        stamp = getattr(fv, "timestamp", None)
        return None if stamp is None else int(stamp)
    except (TypeError, ValueError):
        return None


# NVML stamps field values in wall-clock µs since 1970; stamps further than this from the host's
# wall clock are not taken as such (another clock, or none).
_STAMP_TRUST_US = 3600 * 10**6


def _stamped_after(reading: CounterReading | None, not_before_us: int) -> bool:
    """Whether both fields carry wall-clock NVML timestamps at or after `not_before_us`. False
    also says nothing for sure: stamps may be missing, on another clock, or older because the
    driver stamps a value when it last changed (after a run nothing changes)."""
    if reading is None:
        return False
    stamps = (reading.rx_nvml_timestamp_us, reading.tx_nvml_timestamp_us)
    return all(
        s is not None and not_before_us <= s <= not_before_us + _STAMP_TRUST_US for s in stamps
    )


def _field_failure(nv: Nvml, name: str, ret: int) -> NotAvailable:
    """Why one field of nvmlDeviceGetFieldValues failed (its own nvmlReturn)."""
    module = nv._ensure()
    if not isinstance(module, ModuleType):
        return NotAvailable(ERROR, f"PCIe {name} byte counter field: NVML error {ret}", ret)
    if ret == int(getattr(module, "NVML_ERROR_INVALID_ARGUMENT", 2)):
        # Per field, drivers that predate the field answer an unknown field id this way.
        return NotAvailable(
            NOT_SUPPORTED,
            f"PCIe {name} byte counter field: {_KIND_TEXT[NOT_SUPPORTED]} (Invalid Argument: "
            "field id unknown to this driver; the counters need R555+)",
            ret,
        )
    kind = _error_kind(module, ret)
    text = _KIND_TEXT.get(kind, f"NVML error {ret}")
    return NotAvailable(kind, f"PCIe {name} byte counter field: {text}", ret)


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
    parsed: list[tuple[int, int, int]] = []
    stamps: list[int | None] = []
    for name, fv in zip(("RX", "TX"), values):
        ret = int(getattr(fv, "nvmlReturn", 0))
        if ret != 0:
            return _field_failure(nv, name, ret)
        got = _field_value(fv)
        if isinstance(got, str):
            return NotAvailable(ERROR, f"PCIe {name} byte counter field: {got}")
        parsed.append(got)
        stamps.append(_field_timestamp(fv))
    if len(parsed) != 2:
        return NotAvailable(ERROR, "nvmlDeviceGetFieldValues returned too few values")
    (rx, rx_bits, rx_type), (tx, tx_bits, _tx_type) = parsed
    if rx_bits != tx_bits:
        # Never seen; handle it anyway by wrapping each at the narrower width.
        bits = min(rx_bits, tx_bits)
        rx, tx = rx % (1 << bits), tx % (1 << bits)
    else:
        bits = rx_bits
    return CounterReading(
        rx_bytes=rx,
        tx_bytes=tx,
        counter_bits=bits,
        timestamp_s=now,
        value_type=rx_type,
        rx_nvml_timestamp_us=stamps[0],
        tx_nvml_timestamp_us=stamps[1],
    )


def read_pcie_throughput_one(nv: Nvml, handle: Any, direction: str) -> int | NotAvailable:
    """PCIe throughput of one direction ("rx" or "tx"), in NVML's KB/s over its ~20 ms window.
    The call itself commonly blocks for about that window."""
    if direction == "rx":
        counter = nv.constant("NVML_PCIE_UTIL_RX_BYTES", _PCIE_UTIL_RX)
    else:
        counter = nv.constant("NVML_PCIE_UTIL_TX_BYTES", _PCIE_UTIL_TX)
    got = nv.call("nvmlDeviceGetPcieThroughput", handle, counter)
    return got if isinstance(got, NotAvailable) else int(got)


def read_pcie_throughput_kib_s(nv: Nvml, handle: Any) -> tuple[int, int] | NotAvailable:
    """(RX, TX) PCIe throughput in KB/s (taken as KiB/s), each averaged over ~20 ms."""
    rx = read_pcie_throughput_one(nv, handle, "rx")
    if isinstance(rx, NotAvailable):
        return rx
    tx = read_pcie_throughput_one(nv, handle, "tx")
    if isinstance(tx, NotAvailable):
        return tx
    return rx, tx


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
    # What NVML answered, for diagnosing a first run on a new machine: the window's first and
    # last reads (counters: raw values, width, value type, NVML timestamps; throughput: rates),
    # with ``t_s`` in seconds from the first.
    first_reading: dict[str, Any] | None = None
    last_reading: dict[str, Any] | None = None
    settle_start_s: float | None = None  # seconds spent waiting for the counters to settle
    settle_stop_s: float | None = None
    settled: bool | None = None  # counters stopped growing at stop (None: not checked)
    wrap32_fixes: int = 0  # 64-bit-typed deltas read as 32-bit wraps
    anomalies: int = 0  # deltas that went backwards, counted as 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


THROUGHPUT_WINDOW_S = 0.02  # nvmlDeviceGetPcieThroughput's averaging window
THROUGHPUT_CAVEAT = (
    "estimated: nvmlDeviceGetPcieThroughput (documented in KB/s, taken as 1024 bytes, each rate "
    "an average over ~20 ms) read back to back, each rate integrated over the time since the "
    "previous read"
)


@dataclass
class _Accumulator:
    # Exact ints for the counters (a float would lose bytes past 2**53); floats once a
    # throughput integral is added.
    rx_bytes: int | float = 0
    tx_bytes: int | float = 0
    first: CounterReading | None = None
    last: CounterReading | None = None
    fits_32: bool = True  # every counter value read so far is below 2**32
    wrap32_fixes: int = 0
    anomalies: int = 0
    # Throughput: host time and rates of the reads.
    last_t: float | None = None  # the last RX read
    last_tx_t: float | None = None  # the last TX read
    last_tx_rate: int | None = None
    first_rates: tuple[int, int | None, float] | None = None  # (rx, tx, t)
    last_rates: tuple[int, int | None, float] | None = None
    rx_since_tx: int = 0
    samples: int = 0
    max_gap_s: float = 0.0
    failure: NotAvailable | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reopened(self) -> _Accumulator:
        """A fresh window whose baseline is this one's last read."""
        return _Accumulator(
            first=self.last,
            last=self.last,
            fits_32=self.fits_32,
            last_t=self.last_t,
            last_tx_t=self.last_tx_t,
            last_tx_rate=self.last_tx_rate,
            first_rates=self.last_rates,
            last_rates=self.last_rates,
            rx_since_tx=self.rx_since_tx,
            samples=1 if self.samples else 0,
            failure=self.failure,
        )


class PcieMonitor:
    """Measures PCIe RX/TX bytes between :meth:`start` and :meth:`stop` with the best method.

    The method is chosen once, at construction, by probing: byte counters, else throughput
    sampling, else counted-only (with the reason). While a window is open a background thread
    reads the counters (every `counter_poll_s`) or the throughput (back to back, the call
    pacing itself, at most every `throughput_poll_s`). ``background=False`` leaves sampling to
    the caller's :meth:`sample` calls, and `clock` / `sleep` can be replaced (tests drive a fake
    clock this way).

    Settling: the caller synchronises before :meth:`start` and :meth:`stop`; the counters are
    then read every `settle_poll_s` until two reads differ by less than `settle_bytes` (bounded
    by `settle_max_s`), so a driver that refreshes them late has the run's last bytes in them
    and the warm-up's first. Two equal reads may still both show a value cached from before the
    run ended; so the read must also carry NVML timestamps (wall-clock µs of the value) from
    after the call, or, where the timestamps cannot tell (absent, or stamping a value when it
    changes), the counters must have stayed put for `settle_quiet_s`. The throughput is read
    until one read covers the run's end.
    """

    def __init__(
        self,
        handle: Any,
        *,
        nv: Nvml | None = None,
        counter_poll_s: float = 0.005,
        throughput_poll_s: float = THROUGHPUT_WINDOW_S,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
        background: bool = True,
        unavailable: NotAvailable | None = None,
        settle_max_s: float = 1.0,
        settle_poll_s: float = 0.02,
        settle_bytes: int = 1 << 20,
        settle_quiet_s: float = 0.1,
        tx_every: int = 5,
        wall_us: Callable[[], int] = lambda: time.time_ns() // 1000,
        counters_failed: str | None = None,
    ) -> None:
        self._nv = nv or gateway()
        self.settle_max_s = settle_max_s
        self.settle_poll_s = settle_poll_s
        self.settle_bytes = settle_bytes
        self.settle_quiet_s = settle_quiet_s
        self._wall_us = wall_us
        self.refresh_us: int | None = None  # the driver's counter refresh period, once seen
        self.tx_every = max(1, int(tx_every))
        self._handle = handle
        self._clock = clock
        self._sleep = sleep
        self._background = background
        self._acc = _Accumulator()
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        # How the background loop waits: True when told to stop (tests drive it synchronously).
        self._wait: Callable[[float], bool] = self._stop_event.wait
        self._finish_at: float | None = None
        self._t0 = 0.0
        self._settle_start_s: float | None = None
        self.counter_bits: int | None = None
        self.probe_notes: list[str] = []
        # Why the byte counters must not be used although they answer (a check found them not
        # counting): the probe then starts at the throughput.
        self._counters_failed = counters_failed
        self.method, self.reason = self._probe(unavailable)
        self._poll_s = counter_poll_s if self.method == METHOD_COUNTERS else throughput_poll_s

    def _probe(self, unavailable: NotAvailable | None) -> tuple[str, str | None]:
        if unavailable is not None:
            return METHOD_COUNTED, unavailable.reason
        if isinstance(self._handle, NotAvailable):
            return METHOD_COUNTED, self._handle.reason
        if self._counters_failed is not None:
            self.probe_notes.append(f"byte counters: {self._counters_failed}")
        else:
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
        """Whether a background thread samples between start and stop: always, when measuring.
        (A counter typed 64-bit may still wrap at 32 bits; only frequent reads catch that.)"""
        return self.method in (METHOD_COUNTERS, METHOD_THROUGHPUT)

    # ------------------------------------------------------------------ sampling
    def sample(self, *, tx: bool | None = None) -> None:
        """Take one sample now (the background thread calls this; so may tests). Throughput:
        RX every sample, TX on the first and then every `tx_every` samples (or as `tx` says)."""
        if self.method == METHOD_COUNTERS:
            self._sample_counters()
        elif self.method == METHOD_THROUGHPUT:
            self._sample_rx()
            acc = self._acc
            if tx or (tx is None and (acc.last_tx_t is None or acc.rx_since_tx >= self.tx_every)):
                self._sample_tx()

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
            last = acc.last
            if last is not None:
                bits = min(last.counter_bits, reading.counter_bits)
                elapsed = reading.timestamp_s - last.timestamp_s
                rx, rx_odd = counter_step(last.rx_bytes, reading.rx_bytes, bits, elapsed)
                tx, tx_odd = counter_step(last.tx_bytes, reading.tx_bytes, bits, elapsed)
                for odd in (rx_odd, tx_odd):
                    acc.wrap32_fixes += odd == WRAP32
                    acc.anomalies += odd == BACKWARDS
                acc.rx_bytes += rx
                acc.tx_bytes += tx
                acc.max_gap_s = max(acc.max_gap_s, elapsed)
                self._note_refresh(last, reading)
            else:
                acc.first = reading
            if max(reading.rx_bytes, reading.tx_bytes) >= 1 << 32:
                acc.fits_32 = False
            acc.last = reading
            acc.samples += 1

    def _note_refresh(self, before: CounterReading, after: CounterReading) -> None:
        """Learn how often the driver refreshes the counters: the smallest step of NVML's RX
        stamp between two reads that saw RX change. A driver that stamps each change gives
        about the polling interval; one that caches gives its refresh period."""
        a, b = before.rx_nvml_timestamp_us, after.rx_nvml_timestamp_us
        if a is None or b is None or b <= a or after.rx_bytes == before.rx_bytes:
            return
        step = b - a
        if self.refresh_us is None or step < self.refresh_us:
            self.refresh_us = step

    def _quiet_needed_s(self) -> float:
        """How long unchanged counters must stay put to be taken as settled: `settle_quiet_s`,
        or two refresh periods of a driver seen to refresh less often (at most half the bound)."""
        if self.refresh_us is None:
            return self.settle_quiet_s
        return max(self.settle_quiet_s, min(2 * self.refresh_us / 1e6, self.settle_max_s / 2))

    def _sample_rx(self) -> None:
        rate = read_pcie_throughput_one(self._nv, self._handle, "rx")
        now = self._clock()
        if isinstance(rate, NotAvailable):
            self._fail(rate)
            return
        acc = self._acc
        with acc.lock:
            if acc.last_t is not None:
                # Read back to back, each rate covers the time since the previous RX read.
                dt = now - acc.last_t
                acc.rx_bytes += rate * 1024.0 * dt
                acc.max_gap_s = max(acc.max_gap_s, dt)
            acc.last_rates = (rate, acc.last_tx_rate, now)
            if acc.first_rates is None:
                acc.first_rates = acc.last_rates
            acc.last_t = now
            acc.rx_since_tx += 1
            acc.samples += 1

    def _sample_tx(self) -> None:
        rate = read_pcie_throughput_one(self._nv, self._handle, "tx")
        now = self._clock()
        if isinstance(rate, NotAvailable):
            self._fail(rate)
            return
        acc = self._acc
        with acc.lock:
            if acc.last_tx_t is not None:
                acc.tx_bytes += rate * 1024.0 * (now - acc.last_tx_t)
            acc.last_tx_t = now
            acc.last_tx_rate = rate
            acc.rx_since_tx = 0
            if acc.last_rates is not None:
                acc.last_rates = (acc.last_rates[0], rate, acc.last_rates[2])

    def _run(self) -> None:
        """The background loop: a read at most every poll interval, at once when the previous
        read took that long (a blocking throughput call paces itself)."""
        next_at = self._clock()  # the first read right after the one at start()
        while not self._wait(max(0.0, next_at - self._clock())):
            began = self._clock()
            finish_at = self._finish_at
            self.sample(tx=False if finish_at is not None else None)
            acc = self._acc
            if acc.failure is not None:
                return
            if finish_at is not None and acc.last_t is not None and acc.last_t >= finish_at:
                return
            next_at = began + self._poll_s

    def close(self) -> None:
        """End a window's polling thread without measuring (after an error); safe to repeat."""
        self._halt_thread()

    def _halt_thread(self) -> None:
        if self._thread is not None:
            self._stop_event.set()
            self._thread.join()
            self._thread = None

    def _settle_counters(self) -> tuple[float, bool | None]:
        """Read until two reads `settle_poll_s` apart differ by < `settle_bytes` in both
        directions and the value is known to postdate this call (see the class docstring);
        at most `settle_max_s`. Returns (seconds spent, whether it settled)."""
        began = self._clock()
        not_before_us = self._wall_us()
        self.sample()
        if self.settle_max_s <= 0:
            return 0.0, None
        quiet_since = began
        while True:
            acc = self._acc
            before = (acc.rx_bytes, acc.tx_bytes)
            self._sleep(self.settle_poll_s)
            self.sample()
            now = self._clock()
            elapsed = now - began
            if acc.failure is not None:
                return elapsed, False
            if max(acc.rx_bytes - before[0], acc.tx_bytes - before[1]) >= self.settle_bytes:
                quiet_since = now
            elif (
                _stamped_after(acc.last, not_before_us)
                or now - quiet_since >= self._quiet_needed_s()
            ):
                return elapsed, True
            if elapsed >= self.settle_max_s:
                return elapsed, False

    def _finish_throughput(self) -> float:
        """Read RX until one read ends a window past the run's end; then TX once more."""
        t_stop = self._clock()
        target = t_stop + THROUGHPUT_WINDOW_S
        if self._thread is not None:
            self._finish_at = target  # the thread keeps reading back to back until then
            self._thread.join(timeout=self.settle_max_s + 2 * THROUGHPUT_WINDOW_S)
            self._halt_thread()
        acc = self._acc
        while acc.failure is None and (acc.last_t is None or acc.last_t < target):
            self.sample(tx=False)
            if acc.last_t is None or acc.last_t >= target:
                break
            if self._clock() - t_stop >= self.settle_max_s:
                break
            self._sleep(max(0.0, min(self._poll_s, target - self._clock())))
        if acc.failure is None:
            self._sample_tx()
        return self._clock() - t_stop

    # ------------------------------------------------------------------ window
    def start(self) -> None:
        """Open the window (call with the copy stream synchronised)."""
        self._acc = _Accumulator()
        self._stop_event.clear()
        self._finish_at = None
        self._settle_start_s = None
        self._t0 = self._clock()
        if self.method == METHOD_COUNTED:
            return
        if self.method == METHOD_COUNTERS:
            self._settle_start_s, _ = self._settle_counters()
        else:
            # TX first: the RX read that opens the window is the last thing before the run.
            self._sample_tx()
            self._sample_rx()
        # The window opens at the last read: what the settling reads saw is not the run's.
        self._acc = self._acc.reopened()
        acc = self._acc
        if acc.last is not None:
            self._t0 = acc.last.timestamp_s
        elif acc.last_t is not None:
            self._t0 = acc.last_t
        if self._background and self.polls:
            self._thread = threading.Thread(target=self._run, name="moeprof-pcie", daemon=True)
            self._thread.start()

    def stop(self) -> PcieMeasurement:
        """Close the window (call with the copy stream synchronised) and return the bytes seen."""
        if self.method == METHOD_COUNTED:
            return PcieMeasurement(
                METHOD_COUNTED, None, None, self.reason, self._clock() - self._t0, 0
            )
        settled: bool | None = None
        if self.method == METHOD_COUNTERS:
            self._halt_thread()
            settle_stop, settled = self._settle_counters()
        else:
            settle_stop = self._finish_throughput()
        window_s = self._clock() - self._t0
        acc = self._acc
        common: dict[str, Any] = {
            "settle_start_s": self._settle_start_s,
            "settle_stop_s": settle_stop,
            "settled": settled,
            "first_reading": self._raw_first(acc),
            "last_reading": self._raw_last(acc),
            "max_sample_gap_s": acc.max_gap_s,
        }
        if acc.failure is not None:
            return PcieMeasurement(
                self.method,
                None,
                None,
                f"measurement failed: {acc.failure.reason}",
                window_s,
                acc.samples,
                counter_bits=self.counter_bits,
                wrap32_fixes=acc.wrap32_fixes,
                anomalies=acc.anomalies,
                **common,
            )
        if self.method == METHOD_COUNTERS:
            bits = self.counter_bits or 64
            # A 64-bit-typed counter that wrapped at 32 bits, or never left 32 bits, may be a
            # 32-bit one: judge its reads at that width.
            judged = 32 if bits == 64 and (acc.wrap32_fixes or acc.fits_32) else bits
            # Two wraps between reads would go unseen: reads must come faster than one wrap.
            wrap_safe = acc.max_gap_s * MAX_LINK_BYTES_PER_S < float(1 << judged)
            notes = []
            if not wrap_safe:
                notes.append("counter reads too far apart: a wrap may have been missed")
            if acc.wrap32_fixes:
                notes.append(
                    f"the {bits}-bit-typed counters wrapped at 32 bits {acc.wrap32_fixes} "
                    "time(s): read modulo 2**32"
                )
            if acc.anomalies:
                notes.append(
                    f"{acc.anomalies} counter read(s) went backwards and counted 0 bytes: "
                    "bytes may be low"
                )
            if settled is False:
                notes.append(
                    f"counters still growing {settle_stop:.2f} s after the run (other traffic "
                    "on this GPU?)"
                )
            return PcieMeasurement(
                METHOD_COUNTERS,
                int(acc.rx_bytes),
                int(acc.tx_bytes),
                "; ".join(notes) or None,
                window_s,
                acc.samples,
                counter_bits=bits,
                wrap_safe=wrap_safe,
                wrap32_fixes=acc.wrap32_fixes,
                anomalies=acc.anomalies,
                **common,
            )
        return PcieMeasurement(
            METHOD_THROUGHPUT,
            int(round(acc.rx_bytes)),
            int(round(acc.tx_bytes)),
            self.reason,
            window_s,
            acc.samples,
            **common,
        )

    def _raw_first(self, acc: _Accumulator) -> dict[str, Any] | None:
        if acc.first is not None:
            return acc.first.raw(self._t0)
        return self._raw_rates(acc.first_rates)

    def _raw_last(self, acc: _Accumulator) -> dict[str, Any] | None:
        if acc.last is not None:
            return acc.last.raw(self._t0)
        return self._raw_rates(acc.last_rates)

    def _raw_rates(self, rates: tuple[int, int | None, float] | None) -> dict[str, Any] | None:
        if rates is None:
            return None
        return {"rx_kib_s": rates[0], "tx_kib_s": rates[1], "t_s": rates[2] - self._t0}


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
