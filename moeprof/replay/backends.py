"""Where the copies run: the one module that drives the GPU copy engine (and its CPU stand-in).

Both backends hold, per replayed layer, a host *pool* with one block per expert, and a device
*slot* tensor; the engine issues the same calls on either:

- ``copy(layer, expert, slot)``: host block -> slot (``non_blocking`` from pinned memory on a
  dedicated copy stream on CUDA; a host ``copy_`` on the CPU);
- ``compute(layer, slot, tokens)``: the expert's SwiGLU FFN on ``tokens`` tokens, read from the
  slot (on a compute stream on CUDA, so it overlaps the next copies);
- the slot protocol, which keeps the two CUDA streams from racing: a copy into a slot first waits
  until the compute that last read the slot is done (``wait_slot_free``), and marks the slot
  ready when the copy lands (``mark_slot_ready``); a compute waits for ``slot ready`` and then
  marks the slot free. On the CPU everything is synchronous and these are no-ops.

Timing: CUDA events on the streams (the GPU's own clock); ``time.perf_counter`` on the CPU.
Per-batch latency (with compute) is critical-path time: from the previous batch's end (the run's
start for the first batch) to this batch's end, so the latencies add up to at most the run.
"""

from __future__ import annotations

import math
import mmap
import os
import time
from dataclasses import dataclass
from typing import Any

from moeprof.errors import MoeprofError
from moeprof.replay.cudart import (
    cuda_clear_last_error,
    cuda_pci_bus_id,
    host_register,
    host_unregister,
)

GIB = 1 << 30
BLOCK_ALIGN = 512  # bytes: each block starts aligned, so every dtype view of it is aligned too
DEFAULT_HIDDEN = 4096
# Bytes per element of the FFN weights: bf16 on the GPU (what MoE models ship), fp32 on the CPU
# (CPU bf16 matmuls are slow enough to distort a CPU run).
CUDA_FFN_DTYPE_BYTES = 2
CPU_FFN_DTYPE_BYTES = 4


def aligned(nbytes: int) -> int:
    return (int(nbytes) + BLOCK_ALIGN - 1) // BLOCK_ALIGN * BLOCK_ALIGN


@dataclass(frozen=True)
class FfnShape:
    """SwiGLU expert read from a block: gate [I, H], up [I, H], down [H, I], packed in that order."""

    hidden: int
    intermediate: int
    dtype_bytes: int

    @property
    def weight_bytes(self) -> int:
        return 3 * self.hidden * self.intermediate * self.dtype_bytes

    def to_dict(self) -> dict[str, int]:
        return {
            "hidden": self.hidden,
            "intermediate": self.intermediate,
            "dtype_bytes": self.dtype_bytes,
        }


def ffn_shape(block_bytes: int, hidden: int, dtype_bytes: int) -> FfnShape:
    """The largest SwiGLU of hidden size `hidden` that fits a block (smaller hidden if needed)."""
    elements = block_bytes // dtype_bytes
    h = max(1, min(hidden, elements // 3))
    i = max(1, elements // (3 * h))
    if 3 * h * i > elements:
        raise MoeprofError(f"an expert block of {block_bytes} bytes is too small to compute with")
    return FfnShape(h, i, dtype_bytes)


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if hasattr(os, "sysconf"):
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            return None
    return None


@dataclass(frozen=True)
class Calibration:
    """Peak copy rate of one large block: the yardstick every strategy's GB/s is compared with."""

    peak_gbps: float  # 1e9 bytes/s
    nbytes: int
    repeats: int
    best_seconds: float
    method: str  # what was copied, from where to where

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_h2d_gbps": self.peak_gbps,
            "bytes": self.nbytes,
            "repeats": self.repeats,
            "best_seconds": self.best_seconds,
            "method": self.method,
        }


class Backend:
    """The CPU backend; the CUDA backend overrides the device-specific parts."""

    name = "cpu"
    ran_on_cpu = True
    host_memory = "pageable host memory (CPU backend)"
    ffn_dtype_bytes = CPU_FFN_DTYPE_BYTES

    def __init__(self, *, torch_module: Any = None) -> None:
        if torch_module is None:
            import torch as torch_module
        self.torch = torch_module
        self.device = self.torch.device("cpu")
        self._saved_threads: int | None = None
        self.pools: list[Any] = []  # per layer: uint8 [n_experts, stride]
        self.block_bytes: list[int] = []
        self.slots: Any = None  # uint8 [n_slots, stride]
        self._src: list[list[Any]] = []  # per layer, per expert: view of its block
        self._dst: dict[int, list[Any]] = {}  # block bytes -> per slot view
        self._ffn: list[FfnShape] = []
        self._x: Any = None
        self._t0 = 0.0
        self._tb = 0.0
        self.batch_latency_s: list[float] = []

    # ------------------------------------------------------------------ description
    def describe(self) -> dict[str, Any]:
        import platform

        return {"device": "cpu", "device_name": platform.processor() or platform.machine()}

    def device_free_bytes(self) -> int | None:
        return None  # slots live in host memory; the host check covers them

    # ------------------------------------------------------------------ memory
    def _single_thread(self) -> None:
        """One torch thread while the CPU backend works (restored by release()): one thread is
        one copy engine, and torch's multi-threaded copy of small blocks spends milliseconds in
        thread hand-offs on a busy machine."""
        if self.ran_on_cpu and self._saved_threads is None:
            self._saved_threads = self.torch.get_num_threads()
            self.torch.set_num_threads(1)

    def _host_tensor(self, nbytes: int) -> Any:
        self._single_thread()
        return self.torch.empty(nbytes, dtype=self.torch.uint8)

    def allocate_pools(self, n_experts: list[int], block_bytes: list[int]) -> None:
        """One host block per expert per layer, filled so every page is really there (and so a
        computed FFN reads finite numbers: 0x3C bytes are ~0.0115 in bf16, ~0.0115 in fp32)."""
        self.block_bytes = list(block_bytes)
        self.pools = []
        for e, nb in zip(n_experts, block_bytes):
            stride = aligned(nb)
            pool = self._host_tensor(e * stride).view(e, stride)
            pool.fill_(0x3C)
            self.pools.append(pool)
        self._src = [
            [pool[e, :nb] for e in range(pool.shape[0])]
            for pool, nb in zip(self.pools, self.block_bytes)
        ]

    def allocate_slots(self, n_slots: int) -> None:
        stride = aligned(max(self.block_bytes))
        self.slots = self.torch.empty((n_slots, stride), dtype=self.torch.uint8, device=self.device)
        self._dst = {
            nb: [self.slots[s, :nb] for s in range(n_slots)] for nb in set(self.block_bytes)
        }
        self._make_events(n_slots)

    def _make_events(self, n_slots: int) -> None:
        pass

    def release_slots(self) -> None:
        self.slots = None
        self._dst = {}
        self._x = None

    def release(self) -> None:
        self.release_slots()
        self.pools = []
        self._src = []
        if self._saved_threads is not None:
            self.torch.set_num_threads(self._saved_threads)
            self._saved_threads = None

    # ------------------------------------------------------------------ compute setup
    def prepare_compute(self, hidden: int, max_tokens: int) -> list[FfnShape]:
        self._ffn = [ffn_shape(nb, hidden, self.ffn_dtype_bytes) for nb in self.block_bytes]
        h = max(f.hidden for f in self._ffn)
        self._x = self.torch.full(
            (max(max_tokens, 1), h), 0.01, dtype=self._dtype(), device=self.device
        )
        return self._ffn

    def _dtype(self) -> Any:
        return self.torch.float32

    def _ffn_forward(self, layer: int, slot: int, tokens: int) -> None:
        f = self._ffn[layer]
        n = f.hidden * f.intermediate
        w = self.slots[slot, : f.weight_bytes].view(self._dtype())
        gate = w[:n].view(f.intermediate, f.hidden)
        up = w[n : 2 * n].view(f.intermediate, f.hidden)
        down = w[2 * n : 3 * n].view(f.hidden, f.intermediate)
        x = self._x[:tokens, : f.hidden]
        torch = self.torch
        h = torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())
        h @ down.t()

    # ------------------------------------------------------------------ the protocol
    def copy(self, layer: int, expert: int, slot: int) -> None:
        nb = self.block_bytes[layer]
        self._dst[nb][slot].copy_(self._src[layer][expert])

    def compute(self, layer: int, slot: int, tokens: int) -> None:
        self._ffn_forward(layer, slot, tokens)

    def wait_slot_free(self, slot: int) -> None:
        pass

    def mark_slot_ready(self, slot: int) -> None:
        pass

    def wait_slot_ready(self, slot: int) -> None:
        pass

    def mark_slot_free(self, slot: int) -> None:
        pass

    def batch_begin(self) -> None:
        """A batch starts where the previous one ended (see :meth:`batch_end`): nothing to do."""

    def batch_end(self) -> None:
        """Latency of the batch just issued: from the previous batch's end (the run's start)."""
        now = time.perf_counter()
        self.batch_latency_s.append(now - self._tb)
        self._tb = now

    # ------------------------------------------------------------------ timing
    def start_run(self) -> None:
        self.batch_latency_s = []
        self._t0 = time.perf_counter()
        self._tb = self._t0

    def finish_run(self) -> float:
        """Wait for the run to finish; seconds from its first copy to its last operation."""
        return time.perf_counter() - self._t0

    def synchronize(self) -> None:
        pass

    def abort_run(self) -> None:
        """Ctrl-C mid-run: leave the device idle and consistent (nothing to do on the CPU)."""

    def warm_up(self) -> None:
        """One untimed copy and (when computing) one FFN, so the timed run pays no first-use cost."""
        if self.pools and self.slots is not None:
            self.copy(0, 0, 0)
            if self._x is not None:
                self.compute(0, 0, 1)
        self.synchronize()

    # ------------------------------------------------------------------ calibration
    def calibrate(self, nbytes: int = 256 << 20, repeats: int = 5) -> Calibration:
        src = self._host_tensor(nbytes)
        src.fill_(1)
        dst = self._host_tensor(nbytes)
        dst.copy_(src)  # first touch of dst's pages, untimed
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
        return Calibration(nbytes / best / 1e9, nbytes, repeats, best, "host memcpy (CPU backend)")


class CudaBackend(Backend):
    """Pinned host pools, device slots, a copy stream and a compute stream, CUDA-event timing."""

    name = "cuda"
    ran_on_cpu = False
    ffn_dtype_bytes = CUDA_FFN_DTYPE_BYTES

    def __init__(self, index: int = 0, *, torch_module: Any = None) -> None:
        super().__init__(torch_module=torch_module)
        torch = self.torch
        if not torch.cuda.is_available():
            raise MoeprofError(_no_cuda_reason(torch))
        if index >= torch.cuda.device_count():
            raise MoeprofError(
                f"CUDA device {index} does not exist ({torch.cuda.device_count()} visible)"
            )
        self.index = index
        self.device = torch.device("cuda", index)
        torch.cuda.set_device(self.device)
        self.copy_stream = torch.cuda.Stream(device=self.device)
        self.compute_stream = torch.cuda.Stream(device=self.device)
        self._registered: list[Any] = []  # host tensors pinned with cudaHostRegister
        self.host_memory = "pinned host memory"
        self._ready: list[Any] = []
        self._free: list[Any] = []
        self._batch_ends: list[Any] = []  # per batch: event on the compute stream at its end
        self._prev_stream: Any = None

    def describe(self) -> dict[str, Any]:
        torch = self.torch
        props = torch.cuda.get_device_properties(self.device)
        return {
            "device": f"cuda:{self.index}",
            "device_name": props.name,
            "device_memory_bytes": int(props.total_memory),
            "pci_bus_id": cuda_pci_bus_id(props),
            "torch_cuda": torch.version.cuda,
        }

    def device_free_bytes(self) -> int | None:
        free, _total = self.torch.cuda.mem_get_info(self.device)
        return int(free)

    def _host_tensor(self, nbytes: int) -> Any:
        """Page-locked host memory of exactly `nbytes`: a plain tensor registered with
        cudaHostRegister (torch's pinned allocator rounds sizes up to a power of two).

        The memory is an anonymous mapping, whole pages of its own: heap blocks may share a page,
        which would make a second registration fail (cudaError 712, already registered), and
        the tensor's storage starts where the registration does (torch's is_pinned() looks at
        the storage's start, not a view's)."""
        torch = self.torch
        page = mmap.PAGESIZE
        span = max(page, -(-nbytes // page) * page)
        t = torch.frombuffer(mmap.mmap(-1, span), dtype=torch.uint8)[:nbytes]  # keeps the map
        rc = host_register(torch, t.data_ptr(), span)  # None: no binding, the runtime not asked
        if rc == 0:
            self._registered.append(t)
            if t.is_pinned():
                self.host_memory = "pinned host memory (cudaHostRegister)"
                return t
            self._unregister(t)
        why = "" if rc is None else "; registered memory not reported pinned"
        if rc:
            clear_register_error(rc)
            why = f"; cudaHostRegister failed: cudaError {rc}"
        # Fallback: torch's pinned allocator (may round the allocation up).
        self.host_memory = f"pinned host memory (torch pinned allocator{why})"
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def _make_events(self, n_slots: int) -> None:
        Event = self.torch.cuda.Event
        self._ready = [Event() for _ in range(n_slots)]
        self._free = [Event() for _ in range(n_slots)]

    def release_slots(self) -> None:
        self.synchronize()
        super().release_slots()
        self._ready, self._free = [], []
        self._batch_ends = []

    def release(self) -> None:
        # After an error mid-run (an OOM in compute, say) the copy stream is still current.
        self._restore_stream()
        self.synchronize()
        super().release()
        for t in list(self._registered):
            self._unregister(t)
        self.torch.cuda.empty_cache()

    def _unregister(self, tensor: Any) -> None:
        kept = [t for t in self._registered if t is not tensor]
        if len(kept) == len(self._registered):
            return  # not registered by us (torch's pinned allocator owns it)
        self._registered = kept
        rc = host_unregister(self.torch, tensor.data_ptr())
        if rc:
            # Like a failed registration, a failed unregistration leaves the runtime's last
            # error set, and the next kernel launch would report it as its own.
            clear_register_error(rc, "cudaHostUnregister")

    def _dtype(self) -> Any:
        return self.torch.bfloat16

    def prepare_compute(self, hidden: int, max_tokens: int) -> list[FfnShape]:
        shapes = super().prepare_compute(hidden, max_tokens)
        self.synchronize()  # the input is written on the default stream; the run reads it elsewhere
        return shapes

    # ------------------------------------------------------------------ the protocol
    def copy(self, layer: int, expert: int, slot: int) -> None:
        # The copy stream is current for the whole run (start_run).
        nb = self.block_bytes[layer]
        self._dst[nb][slot].copy_(self._src[layer][expert], non_blocking=True)

    def compute(self, layer: int, slot: int, tokens: int) -> None:
        with self.torch.cuda.stream(self.compute_stream):
            self._ffn_forward(layer, slot, tokens)

    def wait_slot_free(self, slot: int) -> None:
        self.copy_stream.wait_event(self._free[slot])

    def mark_slot_ready(self, slot: int) -> None:
        self._ready[slot].record(self.copy_stream)

    def wait_slot_ready(self, slot: int) -> None:
        self.compute_stream.wait_event(self._ready[slot])

    def mark_slot_free(self, slot: int) -> None:
        self._free[slot].record(self.compute_stream)

    def batch_begin(self) -> None:
        """Nothing to record: the copy stream runs ahead of compute, so an event there would
        start this batch during the previous batch's compute. A batch starts where the
        previous one ended (or the run started)."""

    def batch_end(self) -> None:
        end = self.torch.cuda.Event(enable_timing=True)
        end.record(self.compute_stream)
        self._batch_ends.append(end)

    # ------------------------------------------------------------------ timing
    def start_run(self) -> None:
        torch = self.torch
        self.synchronize()
        self.batch_latency_s = []
        self._batch_ends = []
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)
        self._prev_stream = torch.cuda.current_stream(self.device)
        torch.cuda.set_stream(self.copy_stream)
        self._start.record(self.copy_stream)

    def finish_run(self) -> float:
        # The run ends when both streams are done: join them, then stamp the end.
        self.compute_stream.wait_stream(self.copy_stream)
        self._end.record(self.compute_stream)
        self._restore_stream()
        self._end.synchronize()
        # Critical path per batch: from the previous batch's end (the run's start) to its end.
        # The ends are on one stream, in order; the max() only guards the first against clock
        # skew between the streams.
        starts = [self._start, *self._batch_ends[:-1]]
        self.batch_latency_s = [
            max(0.0, float(s.elapsed_time(e)) / 1e3) for s, e in zip(starts, self._batch_ends)
        ]
        return float(self._start.elapsed_time(self._end)) / 1e3

    def _restore_stream(self) -> None:
        if self._prev_stream is not None:
            self.torch.cuda.set_stream(self._prev_stream)
            self._prev_stream = None

    def abort_run(self) -> None:
        """Ctrl-C mid-run: restore the previous stream and let queued work drain."""
        self._restore_stream()
        self.synchronize()

    def synchronize(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def warm_up(self) -> None:
        if self.pools and self.slots is not None:
            with self.torch.cuda.stream(self.copy_stream):
                self.copy(0, 0, 0)
            if self._x is not None:
                self.compute_stream.wait_stream(self.copy_stream)
                self.compute(0, 0, 1)
        self.synchronize()

    # ------------------------------------------------------------------ calibration
    def calibrate(self, nbytes: int = GIB, repeats: int = 5) -> Calibration:
        """Best of `repeats` copies of one pinned block of `nbytes` to the device, after a
        warm-up copy, timed with CUDA events on the copy stream."""
        torch = self.torch
        src = self._host_tensor(nbytes)
        src.fill_(1)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.synchronize()
        best = math.inf
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)  # warm-up
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(self.copy_stream)
                dst.copy_(src, non_blocking=True)
                end.record(self.copy_stream)
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3)
        self.synchronize()
        del dst
        self._unregister(src)
        torch.cuda.empty_cache()
        return Calibration(
            nbytes / best / 1e9, nbytes, repeats, best, "one pinned host->device copy"
        )


def clear_register_error(rc: int, call: str = "cudaHostRegister") -> None:
    """After a failed cudaHostRegister/Unregister (cudaError `rc`): clear the runtime's last
    error (see :mod:`moeprof.replay.cudart`), or refuse to go on, since the next kernel launch
    would report `rc` as its own."""
    if cuda_clear_last_error() is None:
        what = "pinning" if call == "cudaHostRegister" else "unpinning"
        raise MoeprofError(
            f"{what} host memory failed: {call} returned cudaError {rc}, and the CUDA "
            "runtime's last error could not be cleared (libcudart not found in this process), so "
            "a later kernel would fail with it"
        )


def _no_cuda_reason(torch: Any) -> str:
    if getattr(torch.version, "cuda", None) is None:
        return (
            f"device cuda: this torch ({torch.__version__}) is a CPU-only build; install a CUDA "
            "build of torch, or use the CPU backend (device cpu)"
        )
    return (
        "device cuda: no CUDA device is visible (torch.cuda.is_available() is False: no GPU, "
        "no driver, or CUDA_VISIBLE_DEVICES hides it); use the CPU backend (device cpu)"
    )


def make_backend(device: str) -> Backend:
    if device == "cpu":
        return Backend()
    if device == "cuda" or device.startswith("cuda:"):
        index = 0
        if ":" in device:
            try:
                index = int(device.split(":", 1)[1])
            except ValueError:
                raise MoeprofError(f"bad device {device!r}; use cpu, cuda or cuda:N") from None
        return CudaBackend(index)
    raise MoeprofError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
