"""Reading PCIe traffic from NVML, and the arithmetic of its cumulative byte counters.

The counters ``NVML_FI_DEV_PCIE_COUNT_RX_BYTES`` / ``TX_BYTES`` come through
``nvmlDeviceGetFieldValues``; each field's own return code and value type are checked, and the
type says how wide the counter is, so deltas are taken modulo 2**bits. A driver may report a
32-bit counter in a 64-bit field: :func:`counter_step` reads a 64-bit-typed delta no link could
carry as a 32-bit wrap. ``nvmlDeviceGetPcieThroughput`` gives a rate per direction instead.
See docs/replay.md, "Measuring PCIe".
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moeprof.nvml.binding import ERROR, KIND_TEXT, NOT_SUPPORTED, NotAvailable, Nvml

__all__ = [
    "BACKWARDS",
    "MAX_LINK_BYTES_PER_S",
    "MIN_ELAPSED_S",
    "PLAUSIBLE_FACTOR",
    "THROUGHPUT_WINDOW_S",
    "WRAP32",
    "CounterReading",
    "counter_delta",
    "counter_step",
    "plausible_bytes",
    "read_pcie_counters",
    "read_pcie_throughput_kib_s",
    "read_pcie_throughput_one",
    "stamped_after",
]

# NVML constants we rely on, with the values of nvml.h; read from the binding when it has them.
_FI_PCIE_TX_BYTES = 197  # NVML_FI_DEV_PCIE_COUNT_TX_BYTES
_FI_PCIE_RX_BYTES = 198  # NVML_FI_DEV_PCIE_COUNT_RX_BYTES
# Per direction: the NVML_PCIE_UTIL_* counter of nvmlDeviceGetPcieThroughput and its value.
_PCIE_UTIL = {"tx": ("NVML_PCIE_UTIL_TX_BYTES", 0), "rx": ("NVML_PCIE_UTIL_RX_BYTES", 1)}

THROUGHPUT_WINDOW_S = 0.02  # nvmlDeviceGetPcieThroughput's averaging window

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

# A delta above this share of the fastest link over the time between two reads cannot be traffic.
PLAUSIBLE_FACTOR = 1.5
MIN_ELAPSED_S = 0.001

WRAP32 = "wrap32"
BACKWARDS = "backwards"


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


def stamped_after(reading: CounterReading | None, not_before_us: int) -> bool:
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
    kind = nv.error_kind(ret)
    if kind is None:
        return NotAvailable(ERROR, f"PCIe {name} byte counter field: NVML error {ret}", ret)
    if ret == nv.constant("NVML_ERROR_INVALID_ARGUMENT", 2):
        # Per field, drivers that predate the field answer an unknown field id this way.
        return NotAvailable(
            NOT_SUPPORTED,
            f"PCIe {name} byte counter field: {KIND_TEXT[NOT_SUPPORTED]} (Invalid Argument: "
            "field id unknown to this driver; the counters need R555+)",
            ret,
        )
    text = KIND_TEXT.get(kind, f"NVML error {ret}")
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
    counter = nv.constant(*_PCIE_UTIL[direction])
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
