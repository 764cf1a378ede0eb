"""The NVML package against a fake pynvml (tests/nvml_fakes.py), with scenarios named after
real failures. No GPU needed: the fake replaces the binding at the gateway
(``moeprof.nvml.binding._import_pynvml``, or a gateway's own loader).
"""

from __future__ import annotations

import ctypes
import json
import time
import types
from typing import Any

import pytest
from nvml_fakes import (
    ERROR_GPU_IS_LOST,
    ERROR_INVALID_ARGUMENT,
    ERROR_LIBRARY_NOT_FOUND,
    ERROR_NOT_SUPPORTED,
    FI_RX,
    FI_TX,
    VALUE_DOUBLE,
    VALUE_UINT,
    VALUE_ULL,
    FakeClock,
    FakeGpu,
    gateway_for,
    loader_for,
)

from moeprof import nvml
from moeprof.nvml import binding, counters

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
    monkeypatch.setattr(binding, "_import_pynvml", loader_for(FakeGpu()))
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
        nv.handle(index=0), nv=nv, background=False, settle_max_s=0
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
    mon = nvml.PcieMonitor(nv.handle(index=0), nv=nv, background=False, clock=clock, settle_max_s=0)
    assert mon.method == nvml.METHOD_COUNTERS and mon.counter_bits == bits
    assert mon.polls  # a 64-bit-typed counter may still wrap at 32 bits: always polled
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
    mon = nvml.PcieMonitor(nv.handle(index=0), nv=nv, background=False, clock=clock, settle_max_s=0)
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
    assert counters._field_value(fv) == ((1 << 40) + 5, 64, 3)
    fv.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    fv.value.uiVal = 0xFFFFFFF0
    assert counters._field_value(fv) == (0xFFFFFFF0, 32, 1)
    fv.timestamp = 1_700_000_000_123_456
    assert counters._field_timestamp(fv) == 1_700_000_000_123_456
    assert pynvml.NVML_ERROR_INVALID_ARGUMENT == ERROR_INVALID_ARGUMENT
    assert pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES == FI_RX
    assert pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES == FI_TX
    assert counters._VALUE_TYPES[pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT] == ("usVal", 16)
    assert ctypes.sizeof(ctypes.c_ulonglong) == 8


def test_throughput_only_is_integrated_over_time() -> None:
    gpu = FakeGpu(counters_supported=False, throughput_kib_s=(50_000, 2_000))
    nv = gateway_for(gpu)
    clock = FakeClock()
    mon = nvml.PcieMonitor(
        nv.handle(index=0), nv=nv, background=False, clock=clock, settle_max_s=0, tx_every=1
    )
    assert mon.method == nvml.METHOD_THROUGHPUT and mon.polls
    assert "estimated" in (mon.reason or "") and "1024" in (mon.reason or "")
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
    assert m.first_reading == {"rx_kib_s": 50_000, "tx_kib_s": 2_000, "t_s": 0.0}
    assert m.last_reading is not None and m.last_reading["t_s"] == pytest.approx(total_s)


def _burst_profile(start: float, end: float, rx_kib_s: int, tx_kib_s: int) -> Any:
    """KiB/s averaged over [t0, t1] of traffic at a constant rate during [start, end]."""

    def average(t0: float, t1: float) -> tuple[int, int]:
        share = max(0.0, min(t1, end) - max(t0, start)) / (t1 - t0)
        return int(rx_kib_s * share), int(tx_kib_s * share)

    return average


@pytest.mark.parametrize("call_s", [0.02, 0.0])
def test_throughput_reads_back_to_back_and_credits_each_rate_once(call_s: float) -> None:
    """Each rate counts for the time since the previous RX read: with a blocking call the
    reads tile the run with no pause between them, with an instant one they come every 20 ms;
    the tail read after stop covers the run's last window."""
    clock = FakeClock()
    run_start, run_end = 100.05, 100.3131  # not aligned with the reads
    rx_rate, tx_rate = 40_000_000, 1_000_000  # KiB/s: ~41 GB/s in, ~1 GB/s out
    gpu = FakeGpu(
        counters_supported=False,
        clock=clock,
        throughput_call_s=call_s,
        throughput_fn=_burst_profile(run_start, run_end, rx_rate, tx_rate),
    )
    nv = gateway_for(gpu)
    mon = nvml.PcieMonitor(
        nv.handle(index=0), nv=nv, background=False, clock=clock, sleep=clock.sleep
    )
    assert mon.method == nvml.METHOD_THROUGHPUT
    clock.t = 100.0
    gpu.throughput_calls.clear()
    mon.start()
    waits: list[float] = []

    def wait(seconds: float) -> bool:  # the background loop, run here on the fake clock
        waits.append(seconds)
        clock.sleep(seconds)
        return clock() >= run_end

    mon._wait = wait
    mon._run()
    m = mon.stop()
    true_rx = rx_rate * 1024 * (run_end - run_start)
    true_tx = tx_rate * 1024 * (run_end - run_start)
    assert m.rx_bytes is not None and m.tx_bytes is not None
    assert m.rx_bytes == pytest.approx(true_rx, rel=0.02)
    assert m.tx_bytes == pytest.approx(true_tx, rel=0.15)  # TX is read 1 in 5: coarser
    rx_reads = [t for counter, t in gpu.throughput_calls if counter == 1]
    tx_reads = [t for counter, t in gpu.throughput_calls if counter == 0]
    assert len(tx_reads) < len(rx_reads) / 3
    if call_s:
        assert max(waits) == 0.0  # the call paces the loop: no wait on top of it
    else:
        assert waits[0] == 0.0 and all(w == pytest.approx(0.02) for w in waits[1:])
    assert rx_reads[-1] >= run_end + nvml.THROUGHPUT_WINDOW_S - 1e-9  # the tail read
    assert m.samples == len(rx_reads)


def test_background_thread_keeps_up_with_a_wrapping_counter() -> None:
    # Every read advances a 32-bit counter by 3 GB: only reads in between keep the count right.
    step = 3_000_000_000
    gpu = FakeGpu(counter_bits=32, value_type=VALUE_UINT, rx_per_read=step, tx_per_read=1)
    nv = gateway_for(gpu)
    mon = nvml.PcieMonitor(nv.handle(index=0), nv=nv, counter_poll_s=0.002, settle_max_s=0)
    reads_before = gpu.reads
    mon.start()
    time.sleep(0.05)
    m = mon.stop()
    reads = gpu.reads - reads_before
    assert reads >= 3
    assert m.samples == reads
    assert m.rx_bytes == (reads - 1) * step  # the read at start() set the baseline
    assert m.tx_bytes == reads - 1


def test_counter_step() -> None:
    ms = 0.001
    assert nvml.counter_step(10, 25, 64, ms) == (15, None)
    assert nvml.counter_step((1 << 32) - 5, 3, 32, ms) == (8, None)  # typed 32-bit: plain wrap
    # A 32-bit counter in a 64-bit field wraps at 2**32: a "2**64" jump is read modulo 2**32.
    assert nvml.counter_step((1 << 32) - 100, 50, 64, ms) == (150, nvml.WRAP32)
    # Values past 32 bits that go backwards: a reset or a bad read, counted as nothing.
    assert nvml.counter_step(5 << 32, 4 << 32, 64, ms) == (0, nvml.BACKWARDS)
    # A big forward jump (a late refresh) is what the link carried: counted as read.
    assert nvml.counter_step(5 << 32, 9 << 32, 64, ms) == (4 << 32, None)
    # Plausibility scales with the time between the reads (and is at least 1 ms): 1.5 x the
    # fastest link planned for, 128 GB/s.
    assert nvml.plausible_bytes(0.01) == pytest.approx(1.5 * 128e9 * 0.01)
    assert nvml.plausible_bytes(0.0) == pytest.approx(1.5 * 128e9 * 0.001)


def test_32bit_counter_in_a_64bit_field() -> None:
    """Scenario: the driver reports a 32-bit counter as unsigned long long. It wraps every
    ~78 ms at 55 GB/s; read every 5 ms, each wrap is undone and nothing is lost."""
    step = 275_000_000  # 55 GB/s for 5 ms
    gpu = FakeGpu(
        counter_bits=32, value_type=VALUE_ULL, rx_bytes=(1 << 32) - 10**9, rx_per_read=step
    )
    nv = gateway_for(gpu)
    clock = FakeClock()
    mon = nvml.PcieMonitor(nv.handle(index=0), nv=nv, background=False, clock=clock, settle_max_s=0)
    assert mon.counter_bits == 64 and mon.polls
    mon.start()
    start_rx = gpu.rx_bytes
    for _ in range(40):  # 200 ms: over 10 GB, two wraps and more
        clock.t += 0.005
        mon.sample()
    clock.t += 0.005
    m = mon.stop()
    assert m.rx_bytes == gpu.rx_bytes - start_rx == 41 * step
    assert m.wrap32_fixes >= 2 and m.anomalies == 0
    assert "wrapped at 32 bits" in (m.reason or "")
    assert m.wrap_safe is True and m.counter_bits == 64
    assert m.first_reading is not None and m.first_reading["value_type"] == VALUE_ULL


def test_32bit_counter_in_a_64bit_field_is_polled_by_the_thread() -> None:
    step = 1_000_000_000  # per read: a wrap every ~4 reads
    gpu = FakeGpu(counter_bits=32, value_type=VALUE_ULL, rx_per_read=step)
    nv = gateway_for(gpu)
    mon = nvml.PcieMonitor(nv.handle(index=0), nv=nv, counter_poll_s=0.002, settle_max_s=0)
    reads_before = gpu.reads
    mon.start()
    time.sleep(0.05)
    m = mon.stop()
    reads = gpu.reads - reads_before
    assert reads >= 10  # the thread polled although the type says 64 bits
    assert m.rx_bytes == (reads - 1) * step
    assert m.wrap32_fixes >= 2


def test_a_counter_that_refreshes_late_is_waited_for() -> None:
    """Scenario: the driver shows the counters 80 ms late. A fixed 50 ms wait after the run
    would miss its last 30 ms; reading until two reads 20 ms apart agree gets every byte."""
    clock = FakeClock()
    gpu = FakeGpu(clock=clock, report_delay_s=0.08, rx_bytes=7 << 40, tx_bytes=3 << 40)
    nv = gateway_for(gpu)
    mon = nvml.PcieMonitor(
        nv.handle(index=0), nv=nv, background=False, clock=clock, sleep=clock.sleep
    )
    clock.t += 1.0  # the history before is long settled
    mon.start()
    per_ms = 50_000_000  # 50 GB/s for 200 ms
    for i in range(200):
        clock.t += 0.001
        gpu.transfer(per_ms, 1000)
        if i % 5 == 4:
            mon.sample()
    m = mon.stop()
    assert m.rx_bytes == 200 * per_ms and m.tx_bytes == 200 * 1000
    # This driver stamps a value when it changes: the stamps cannot show a value is fresh, so
    # settling waits for the counters to stay put 100 ms (idle before: right away).
    assert m.settle_start_s is not None and 0.1 <= m.settle_start_s <= 0.121
    assert m.settled is True and m.settle_stop_s is not None
    assert 0.18 <= m.settle_stop_s <= 0.22
    assert m.reason is None
    # The raw reads, with NVML's own timestamps of the values shown.
    first, last = m.first_reading, m.last_reading
    assert first is not None and last is not None
    assert last["rx_bytes"] - first["rx_bytes"] == 200 * per_ms
    assert first["counter_bits"] == 64 and first["t_s"] == 0.0
    assert last["rx_nvml_timestamp_us"] > first["rx_nvml_timestamp_us"]
    assert m.samples >= 40


def caching_driver(period_s: float) -> tuple[FakeClock, FakeGpu, nvml.PcieMonitor]:
    """A driver that refreshes the counters every `period_s` and stamps each refresh, on a fake
    clock set to a wall-clock time (the stamps are that clock's µs), with a monitor on it."""
    clock = FakeClock()
    clock.t = 1_700_000_000.0
    gpu = FakeGpu(clock=clock, refresh_period_s=period_s, rx_bytes=5 << 40)
    nv = gateway_for(gpu)
    mon = nvml.PcieMonitor(
        nv.handle(index=0),
        nv=nv,
        background=False,
        clock=clock,
        sleep=clock.sleep,
        wall_us=lambda: int(round(clock() * 1e6)),
    )
    return clock, gpu, mon


def test_a_cached_counter_is_read_until_its_stamp_postdates_the_run() -> None:
    """Scenario: the driver refreshes the counters every 50 ms and stamps each refresh. Two
    reads 20 ms apart can both show the value from before the run's last bytes; settling goes on
    until a value stamped after the run's end, then stops without waiting for quiet."""
    clock, gpu, mon = caching_driver(0.05)
    clock.t += 0.001  # just past a refresh
    mon.start()
    gpu.transfer(8 << 20)
    clock.t += 0.003
    gpu.transfer(8 << 20)  # the run's last bytes, 4 ms before stop
    clock.t += 0.004
    m = mon.stop()
    assert m.settle_start_s is not None and m.settle_start_s <= 0.06
    assert m.rx_bytes == 16 << 20
    assert m.settled is True and m.settle_stop_s is not None and m.settle_stop_s < 0.1
    last = m.last_reading
    assert last is not None and last["rx_nvml_timestamp_us"] >= int(
        round(1e6 * (clock() - m.settle_stop_s))
    )


@pytest.mark.parametrize("period", [0.05, 0.25])
def test_a_slowly_refreshed_counter_is_not_taken_as_quiet(period: float) -> None:
    """Scenario: a caching driver refreshes every 250 ms, longer than the 100 ms of quiet that
    settles a driver whose stamps cannot tell. The refresh period is learned from the reads
    during the run (RX stamps step by it), so quiet must last two periods: the fresh value
    comes first and every byte is counted."""
    clock, gpu, mon = caching_driver(period)
    clock.t += 0.001
    mon.start()
    n = 0
    # At least 0.5 s at 10 GB/s, read every 5 ms as the thread does, ending 0.1 s past a refresh.
    while n < 500 or not (0.100 < clock.t % 0.25 < 0.104):
        clock.t += 0.001
        gpu.transfer(10_000_000)
        n += 1
        if n % 5 == 0:
            mon.sample()
    m = mon.stop()
    assert mon.refresh_us == pytest.approx(period * 1e6)
    assert m.rx_bytes == n * 10_000_000 and m.settled is True


def test_settling_catches_a_late_warm_up_and_gives_up_after_the_bound() -> None:
    clock = FakeClock()
    gpu = FakeGpu(clock=clock, report_delay_s=0.015, rx_bytes=1 << 40)
    nv = gateway_for(gpu)
    mon = nvml.PcieMonitor(
        nv.handle(index=0), nv=nv, background=False, clock=clock, sleep=clock.sleep
    )
    clock.t += 1.0
    gpu.transfer(16 << 20)  # the warm-up copy, shown 15 ms later
    mon.start()  # waits until it shows: not part of the run
    gpu.transfer(4 << 20)
    clock.t += 0.001
    m = mon.stop()
    assert m.rx_bytes == 4 << 20 and m.settled is True
    # Another process keeps the link busy: settling stops at its bound and says so.
    busy = FakeGpu(rx_per_read=64 << 20, rx_bytes=1 << 40)
    nv = gateway_for(busy)
    mon = nvml.PcieMonitor(
        nv.handle(index=0), nv=nv, background=False, clock=clock, sleep=clock.sleep
    )
    mon.start()
    m = mon.stop()
    assert m.settled is False and m.settle_start_s is not None
    assert m.settle_start_s >= 1.0 and m.settle_stop_s is not None and m.settle_stop_s >= 1.0
    assert "still growing" in (m.reason or "") and m.rx_bytes is not None


def test_per_field_invalid_argument_means_not_supported() -> None:
    """Scenario: a driver older than the PCIe byte-counter fields answers each unknown field id
    with NVML_ERROR_INVALID_ARGUMENT: that is 'not supported', not 'no such device'."""
    gpu = FakeGpu(field_return=ERROR_INVALID_ARGUMENT, throughput_kib_s=(10, 1))
    nv = gateway_for(gpu)
    handle = nv.handle(index=0)
    reading = nvml.read_pcie_counters(nv, handle)
    assert isinstance(reading, nvml.NotAvailable)
    assert reading.kind == nvml.NOT_SUPPORTED and reading.code == ERROR_INVALID_ARGUMENT
    assert "Not Supported" in reading.reason and "no such device" not in reading.reason
    mon = nvml.PcieMonitor(handle, nv=nv)
    assert mon.method == nvml.METHOD_THROUGHPUT  # falls back as for any unsupported counter
    info = nvml.device_info(nv, 0)
    assert isinstance(info, nvml.DeviceInfo)
    assert isinstance(info.pcie_counters, nvml.NotAvailable)
    assert info.pcie_counters.kind == nvml.NOT_SUPPORTED
    # Other per-field codes keep their meaning.
    gpu = FakeGpu(field_return=ERROR_GPU_IS_LOST)
    nv = gateway_for(gpu)
    lost = nvml.read_pcie_counters(nv, nv.handle(index=0))
    assert isinstance(lost, nvml.NotAvailable) and lost.kind == nvml.GPU_LOST


def test_each_counter_window_counts_only_its_own_bytes() -> None:
    """One monitor measures run after run: each window starts from its own opening read, and
    traffic between windows belongs to none."""
    gpu = FakeGpu(rx_bytes=1 << 40)
    nv = gateway_for(gpu)
    clock = FakeClock()
    mon = nvml.PcieMonitor(nv.handle(index=0), nv=nv, background=False, clock=clock, settle_max_s=0)
    mon.start()
    gpu.transfer(1000, 10)
    clock.t += 0.01
    first = mon.stop()
    gpu.transfer(500_000, 5)  # between the windows
    clock.t += 1.0
    mon.start()
    gpu.transfer(300, 3)
    clock.t += 0.01
    second = mon.stop()
    assert (first.rx_bytes, first.tx_bytes, first.samples) == (1000, 10, 2)
    assert (second.rx_bytes, second.tx_bytes, second.samples) == (300, 3, 2)
    assert second.first_reading is not None and second.first_reading["t_s"] == 0.0
    assert second.first_reading["rx_bytes"] == (1 << 40) + 1000 + 500_000


def test_each_throughput_window_integrates_only_its_own_time() -> None:
    gpu = FakeGpu(counters_supported=False, throughput_kib_s=(1000, 10))
    nv = gateway_for(gpu)
    clock = FakeClock()
    mon = nvml.PcieMonitor(
        nv.handle(index=0), nv=nv, background=False, clock=clock, settle_max_s=0, tx_every=1
    )
    mon.start()
    clock.t += 0.1
    first = mon.stop()
    clock.t += 5.0  # idle between the windows
    mon.start()
    clock.t += 0.2
    second = mon.stop()
    # 1000 KiB/s for 0.1 s and then 0.2 s (1 KiB = 1024 bytes); TX at 10 KiB/s.
    assert (first.rx_bytes, first.tx_bytes) == (102_400, 1024)
    assert (second.rx_bytes, second.tx_bytes) == (204_800, 2048)
    assert first.samples == second.samples == 2  # the opening read and the tail read
    assert second.window_s == pytest.approx(0.2)


def test_throughput_read_failing_mid_window_measures_nothing() -> None:
    gpu = FakeGpu(counters_supported=False, throughput_kib_s=(1000, 10))
    nv = gateway_for(gpu)
    clock = FakeClock()
    mon = nvml.PcieMonitor(nv.handle(index=0), nv=nv, background=False, clock=clock)
    assert mon.method == nvml.METHOD_THROUGHPUT
    mon.start()
    clock.t += 0.02
    mon.sample()
    gpu.lost_after_reads = gpu.reads  # every NVML call from now on: GPU is lost
    clock.t += 0.02
    mon.sample()
    m = mon.stop()
    assert m.method == nvml.METHOD_THROUGHPUT
    assert m.rx_bytes is None and m.tx_bytes is None
    assert (
        m.reason
        == "measurement failed: nvmlDeviceGetPcieThroughput: GPU is lost (fell off the bus)"
    )
    assert m.samples == 2  # the opening read and the one sample before the loss


def test_measurement_dict_carries_the_raw_reads() -> None:
    gpu = FakeGpu(rx_bytes=123, tx_bytes=45, rx_per_read=1000)
    nv = gateway_for(gpu)
    clock = FakeClock()
    mon = nvml.PcieMonitor(nv.handle(index=0), nv=nv, background=False, clock=clock, settle_max_s=0)
    mon.start()
    clock.t += 0.01
    doc = mon.stop().to_dict()
    json.dumps(doc)
    assert doc["first_reading"]["rx_bytes"] == 123 + 1000  # the probe read came first
    assert doc["last_reading"]["rx_bytes"] == 123 + 2000
    assert doc["last_reading"]["t_s"] == pytest.approx(0.01)
    assert doc["samples"] == 2 and doc["rx_bytes"] == 1000
    assert doc["first_reading"]["rx_nvml_timestamp_us"] is None  # this fake gives none


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
    assert doc["devices"][0]["pcie_counters"] == {
        "supported": True,
        "counter_bits": 64,
        "value_type": VALUE_ULL,
        "rx_bytes": 0,
        "tx_bytes": 0,
    }
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


@pytest.mark.gpu
def test_nvml_handle_is_the_gpu_torch_uses() -> None:
    """On a real GPU: the handle found by torch's PCI bus id is the device torch copies to
    (same UUID), and its byte counters, where supported, see a 256 MiB host->device copy."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("pynvml")
    from moeprof.replay.cudart import cuda_pci_bus_id

    props = torch.cuda.get_device_properties(0)
    nv = nvml.gateway()
    handle = nv.handle(pci_bus_id=cuda_pci_bus_id(props), index=0)
    assert not isinstance(handle, nvml.NotAvailable), handle
    uuid = nv.call("nvmlDeviceGetUUID", handle)
    assert not isinstance(uuid, nvml.NotAvailable), uuid
    uuid_text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    torch_uuid = str(getattr(props, "uuid", "") or "")
    if torch_uuid:  # compare the hex digits: the two print UUIDs differently

        def digits(text: str) -> str:
            return "".join(c for c in text.lower().removeprefix("gpu-") if c in "0123456789abcdef")

        assert digits(uuid_text) == digits(torch_uuid)
    mon = nvml.PcieMonitor(handle, nv=nv)
    if mon.method != nvml.METHOD_COUNTERS:
        pytest.skip(f"PCIe byte counters not available: {mon.reason}")
    src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    torch.cuda.synchronize()
    mon.start()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    m = mon.stop()
    assert m.rx_bytes is not None and m.rx_bytes >= 0.9 * (256 << 20), m
