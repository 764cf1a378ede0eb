"""Replay backends: FFN shapes, the CPU backend's latencies, and the real CudaBackend driven
through a fake ``torch.cuda`` on the CPU (streams, events, pinned host memory, CUDA runtime
errors), end to end through replay() with a fake NVML."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import strategy_entry
from nvml_fakes import FakeGpu, gateway_for

import moeprof
from moeprof.analyze import analyze
from moeprof.errors import MoeprofError
from moeprof.replay import replay
from moeprof.replay.backends import Backend, ffn_shape


def test_ffn_shape() -> None:
    s = ffn_shape(3 * 64 * 10 * 2, 64, 2)
    assert (s.hidden, s.intermediate, s.weight_bytes) == (64, 10, 3 * 64 * 10 * 2)
    small = ffn_shape(600, 4096, 4)  # 150 floats: hidden shrinks to fit
    assert small.weight_bytes <= 600 and small.intermediate >= 1
    with pytest.raises(MoeprofError, match="an expert block of 4 bytes is too small"):
        ffn_shape(4, 64, 4)


# ---------------------------------------------------------------------- CUDA backend, fake torch
#
# The real CudaBackend, driven through a fake ``torch.cuda`` on the CPU: streams carry a
# simulated clock (seconds), events stamp it when recorded, waits move a stream's clock forward.
# Tensors are real CPU tensors (the fake drops ``device=`` and ``pin_memory=``).


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.now = 0.0

    def wait_event(self, event: FakeEvent) -> None:
        if event.t is not None:  # waiting on a never-recorded event is a no-op, as in CUDA
            self.now = max(self.now, event.t)

    def wait_stream(self, other: FakeStream) -> None:
        self.now = max(self.now, other.now)


class FakeEvent:
    def __init__(self, enable_timing: bool = False) -> None:
        self.t: float | None = None

    def record(self, stream: FakeStream) -> None:
        self.t = stream.now

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.t is not None and end.t is not None
        return (end.t - self.t) * 1e3  # ms, like torch

    def synchronize(self) -> None:
        pass


class FakeCuda:
    Event = FakeEvent

    def __init__(self, register_rc: int = 0, unregister_rc: int = 0) -> None:
        self.default_stream = FakeStream("default")
        self.current = self.default_stream
        self.register_rc = register_rc
        self.unregister_rc = unregister_rc
        self.registered: list[int] = []
        self.registered_ptrs: list[int] = []
        self.unregistered_ptrs: list[int] = []

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def set_device(self, device: Any) -> None:
        pass

    def Stream(self, device: Any = None) -> FakeStream:  # noqa: N802 (torch's name)
        return FakeStream("side")

    def current_stream(self, device: Any = None) -> FakeStream:
        return self.current

    def set_stream(self, stream: FakeStream) -> None:
        self.current = stream

    def stream(self, stream: FakeStream) -> Any:
        from contextlib import contextmanager

        @contextmanager
        def use() -> Any:
            prev, self.current = self.current, stream
            try:
                yield
            finally:
                self.current = prev

        return use()

    def synchronize(self, device: Any = None) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        return 100 << 30, 141 << 30

    def get_device_properties(self, device: Any) -> Any:
        import types

        return types.SimpleNamespace(
            name="Fake H200",
            total_memory=141 << 30,
            pci_domain_id=0,
            pci_bus_id=0x3B,
            pci_device_id=0,
            major=9,
            minor=0,
        )

    def cudart(self) -> Any:
        import types

        def register(ptr: int, size: int, flags: int) -> int:
            self.registered.append(size)
            self.registered_ptrs.append(ptr)
            return self.register_rc

        def unregister(ptr: int) -> int:
            self.unregistered_ptrs.append(ptr)
            return self.unregister_rc

        return types.SimpleNamespace(cudaHostRegister=register, cudaHostUnregister=unregister)


class FakeTorch:
    """Real torch for tensors and dtypes; a FakeCuda for everything CUDA."""

    def __init__(self, cuda: FakeCuda) -> None:
        import types

        import torch

        self._torch = torch
        self.cuda = cuda
        self.version = types.SimpleNamespace(cuda="12.4")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def empty(self, *args: Any, device: Any = None, pin_memory: bool = False, **kw: Any) -> Any:
        return self._torch.empty(*args, **kw)

    def full(self, *args: Any, device: Any = None, **kw: Any) -> Any:
        return self._torch.full(*args, **kw)


def fake_cuda_backend(cuda: FakeCuda | None = None) -> Any:
    pytest.importorskip("torch")
    from moeprof.replay.backends import CudaBackend

    return CudaBackend(0, torch_module=FakeTorch(cuda or FakeCuda()))


def test_cuda_batch_latency_is_critical_path_from_the_previous_batch() -> None:
    """The copy stream runs ahead of compute: batch 1's copies finish before batch 0's FFNs.
    A batch's latency runs from the previous batch's end, so latencies sum to the run."""
    be = fake_cuda_backend()
    copy, comp = be.copy_stream, be.compute_stream
    be.start_run()  # start event on the copy stream at t = 0
    be.batch_begin()
    copy.now = 0.010  # batch 0: copies 0-10 ms, FFNs until 30 ms
    comp.now = 0.030
    be.batch_end()
    be.batch_begin()
    copy.now = 0.020  # batch 1: copies 10-20 ms (ahead of compute), FFNs until 50 ms
    comp.now = 0.050
    be.batch_end()
    seconds = be.finish_run()
    assert seconds == pytest.approx(0.050)
    assert be.batch_latency_s == pytest.approx([0.030, 0.020])
    assert sum(be.batch_latency_s) <= seconds + 1e-12


def test_cuda_release_restores_the_stream_after_an_error() -> None:
    cuda = FakeCuda()
    be = fake_cuda_backend(cuda)
    be.start_run()
    assert cuda.current is be.copy_stream  # copies go to the current stream during a run
    # An ordinary exception mid-run (an OOM in compute, say): neither finish_run nor abort_run.
    be.release()
    assert cuda.current is cuda.default_stream


class TimedFakeCudaBackend:
    """Makes the fake streams take time: 1 ms per copy, 3 ms per FFN."""

    @staticmethod
    def make(cuda: FakeCuda, fail_compute_after: int | None = None) -> Any:
        from moeprof.replay.backends import CudaBackend

        class Timed(CudaBackend):
            runs: list[tuple[list[float], float]] = []
            computes = 0

            def copy(self, layer: int, expert: int, slot: int) -> None:
                super().copy(layer, expert, slot)
                self.copy_stream.now += 0.001

            def compute(self, layer: int, slot: int, tokens: int) -> None:
                self.computes += 1
                if fail_compute_after is not None and self.computes > fail_compute_after:
                    raise RuntimeError("CUDA out of memory (fake)")
                super().compute(layer, slot, tokens)
                self.compute_stream.now += 0.003

            def finish_run(self) -> float:
                seconds = super().finish_run()
                self.runs.append((list(self.batch_latency_s), seconds))
                return seconds

        return Timed(0, torch_module=FakeTorch(cuda))


def test_cuda_path_end_to_end_on_a_fake_device() -> None:
    """replay() through the real CudaBackend (fake torch.cuda) and a fake NVML: copies match
    analyze, the slot protocol orders the simulated streams, the latencies add up to at most
    the run, and the caller's stream is current again afterwards."""
    pytest.importorskip("torch")
    cuda = FakeCuda()
    be = TimedFakeCudaBackend.make(cuda)
    trace = moeprof.synthesize(
        n_experts=8, top_k=2, n_layers=2, n_requests=4, tokens_per_request=16, zipf=1.0, seed=4
    )
    nv = gateway_for(FakeGpu(rx_bytes=1 << 40))
    doc = replay(
        trace,
        batch_sizes=[8],
        expert_bytes=3 * 16 * 8 * 2,
        compute=True,
        hidden_size=16,
        calibrate=False,
        backend=be,
        nv=nv,
    ).to_dict()
    info = doc["replay"]
    assert info["backend"] == "cuda" and info["ran_on_cpu"] is False
    assert info["measurement_method"] == "nvml_counters"
    assert info["device_name"] == "Fake H200" and info["pci_bus_id"] == "0000:3b:00.0"
    row = doc["results"][0]
    arow = analyze(trace, [8]).to_dict()["results"][0]
    assert strategy_entry(row, "naive")["copies"] == arow["requests"]
    assert strategy_entry(row, "dedup")["copies"] == arow["unique"]
    for s in row["replay"]["strategies"]:
        assert s["nvml_rx_bytes"] == 0 and s["nvml_raw"]["samples"] >= 1
        assert s["nvml_raw"]["first"]["rx_bytes"] == 1 << 40
        assert s["batch_latency"]["batches"] == row["n_batches"]
    assert len(be.runs) == 3
    for latencies, seconds in be.runs:
        assert seconds > 0 and len(latencies) == row["n_batches"]
        assert sum(latencies) <= seconds + 1e-9
        assert sum(latencies) == pytest.approx(seconds)  # the last FFN ends the run here
    assert cuda.current is cuda.default_stream


@pytest.mark.parametrize("counting", [True, False])
def test_calibration_checks_that_the_byte_counters_count(counting: bool) -> None:
    """The calibration moves a known number of bytes; NVML byte counters that do not see them
    (a driver that answers but does not count) are dropped for the throughput sampling."""
    pytest.importorskip("torch")
    from moeprof.replay.backends import Calibration, CudaBackend

    gpu = FakeGpu(rx_bytes=1 << 40, throughput_kib_s=(1000, 10))
    nbytes = 64 << 20

    class Calibrated(CudaBackend):
        def calibrate(self, nbytes: int = 0, repeats: int = 5) -> Calibration:
            if counting:
                gpu.transfer((repeats + 1) * nbytes + 4096)  # warm-up + repeats, and overhead
            return Calibration(50.0, nbytes, repeats, nbytes / 50e9, "fake")

    be = Calibrated(0, torch_module=FakeTorch(FakeCuda()))
    trace = moeprof.synthesize(n_experts=8, top_k=2, n_layers=1, n_requests=2, seed=4)
    doc = replay(
        trace,
        batch_sizes=[8],
        strategies=["dedup"],
        expert_bytes=4096,
        calibration_bytes=nbytes,
        backend=be,
        nv=gateway_for(gpu),
    ).to_dict()
    info = doc["replay"]
    check = info["counter_check"]
    assert check["bytes_copied"] == 6 * nbytes
    if counting:
        assert check["nvml_rx_bytes"] == 6 * nbytes + 4096
        assert check["rx_to_copied"] == pytest.approx(1.0, abs=1e-4)
        assert info["measurement_method"] == "nvml_counters"
    else:
        assert check["nvml_rx_bytes"] == 0 and check["rx_to_copied"] == 0
        assert info["measurement_method"] == "nvml_throughput"
        assert any("saw 0 RX bytes" in note for note in info["measurement_notes"])


def test_a_failing_calibration_leaves_no_polling_thread() -> None:
    import threading

    pytest.importorskip("torch")
    from moeprof.replay.backends import Calibration, CudaBackend

    class Failing(CudaBackend):
        def calibrate(self, nbytes: int = 0, repeats: int = 5) -> Calibration:
            self.failed = True  # sticky, as CUDA errors are: every later sync raises it again
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        def synchronize(self) -> None:
            if getattr(self, "failed", False):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

    be = Failing(0, torch_module=FakeTorch(FakeCuda()))
    trace = moeprof.synthesize(n_experts=8, top_k=2, n_layers=1, n_requests=2, seed=4)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        replay(
            trace,
            batch_sizes=[8],
            expert_bytes=4096,
            calibration_bytes=1 << 20,
            backend=be,
            nv=gateway_for(FakeGpu(rx_bytes=1 << 40)),
        )
    assert not [t for t in threading.enumerate() if t.name == "moeprof-pcie"]


def test_cuda_stream_is_restored_when_compute_fails_mid_run() -> None:
    pytest.importorskip("torch")
    cuda = FakeCuda()
    be = TimedFakeCudaBackend.make(cuda, fail_compute_after=5)
    trace = moeprof.synthesize(n_layers=2, n_requests=2, tokens_per_request=8, seed=0)
    with pytest.raises(RuntimeError, match="out of memory"):
        replay(
            trace,
            batch_sizes=[4],
            expert_bytes=3 * 16 * 8 * 2,
            compute=True,
            hidden_size=16,
            calibrate=False,
            backend=be,
            nv=gateway_for(None),
        )
    assert cuda.current is cuda.default_stream


def test_failed_host_register_clears_the_cuda_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from moeprof.replay import backends

    cleared: list[int] = []

    def clear() -> int:
        cleared.append(1)
        return 1  # what the runtime held: cudaErrorInvalidValue

    monkeypatch.setattr(backends, "cuda_clear_last_error", clear)
    be = fake_cuda_backend(FakeCuda(register_rc=1))
    t = be._host_tensor(4096)
    assert t.numel() == 4096 and cleared == [1]
    assert "torch pinned allocator" in be.host_memory and "cudaError 1" in be.host_memory
    # Registration that works needs no clearing.
    cleared.clear()
    be = fake_cuda_backend(FakeCuda(register_rc=0))
    be._host_tensor(4096)
    assert cleared == []


def test_host_register_covers_whole_pages_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small tensors share heap pages; each registration must cover only pages of its own."""
    import os

    from moeprof.replay import backends

    page = os.sysconf("SC_PAGE_SIZE")
    cuda = FakeCuda(register_rc=0)
    be = fake_cuda_backend(cuda)
    import torch

    def is_pinned(self: Any) -> bool:  # as ATen answers it: from the storage's start
        start = self.untyped_storage().data_ptr()
        return any(p <= start < p + n for p, n in zip(cuda.registered_ptrs, cuda.registered))

    monkeypatch.setattr(torch.Tensor, "is_pinned", is_pinned)
    tensors = [be._host_tensor(n) for n in (100, 4096, 5000, 3 * page)]
    assert be.host_memory == "pinned host memory (cudaHostRegister)"  # no fallback taken
    for t, n, ptr, size in zip(
        tensors, (100, 4096, 5000, 3 * page), cuda.registered_ptrs, cuda.registered
    ):
        assert t.numel() == n and t.data_ptr() == ptr
        assert ptr % page == 0 and size % page == 0 and size >= n
    spans = sorted((p, p + sz) for p, sz in zip(cuda.registered_ptrs, cuda.registered))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no page registered twice
    # A failed unregistration clears the runtime's error as a failed registration does.
    cleared: list[int] = []
    monkeypatch.setattr(backends, "cuda_clear_last_error", lambda: cleared.append(1) or 1)
    cuda.unregister_rc = 1
    be._registered = list(tensors)
    be._unregister(tensors[0])
    assert cuda.unregistered_ptrs == [tensors[0].data_ptr()] and cleared == [1]


def test_failed_host_register_that_cannot_be_cleared_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moeprof.replay import backends

    monkeypatch.setattr(backends, "cuda_clear_last_error", lambda: None)
    be = fake_cuda_backend(FakeCuda(register_rc=712))
    with pytest.raises(MoeprofError, match="cudaHostRegister returned cudaError 712"):
        be._host_tensor(4096)


def test_cpu_batch_latencies_tile_the_run() -> None:
    class Recording(Backend):
        runs: list[tuple[list[float], float]] = []

        def finish_run(self) -> float:
            seconds = super().finish_run()
            self.runs.append((list(self.batch_latency_s), seconds))
            return seconds

    trace = moeprof.synthesize(n_layers=2, n_requests=4, tokens_per_request=16, seed=1)
    be = Recording()
    replay(
        trace,
        batch_sizes=[4],
        expert_bytes=3 * 16 * 8 * 4,
        compute=True,
        hidden_size=16,
        calibrate=False,
        backend=be,
    )
    assert len(be.runs) == 3
    for latencies, seconds in be.runs:
        assert len(latencies) == 16 and all(x >= 0 for x in latencies)
        assert sum(latencies) <= seconds + 1e-9
