"""Measuring a run's PCIe bytes with the best method NVML offers (docs/replay.md, "Measuring
PCIe"), best first:

1. ``nvml_counters``: the cumulative byte counters (see :mod:`moeprof.nvml.counters`), read by a
   background thread every few ms while a run is measured, so no counter wraps twice unseen.
   Before and after a run the counters are read until they stop growing.
2. ``nvml_throughput``: ``nvmlDeviceGetPcieThroughput`` (documented in KB/s, taken as KiB/s,
   averaged over ~20 ms; the call blocks about that long) read back to back by a background
   thread, each rate integrated over the time since the previous read: an estimate, labelled as
   such.
3. ``counted_only``: nothing measured; the report shows counted payload only, with the reason.

Host-to-device copies are the GPU's RX side. :class:`PcieMonitor` probes once and keeps the
window of the method found, a :class:`_CounterWindow` or a :class:`_ThroughputWindow` (none for
counted-only); the monitor owns the polling thread, the window the reads and their arithmetic.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from moeprof.nvml.binding import GPU_LOST, NotAvailable, Nvml, gateway
from moeprof.nvml.counters import (
    BACKWARDS,
    MAX_LINK_BYTES_PER_S,
    THROUGHPUT_WINDOW_S,
    WRAP32,
    CounterReading,
    counter_step,
    read_pcie_counters,
    read_pcie_throughput_kib_s,
    read_pcie_throughput_one,
    stamped_after,
)

__all__ = [
    "METHOD_COUNTED",
    "METHOD_COUNTERS",
    "METHOD_THROUGHPUT",
    "THROUGHPUT_CAVEAT",
    "PcieMeasurement",
    "PcieMonitor",
]

METHOD_COUNTERS = "nvml_counters"
METHOD_THROUGHPUT = "nvml_throughput"
METHOD_COUNTED = "counted_only"

THROUGHPUT_CAVEAT = (
    "estimated: nvmlDeviceGetPcieThroughput (documented in KB/s, taken as 1024 bytes, each rate "
    "an average over ~20 ms) read back to back, each rate integrated over the time since the "
    "previous read"
)


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


def _failed(
    method: str, failure: NotAvailable, window_s: float, samples: int, parts: dict[str, Any]
) -> PcieMeasurement:
    """A window whose reads failed part way: no bytes, the failure as the reason."""
    reason = f"measurement failed: {failure.reason}"
    return PcieMeasurement(method, None, None, reason, window_s, samples, **parts)


# ---------------------------------------------------------------------- what a window has read


@dataclass
class _Tally:
    """What one window has read; the polling thread and the caller share it under `lock`."""

    failure: NotAvailable | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, why: NotAvailable) -> None:
        with self.lock:
            if self.failure is None:
                self.failure = why


@dataclass
class _CounterTally(_Tally):
    # Exact ints: a float would lose bytes past 2**53.
    rx_bytes: int = 0
    tx_bytes: int = 0
    first: CounterReading | None = None
    last: CounterReading | None = None
    fits_32: bool = True  # every counter value read so far is below 2**32
    wrap32_fixes: int = 0
    anomalies: int = 0
    samples: int = 0
    max_gap_s: float = 0.0

    def reopened(self) -> _CounterTally:
        """A fresh window whose baseline is this one's last read."""
        return _CounterTally(
            failure=self.failure,
            first=self.last,
            last=self.last,
            fits_32=self.fits_32,
            samples=1 if self.samples else 0,
        )


@dataclass
class _Direction:
    """Throughput reads of one direction, each rate integrated over the time since the
    previous read of the same direction."""

    bytes: float = 0.0
    last_t: float | None = None  # host time of the last read
    rate_kib_s: int | None = None  # what the last read said
    reads: int = 0
    max_gap_s: float = 0.0
    streak: int = 0  # reads since the other direction's last read

    def reopened(self) -> _Direction:
        return _Direction(
            last_t=self.last_t,
            rate_kib_s=self.rate_kib_s,
            reads=1 if self.reads else 0,
            streak=self.streak,
        )


@dataclass
class _ThroughputTally(_Tally):
    rx: _Direction = field(default_factory=_Direction)
    tx: _Direction = field(default_factory=_Direction)
    first_rates: tuple[int, int | None, float] | None = None  # (rx, tx KiB/s, time of RX read)

    def last_rates(self) -> tuple[int, int | None, float] | None:
        rx = self.rx
        if rx.last_t is None or rx.rate_kib_s is None:
            return None
        return rx.rate_kib_s, self.tx.rate_kib_s, rx.last_t

    def reopened(self) -> _ThroughputTally:
        """A fresh window whose baseline is this one's last reads."""
        return _ThroughputTally(
            failure=self.failure,
            rx=self.rx.reopened(),
            tx=self.tx.reopened(),
            first_rates=self.last_rates(),
        )


def _raw_rates(rates: tuple[int, int | None, float] | None, t0: float) -> dict[str, Any] | None:
    if rates is None:
        return None
    return {"rx_kib_s": rates[0], "tx_kib_s": rates[1], "t_s": rates[2] - t0}


# ---------------------------------------------------------------------- windows, one per method


class _Window(ABC):
    """How one method measures a window: opening reads, samples, closing reads, the bytes."""

    method: str

    def __init__(
        self,
        nv: Nvml,
        handle: Any,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        poll_s: float,
    ) -> None:
        self._nv = nv
        self._handle = handle
        self._clock = clock
        self._sleep = sleep
        self.poll_s = poll_s  # the polling thread reads at most this often

    @abstractmethod
    def start(self) -> float | None:
        """Open a window with its first reads; the host time of the read it opens at (None:
        no read succeeded)."""

    @abstractmethod
    def sample(self, *, tx: bool | None = None) -> None:
        """Read once now."""

    @abstractmethod
    def poll(self) -> bool:
        """One read of the polling thread; True when it should read no more."""

    @abstractmethod
    def stop(self, t0: float, end_polling: Callable[[float], None]) -> PcieMeasurement:
        """Close the window opened at host time `t0`: end the polling thread with
        ``end_polling(seconds it may still read)``, take the closing reads, sum up."""


@dataclass(frozen=True)
class _Settling:
    """How the counters are read until they settle (see :class:`PcieMonitor`)."""

    max_s: float
    poll_s: float
    bytes: int
    quiet_s: float


class _CounterWindow(_Window):
    """Byte counters: exact deltas between reads, settled before and after the run."""

    method = METHOD_COUNTERS

    def __init__(
        self,
        nv: Nvml,
        handle: Any,
        counter_bits: int,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        poll_s: float,
        settling: _Settling,
        wall_us: Callable[[], int],
    ) -> None:
        super().__init__(nv, handle, clock=clock, sleep=sleep, poll_s=poll_s)
        self.counter_bits = counter_bits
        self._settling = settling
        self._wall_us = wall_us
        self.refresh_us: int | None = None  # the driver's counter refresh period, once seen
        self.settle_start_s: float | None = None
        self._tally = _CounterTally()

    def start(self) -> float | None:
        self._tally = _CounterTally()
        self.settle_start_s, _ = self._settle()
        # The window opens at the last read: what the settling reads saw is not the run's.
        self._tally = self._tally.reopened()
        last = self._tally.last
        return None if last is None else last.timestamp_s

    def sample(self, *, tx: bool | None = None) -> None:
        """Read both counters (`tx` is the throughput window's; both are always read here)."""
        reading = read_pcie_counters(self._nv, self._handle, self._clock)
        tally = self._tally
        if isinstance(reading, NotAvailable):
            tally.fail(reading)
            return
        with tally.lock:
            last = tally.last
            if last is not None:
                bits = min(last.counter_bits, reading.counter_bits)
                elapsed = reading.timestamp_s - last.timestamp_s
                rx_step, rx_odd = counter_step(last.rx_bytes, reading.rx_bytes, bits, elapsed)
                tx_step, tx_odd = counter_step(last.tx_bytes, reading.tx_bytes, bits, elapsed)
                for odd in (rx_odd, tx_odd):
                    tally.wrap32_fixes += odd == WRAP32
                    tally.anomalies += odd == BACKWARDS
                tally.rx_bytes += rx_step
                tally.tx_bytes += tx_step
                tally.max_gap_s = max(tally.max_gap_s, elapsed)
                self._note_refresh(last, reading)
            else:
                tally.first = reading
            if max(reading.rx_bytes, reading.tx_bytes) >= 1 << 32:
                tally.fits_32 = False
            tally.last = reading
            tally.samples += 1

    def poll(self) -> bool:
        self.sample()
        return self._tally.failure is not None

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
        """How long unchanged counters must stay put to be taken as settled: the quiet time,
        or two refresh periods of a driver seen to refresh less often (at most half the bound)."""
        settling = self._settling
        if self.refresh_us is None:
            return settling.quiet_s
        return max(settling.quiet_s, min(2 * self.refresh_us / 1e6, settling.max_s / 2))

    def _settle(self) -> tuple[float, bool | None]:
        """Read until two reads `poll_s` apart differ by < `bytes` in both directions and the
        value is known to postdate this call (see :class:`PcieMonitor`); at most `max_s`.
        Returns (seconds spent, whether it settled)."""
        settling = self._settling
        began = self._clock()
        not_before_us = self._wall_us()
        self.sample()
        if settling.max_s <= 0:
            return 0.0, None
        quiet_since = began
        while True:
            tally = self._tally
            before = (tally.rx_bytes, tally.tx_bytes)
            self._sleep(settling.poll_s)
            self.sample()
            now = self._clock()
            elapsed = now - began
            if tally.failure is not None:
                return elapsed, False
            if max(tally.rx_bytes - before[0], tally.tx_bytes - before[1]) >= settling.bytes:
                quiet_since = now
            elif (
                stamped_after(tally.last, not_before_us)
                or now - quiet_since >= self._quiet_needed_s()
            ):
                return elapsed, True
            if elapsed >= settling.max_s:
                return elapsed, False

    def stop(self, t0: float, end_polling: Callable[[float], None]) -> PcieMeasurement:
        end_polling(0.0)
        settle_stop_s, settled = self._settle()
        window_s = self._clock() - t0
        tally = self._tally
        parts: dict[str, Any] = {
            "settle_start_s": self.settle_start_s,
            "settle_stop_s": settle_stop_s,
            "settled": settled,
            "first_reading": None if tally.first is None else tally.first.raw(t0),
            "last_reading": None if tally.last is None else tally.last.raw(t0),
            "max_sample_gap_s": tally.max_gap_s,
            "counter_bits": self.counter_bits,
            "wrap32_fixes": tally.wrap32_fixes,
            "anomalies": tally.anomalies,
        }
        if tally.failure is not None:
            return _failed(self.method, tally.failure, window_s, tally.samples, parts)
        wrap_safe, notes = self._caveats(tally, settle_stop_s, settled)
        return PcieMeasurement(
            self.method,
            int(tally.rx_bytes),
            int(tally.tx_bytes),
            "; ".join(notes) or None,
            window_s,
            tally.samples,
            wrap_safe=wrap_safe,
            **parts,
        )

    def _caveats(
        self, tally: _CounterTally, settle_stop_s: float, settled: bool | None
    ) -> tuple[bool, list[str]]:
        """Whether the reads came fast enough to see every wrap, and what to say about them."""
        bits = self.counter_bits
        # A 64-bit-typed counter that wrapped at 32 bits, or never left 32 bits, may be a
        # 32-bit one: judge its reads at that width.
        judged = 32 if bits == 64 and (tally.wrap32_fixes or tally.fits_32) else bits
        # Two wraps between reads would go unseen: reads must come faster than one wrap.
        wrap_safe = tally.max_gap_s * MAX_LINK_BYTES_PER_S < float(1 << judged)
        notes = []
        if not wrap_safe:
            notes.append("counter reads too far apart: a wrap may have been missed")
        if tally.wrap32_fixes:
            notes.append(
                f"the {bits}-bit-typed counters wrapped at 32 bits {tally.wrap32_fixes} "
                "time(s): read modulo 2**32"
            )
        if tally.anomalies:
            notes.append(
                f"{tally.anomalies} counter read(s) went backwards and counted 0 bytes: "
                "bytes may be low"
            )
        if settled is False:
            notes.append(
                f"counters still growing {settle_stop_s:.2f} s after the run (other traffic "
                "on this GPU?)"
            )
        return wrap_safe, notes


class _ThroughputWindow(_Window):
    """Throughput sampling: RX read back to back, TX now and then, each rate integrated over
    the time since its direction's previous read; read on until a window covers the run's end."""

    method = METHOD_THROUGHPUT

    def __init__(
        self,
        nv: Nvml,
        handle: Any,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        poll_s: float,
        tx_every: int,
        tail_max_s: float,
    ) -> None:
        super().__init__(nv, handle, clock=clock, sleep=sleep, poll_s=poll_s)
        self.tx_every = tx_every
        self._tail_max_s = tail_max_s  # at most this long reading after the run
        self._finish_at: float | None = None  # set at stop: polling reads RX until past it
        self._tally = _ThroughputTally()

    def start(self) -> float | None:
        self._tally = _ThroughputTally()
        self._finish_at = None
        # TX first: the RX read that opens the window is the last thing before the run.
        self._read("tx")
        self._read("rx")
        self._tally = self._tally.reopened()
        return self._tally.rx.last_t

    def sample(self, *, tx: bool | None = None) -> None:
        """RX every sample, TX on the first and then every `tx_every` samples (or as `tx`
        says)."""
        self._read("rx")
        tally = self._tally
        if tx or (tx is None and (tally.tx.last_t is None or tally.rx.streak >= self.tx_every)):
            self._read("tx")

    def _read(self, direction: str) -> None:
        rate = read_pcie_throughput_one(self._nv, self._handle, direction)
        now = self._clock()
        tally = self._tally
        if isinstance(rate, NotAvailable):
            tally.fail(rate)
            return
        with tally.lock:
            side, other = (tally.rx, tally.tx) if direction == "rx" else (tally.tx, tally.rx)
            if side.last_t is not None:
                # Read back to back, each rate covers the time since the previous read.
                gap = now - side.last_t
                side.bytes += rate * 1024.0 * gap
                side.max_gap_s = max(side.max_gap_s, gap)
            side.last_t = now
            side.rate_kib_s = rate
            side.reads += 1
            side.streak += 1
            other.streak = 0
            if tally.first_rates is None:
                tally.first_rates = tally.last_rates()

    def poll(self) -> bool:
        finish_at = self._finish_at
        self.sample(tx=False if finish_at is not None else None)
        tally = self._tally
        if tally.failure is not None:
            return True
        return (
            finish_at is not None and tally.rx.last_t is not None and tally.rx.last_t >= finish_at
        )

    def stop(self, t0: float, end_polling: Callable[[float], None]) -> PcieMeasurement:
        """Read RX until one read ends a window past the run's end; then TX once more."""
        t_stop = self._clock()
        target = t_stop + THROUGHPUT_WINDOW_S
        self._finish_at = target  # the polling thread keeps reading back to back until then
        end_polling(self._tail_max_s + 2 * THROUGHPUT_WINDOW_S)
        tally = self._tally
        while tally.failure is None and (tally.rx.last_t is None or tally.rx.last_t < target):
            self.sample(tx=False)
            if tally.rx.last_t is None or tally.rx.last_t >= target:
                break
            if self._clock() - t_stop >= self._tail_max_s:
                break
            self._sleep(max(0.0, min(self.poll_s, target - self._clock())))
        if tally.failure is None:
            self._read("tx")
        settle_stop_s = self._clock() - t_stop
        window_s = self._clock() - t0
        parts: dict[str, Any] = {
            "settle_start_s": None,
            "settle_stop_s": settle_stop_s,
            "settled": None,
            "first_reading": _raw_rates(tally.first_rates, t0),
            "last_reading": _raw_rates(tally.last_rates(), t0),
            "max_sample_gap_s": tally.rx.max_gap_s,
        }
        if tally.failure is not None:
            return _failed(self.method, tally.failure, window_s, tally.rx.reads, parts)
        return PcieMeasurement(
            self.method,
            int(round(tally.rx.bytes)),
            int(round(tally.tx.bytes)),
            THROUGHPUT_CAVEAT,
            window_s,
            tally.rx.reads,
            **parts,
        )


# ---------------------------------------------------------------------- the monitor


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
    until one read covers the run's end (at most `settle_max_s` after it).
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
        self._handle = handle
        self._clock = clock
        self._background = background
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        # How the background loop waits: True when told to stop (tests drive it synchronously).
        self._wait: Callable[[float], bool] = self._stop_event.wait
        self._t0 = 0.0
        self.counter_bits: int | None = None
        self.probe_notes: list[str] = []
        # `counters_failed`: why the byte counters must not be used although they answer (a
        # check found them not counting): the probe then starts at the throughput.
        self.method, self.reason = self._probe(unavailable, counters_failed)
        self._window: _Window | None = None
        if self.method == METHOD_COUNTERS and self.counter_bits is not None:
            self._window = _CounterWindow(
                self._nv,
                handle,
                self.counter_bits,
                clock=clock,
                sleep=sleep,
                poll_s=counter_poll_s,
                settling=_Settling(settle_max_s, settle_poll_s, settle_bytes, settle_quiet_s),
                wall_us=wall_us,
            )
        elif self.method == METHOD_THROUGHPUT:
            self._window = _ThroughputWindow(
                self._nv,
                handle,
                clock=clock,
                sleep=sleep,
                poll_s=throughput_poll_s,
                tx_every=max(1, int(tx_every)),
                tail_max_s=settle_max_s,
            )

    def _probe(
        self, unavailable: NotAvailable | None, counters_failed: str | None
    ) -> tuple[str, str | None]:
        if unavailable is not None:
            return METHOD_COUNTED, unavailable.reason
        if isinstance(self._handle, NotAvailable):
            return METHOD_COUNTED, self._handle.reason
        if counters_failed is not None:
            self.probe_notes.append(f"byte counters: {counters_failed}")
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
        return self._window is not None

    @property
    def refresh_us(self) -> int | None:
        """The driver's counter refresh period, once seen (byte counters only)."""
        window = self._window
        return window.refresh_us if isinstance(window, _CounterWindow) else None

    def sample(self, *, tx: bool | None = None) -> None:
        """Take one sample now (the background thread calls this; so may tests). Throughput:
        RX every sample, TX on the first and then every `tx_every` samples (or as `tx` says)."""
        if self._window is not None:
            self._window.sample(tx=tx)

    def _run(self) -> None:
        """The background loop: a read at most every poll interval, at once when the previous
        read took that long (a blocking throughput call paces itself)."""
        window = self._window
        if window is None:
            return
        next_at = self._clock()  # the first read right after the one at start()
        while not self._wait(max(0.0, next_at - self._clock())):
            began = self._clock()
            if window.poll():
                return
            next_at = began + window.poll_s

    def close(self) -> None:
        """End a window's polling thread without measuring (after an error); safe to repeat."""
        self._end_polling()

    def _end_polling(self, run_on_s: float = 0.0) -> None:
        """End the polling thread: when it stops by itself within `run_on_s`, else now."""
        if self._thread is None:
            return
        if run_on_s > 0:
            self._thread.join(timeout=run_on_s)
        self._stop_event.set()
        self._thread.join()
        self._thread = None

    def start(self) -> None:
        """Open the window (call with the copy stream synchronised)."""
        self._stop_event.clear()
        self._t0 = self._clock()
        if self._window is None:
            return
        opened_at = self._window.start()
        if opened_at is not None:
            self._t0 = opened_at
        if self._background:
            self._thread = threading.Thread(target=self._run, name="moeprof-pcie", daemon=True)
            self._thread.start()

    def stop(self) -> PcieMeasurement:
        """Close the window (call with the copy stream synchronised) and return the bytes seen."""
        if self._window is None:
            window_s = self._clock() - self._t0
            return PcieMeasurement(METHOD_COUNTED, None, None, self.reason, window_s, 0)
        return self._window.stop(self._t0, self._end_polling)
