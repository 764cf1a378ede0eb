"""`replay()`: re-execute a trace's expert loads per strategy and measure them.

Steps: validate everything and size the memory (refusing up front what cannot fit), count the
replayed batches with analyze's own code, calibrate the link, then for each batch size and
strategy build the schedule, allocate slots, and issue every copy (and FFN, with ``compute``)
through a backend while NVML watches the link (docs/replay.md).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moeprof import nvml
from moeprof.analyze import (
    AnalysisResult,
    BatchSizeResult,
    expert_masks,
    plan_uniform,
    slots_per_token,
    summarize,
    trace_summary,
    unique_per_batch,
)
from moeprof.batching import BatchPlan, BatchPolicy, check_batch_sizes, get_policy
from moeprof.errors import MoeprofError, is_whole_number
from moeprof.replay.backends import (
    DEFAULT_HIDDEN,
    GIB,
    Backend,
    Calibration,
    CudaBackend,
    aligned,
    host_available_bytes,
    make_backend,
)
from moeprof.replay.results import LatencyStats, ReplayResult, StrategyRun
from moeprof.strategies import (
    DEFAULT_STRATEGIES,
    CountedLoads,
    Schedule,
    Strategy,
    check_cache_experts,
    check_strategies,
    get_strategy,
)
from moeprof.trace import Trace

ProgressFn = Callable[[str, int, int], None]  # (what is running, batches done, batches in it)

HOST_HEADROOM = 0.9  # use at most this share of available host memory
# Pinned pages cannot be swapped or reclaimed: pinning most of the RAM invites the OOM killer.
PINNED_HEADROOM = 0.5
# Host-bound run: issuing took >= this share of the device time AND the GPU was done at most
# HOST_BOUND_TAIL_S after the host had issued everything. (A GPU-bound run that fills CUDA's
# launch queue also blocks the host while issuing, but then a queue's worth of work remains.)
HOST_BOUND_SHARE = 0.9
HOST_BOUND_TAIL_S = 1e-3
DEVICE_HEADROOM = 0.9
DEVICE_RESERVE_BYTES = 512 << 20  # CUDA context, FFN activations, allocator slack
CPU_NOTE = (
    "ran on the CPU: host-to-host copies stand in for PCIe transfers; copies and bytes are exact, "
    "seconds and GB/s describe this machine's memory, not a GPU link, and NVML measured nothing"
)


class ReplayInterrupted(KeyboardInterrupt):
    """Ctrl-C during a replay; ``partial`` holds every strategy run that finished."""

    def __init__(self, partial: ReplayResult | None) -> None:
        super().__init__("replay interrupted")
        self.partial = partial


def _check_whole(value: Any, name: str, minimum: int) -> int:
    whole = is_whole_number(value)
    if not whole or value < minimum:
        raise MoeprofError(f"{name} must be at least {minimum}, got {value!r}")
    return int(value)


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """The MoE layers to replay, sorted and distinct (all when None)."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, str):
        raise MoeprofError(f"layers must be MoE layer numbers, not the text {layers!r}")
    out: list[int] = []
    for item in layers:
        if not is_whole_number(item):
            raise MoeprofError(f"MoE layer {item!r} is not a whole number")
        if not 0 <= item < n_layers:
            raise MoeprofError(
                f"MoE layer {item} does not exist (the trace has {n_layers}: 0..{n_layers - 1})"
            )
        out.append(int(item))
    if not out:
        raise MoeprofError("no layers given to replay")
    return sorted(set(out))


def _block_sizes(
    trace: Trace, sel: list[int], expert_bytes: int | None
) -> tuple[list[int], list[int]]:
    """(bytes replayed per expert block, full-size bytes) for each replayed layer."""
    full = [int(trace.expert_bytes[layer]) for layer in sel]
    if expert_bytes is not None:
        block = [_check_whole(expert_bytes, "expert_bytes", 1)] * len(sel)
    elif all(f > 0 for f in full):
        block = full
    else:
        raise MoeprofError(
            "the trace does not record its expert size; pass expert_bytes to replay blocks of "
            "that many bytes"
        )
    # Unknown full size: project with the replayed size (said so in the results).
    return block, [f if f > 0 else b for f, b in zip(full, block)]


def _hidden_size(trace: Trace, hidden_size: int | None) -> int:
    """The FFN's hidden size: `hidden_size`, else the trace's model metadata, else the default."""
    if hidden_size is not None:
        return _check_whole(hidden_size, "hidden_size", 1)
    hidden = int((trace.meta.get("model") or {}).get("hidden_size") or DEFAULT_HIDDEN)
    if hidden < 1:
        raise MoeprofError(
            f"the trace's model metadata gives hidden size {hidden}; pass hidden_size"
        )
    return hidden


def _human(n: float) -> str:
    from moeprof.formatting import human_bytes

    return human_bytes(n)


def _counted(
    trace: Trace, plan: BatchPlan, sel: list[int], masks: np.ndarray
) -> tuple[BatchSizeResult, CountedLoads]:
    """analyze's numbers for the plan's batches at the replayed layers, with analyze's code:
    the results row, and the counts the strategies are sized and checked with."""
    n_rows = plan.n_rows
    # The first batches of a plan in stored order are the first rows: bitsets of the rest are
    # not copied for the layer selection.
    layer_masks = (masks[:n_rows] if plan.is_identity else masks)[:, sel, :]
    unique_b = unique_per_batch(layer_masks, plan)
    # Routed slots per token from the bitsets, as analyze counts them (None: no empty slot).
    slots = slots_per_token(trace, masks)
    if slots is None:
        requests = np.full(len(sel), n_rows * trace.top_k, dtype=np.int64)
    else:
        requests = slots[plan.order[:n_rows]][:, sel].sum(axis=0, dtype=np.int64)
    row = summarize(
        plan,
        requests,
        unique_b.sum(axis=0, dtype=np.int64),
        trace.expert_bytes[sel],
        trace.n_experts[sel],
        trace.top_k,
        [trace.moe_layer_indices[layer] for layer in sel],
        uniform=plan_uniform(
            None if slots is None else slots[:, sel],
            plan,
            trace.n_experts[sel],
            trace.top_k,
            slots is not None and bool((slots < trace.top_k).any()),
        ),
    )
    # Layer numbers are the trace's MoE layer indices, not positions in the selection.
    layers = tuple(dataclasses.replace(lr, layer=sel[i]) for i, lr in enumerate(row.layers))
    row = dataclasses.replace(row, layers=layers, max_reuse_layer=sel[row.max_reuse_layer])
    return row, CountedLoads(requests=requests, unique_per_batch=unique_b)


@dataclass(frozen=True)
class _Arguments:
    """replay()'s arguments, validated: what to replay."""

    strategies: tuple[Strategy, ...]
    policy: BatchPolicy
    batch_sizes: list[int]
    cache_experts: int
    max_batches: int | None
    layers: list[int]  # replayed MoE layers
    block: list[int]  # bytes replayed per expert, per layer
    full: list[int]  # the trace's bytes per expert, per layer (projection)
    hidden: int  # FFN hidden size (compute)


def _check_arguments(
    trace: Trace,
    *,
    strategies: Sequence[str],
    batch_sizes: Sequence[int],
    policy: str,
    cache_experts: int,
    max_batches: int | None,
    layers: Sequence[int] | None,
    expert_bytes: int | None,
    hidden_size: int | None,
) -> _Arguments:
    chosen = tuple(get_strategy(name) for name in check_strategies(strategies))
    batching = get_policy(policy)
    sizes = check_batch_sizes(batch_sizes)
    cache_experts = check_cache_experts(cache_experts)
    if max_batches is not None:
        max_batches = _check_whole(max_batches, "max_batches", 1)
    if trace.n_tokens == 0:
        raise MoeprofError("the trace is empty (no tokens)")
    sel = _check_layers(layers, trace.n_layers)
    block, full = _block_sizes(trace, sel, expert_bytes)
    return _Arguments(
        strategies=chosen,
        policy=batching,
        batch_sizes=sizes,
        cache_experts=cache_experts,
        max_batches=max_batches,
        layers=sel,
        block=block,
        full=full,
        hidden=_hidden_size(trace, hidden_size),
    )


@dataclass(frozen=True)
class _Sizing:
    """The replayed batches, counted with analyze's code, and the memory they need."""

    plans: list[BatchPlan]  # the replayed batches of each batch size
    batches_total: dict[int, int]  # batch size -> batches in the untruncated plan
    rows: list[BatchSizeResult]  # analyze's row for each plan
    counts: list[CountedLoads]  # and its counts
    n_experts: list[int]  # per replayed layer
    pool_bytes: int  # host pool of every replayed expert
    slot_bytes: int  # device slots of the largest run


def _plan_and_size(trace: Trace, args: _Arguments) -> _Sizing:
    """Plan the batches, count them and size the host pool and the device slots (no device
    work)."""
    full_plans = args.policy.plans(trace, args.batch_sizes)
    plans = [p.head(args.max_batches) for p in full_plans]
    masks = expert_masks(trace)
    counted = [_counted(trace, p, args.layers, masks) for p in plans]
    n_experts = [int(trace.n_experts[layer]) for layer in args.layers]
    stride = aligned(max(args.block))
    return _Sizing(
        plans=plans,
        batches_total={p.batch_size: fp.n_batches for p, fp in zip(plans, full_plans)},
        rows=[row for row, _ in counted],
        counts=[counts for _, counts in counted],
        n_experts=n_experts,
        pool_bytes=sum(e * aligned(b) for e, b in zip(n_experts, args.block)),
        slot_bytes=max(
            s.total_slots(counts, args.cache_experts) * stride
            for _, counts in counted
            for s in args.strategies
        ),
    )


def _check_memory(
    backend: Backend,
    *,
    pool_bytes: int,
    slot_bytes: int,
    calibration_bytes: int,
    n_layers: int,
    n_experts: list[int],
    block: list[int],
) -> None:
    on_cpu = backend.ran_on_cpu
    # Calibration buffers are freed before the pool is allocated; the CPU backend keeps its
    # "device" slots in host memory too.
    host_need = max(
        pool_bytes + (slot_bytes if on_cpu else 0), calibration_bytes * (2 if on_cpu else 1)
    )
    available = host_available_bytes()
    what = "pinned host" if not on_cpu else "host"
    headroom = HOST_HEADROOM if on_cpu else PINNED_HEADROOM
    if available is not None and host_need > headroom * available:
        raise MoeprofError(
            f"the expert pool needs {_human(host_need)} of {what} memory ({n_layers} layers x "
            f"{max(n_experts)} experts x {_human(max(block))}"
            + (f", plus {_human(slot_bytes)} of slots" if on_cpu else "")
            + f") but only {_human(available)} is available"
            + ("" if on_cpu else f" (at most {headroom:.0%} of it is pinned)")
            + "; replay fewer layers or smaller blocks (expert_bytes)"
        )
    free = backend.device_free_bytes()
    if free is not None:
        device_need = max(slot_bytes, calibration_bytes) + DEVICE_RESERVE_BYTES
        if device_need > DEVICE_HEADROOM * free:
            raise MoeprofError(
                f"the device slots need {_human(device_need)} but the device has "
                f"{_human(free)} free; use smaller blocks (expert_bytes), fewer layers or a "
                "smaller cache (cache_experts)"
            )


LayerLists = list[tuple[list[int], list[int], list[int], list[bool], list[int]]]


def _layer_lists(schedule: Schedule) -> LayerLists:
    """Per layer: (ptr, expert, slot, copy, tokens) as Python lists, built on the host before
    the run is timed (converting arrays is host work, not device time)."""
    bases = schedule.slot_bases()
    return [
        (
            ls.ptr.tolist(),
            ls.expert.tolist(),
            (ls.slot + base).tolist(),
            ls.copy.tolist(),
            ls.tokens.tolist(),
        )
        for ls, base in zip(schedule.layers, bases)
    ]


def _execute(
    backend: Backend,
    per_layer: LayerLists,
    n_batches: int,
    *,
    compute: bool,
    progress: ProgressFn | None,
    label: str,
) -> tuple[list[int], int]:
    """Issue every item of the schedule (as :func:`_layer_lists` prepared it); returns copies
    per layer and cache hits."""
    layer_copies = [0] * len(per_layer)
    hits = 0
    step = max(1, n_batches // 200)
    for b in range(n_batches):
        if compute:
            backend.batch_begin()
        for j, (ptr, experts, slots, copies, tokens) in enumerate(per_layer):
            n_copies = 0
            for i in range(ptr[b], ptr[b + 1]):
                s = slots[i]
                if copies[i]:
                    if compute:
                        backend.wait_slot_free(s)
                    backend.copy(j, experts[i], s)
                    n_copies += 1
                    if compute:
                        backend.mark_slot_ready(s)
                if compute:
                    backend.wait_slot_ready(s)
                    backend.compute(j, s, tokens[i])
                    backend.mark_slot_free(s)
            layer_copies[j] += n_copies
            hits += (ptr[b + 1] - ptr[b]) - n_copies
        if compute:
            backend.batch_end()
        if progress is not None and ((b + 1) % step == 0 or b + 1 == n_batches):
            progress(label, b + 1, n_batches)
    return layer_copies, hits


def _pcie_monitor(
    backend: Backend, nv: nvml.Nvml | None, counters_failed: str | None = None
) -> nvml.PcieMonitor:
    if not isinstance(backend, CudaBackend):
        na = nvml.NotAvailable("cpu", "CPU backend: host memory copies do not cross PCIe")
        return nvml.PcieMonitor(None, nv=nv, unavailable=na)
    gw = nv or nvml.gateway()
    handle = gw.handle(pci_bus_id=backend.describe().get("pci_bus_id"), index=backend.index)
    return nvml.PcieMonitor(handle, nv=gw, counters_failed=counters_failed)


def _host_bound(issue_s: float, wall_s: float, device_s: float) -> bool:
    """Whether the GPU probably waited for Python to queue the run (see HOST_BOUND_SHARE)."""
    return (
        device_s > 0
        and issue_s >= HOST_BOUND_SHARE * device_s
        and wall_s - issue_s < HOST_BOUND_TAIL_S
    )


COUNTER_CHECK_MIN = 0.5  # NVML RX over the calibration's bytes below this: counters not counting


def _calibrate(
    be: Backend, nbytes: int, monitor: nvml.PcieMonitor, nv: nvml.Nvml | None
) -> tuple[Calibration, dict[str, Any] | None, nvml.PcieMonitor]:
    """The peak-rate calibration; with NVML byte counters, also their check: the calibration
    moves a known number of bytes (warm-up + repeats), which the RX counter must see. Returns
    the monitor to measure the runs with: without the counters when they did not count."""
    if monitor.method != nvml.METHOD_COUNTERS:
        return be.calibrate(nbytes), None, monitor
    be.synchronize()
    monitor.start()
    try:
        calibration = be.calibrate(nbytes)
        be.synchronize()
    finally:
        seen = monitor.stop()  # also after a CUDA error: the polling thread must end
    moved = calibration.nbytes * (calibration.repeats + 1)
    rx = seen.rx_bytes
    check = {
        "bytes_copied": moved,
        "nvml_rx_bytes": rx,
        "rx_to_copied": None if rx is None else rx / moved,
        "reason": seen.reason,
    }
    if rx is None or rx < COUNTER_CHECK_MIN * moved:
        why = f"answer, but saw {'nothing' if rx is None else f'{rx:,}'} RX bytes of a {moved:,}-byte calibration copy"
        monitor = _pcie_monitor(be, nv, counters_failed=why)
    return calibration, check, monitor


def _link_info(backend: Backend, nv: nvml.Nvml | None) -> dict[str, Any]:
    if not isinstance(backend, CudaBackend):
        return {}
    gw = nv or nvml.gateway()
    handle = gw.handle(pci_bus_id=backend.describe().get("pci_bus_id"), index=backend.index)
    names = {
        "pcie_gen_current": "nvmlDeviceGetCurrPcieLinkGeneration",
        "pcie_gen_max": "nvmlDeviceGetMaxPcieLinkGeneration",
        "pcie_width_current": "nvmlDeviceGetCurrPcieLinkWidth",
        "pcie_width_max": "nvmlDeviceGetMaxPcieLinkWidth",
    }
    out: dict[str, Any] = {}
    for key, fn in names.items():
        value = handle if isinstance(handle, nvml.NotAvailable) else gw.call(fn, handle)
        out[key] = None if isinstance(value, nvml.NotAvailable) else int(value)
    return out


def _describe(
    be: Backend, trace: Trace, args: _Arguments, sizing: _Sizing, compute: bool
) -> dict[str, Any]:
    """The results' ``replay`` object as known before the link is measured."""
    import torch

    sel = args.layers
    return {
        **be.describe(),
        "backend": be.name,
        "ran_on_cpu": be.ran_on_cpu,
        "note": CPU_NOTE if be.ran_on_cpu else None,
        "strategies": [s.name for s in args.strategies],
        "policy": args.policy.name,
        "batch_sizes": [p.batch_size for p in sizing.plans],
        "cache_experts": args.cache_experts,
        "max_batches": args.max_batches,
        "layers": sel,
        "model_layers": [trace.moe_layer_indices[layer] for layer in sel],
        "expert_bytes_replayed": args.block,
        "expert_bytes_full": args.full,
        "scaled_blocks": args.block != args.full,
        "expert_bytes_known": bool(all(int(trace.expert_bytes[layer]) > 0 for layer in sel)),
        "pool_bytes": sizing.pool_bytes,
        "max_slot_bytes": sizing.slot_bytes,
        "compute": compute,
        "torch_version": torch.__version__,
    }


def _run_one(
    be: Backend,
    monitor: nvml.PcieMonitor,
    schedule: Schedule,
    strategy: Strategy,
    counts: CountedLoads,
    args: _Arguments,
    *,
    compute: bool,
    peak: float | None,
    on_progress: ProgressFn | None,
) -> StrategyRun:
    """Issue one strategy's schedule at one batch size into the allocated slots, timed and
    watched by `monitor`; the slots are released after."""
    plan = schedule.plan
    be.warm_up()
    label = f"{strategy.name} B={plan.batch_size}"
    per_layer = _layer_lists(schedule)
    be.synchronize()
    monitor.start()
    t0 = time.perf_counter()
    try:
        be.start_run()
        layer_copies, hits = _execute(
            be, per_layer, schedule.n_batches, compute=compute, progress=on_progress, label=label
        )
        issue = time.perf_counter() - t0
        seconds = be.finish_run()
    finally:
        wall = time.perf_counter() - t0
        pcie = monitor.stop()
    be.release_slots()
    return StrategyRun(
        strategy=strategy.name,
        batch_size=plan.batch_size,
        n_batches=plan.n_batches,
        copies=sum(layer_copies),
        counted_copies=strategy.counted_copies(counts, schedule),
        counted_basis=strategy.counted_basis,
        layer_copies=tuple(layer_copies),
        hits=hits,
        bytes_copied=sum(c * b for c, b in zip(layer_copies, args.block)),
        bytes_copied_full_size=sum(c * f for c, f in zip(layer_copies, args.full)),
        seconds=seconds,
        wall_seconds=wall,
        peak_gbps=peak,
        pcie=pcie,
        batch_latency=LatencyStats.of(be.batch_latency_s) if compute else None,
        issue_seconds=issue,
        # The GPU may have waited for Python to queue the work: then seconds and GB/s describe
        # the host, not the link.
        host_bound=None if be.ran_on_cpu else _host_bound(issue, wall, seconds),
    )


def replay(
    trace: Trace,
    *,
    device: str = "cpu",
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    batch_sizes: Sequence[int] = (8, 64),
    policy: str = "tokens",
    cache_experts: int = 0,
    max_batches: int | None = None,
    layers: Sequence[int] | None = None,
    expert_bytes: int | None = None,
    compute: bool = False,
    hidden_size: int | None = None,
    calibrate: bool = True,
    calibration_bytes: int | None = None,
    on_progress: ProgressFn | None = None,
    nv: nvml.Nvml | None = None,
    backend: Backend | None = None,
) -> ReplayResult:
    """Replay `trace`'s expert loads for each batch size and strategy; see docs/replay.md.

    Raises MoeprofError (before allocating anything) for bad arguments, a pool that does not fit
    in host memory, slots that do not fit on the device, or ``device="cuda"`` without CUDA.
    Ctrl-C raises :class:`ReplayInterrupted` carrying the runs that finished.
    """
    args = _check_arguments(
        trace,
        strategies=strategies,
        batch_sizes=batch_sizes,
        policy=policy,
        cache_experts=cache_experts,
        max_batches=max_batches,
        layers=layers,
        expert_bytes=expert_bytes,
        hidden_size=hidden_size,
    )
    be = backend or make_backend(device)  # refuses a missing CUDA device before any work
    sizing = _plan_and_size(trace, args)
    if calibration_bytes is None:
        calibration_bytes = GIB if isinstance(be, CudaBackend) else 256 << 20
    _check_memory(
        be,
        pool_bytes=sizing.pool_bytes,
        slot_bytes=sizing.slot_bytes,
        calibration_bytes=calibration_bytes if calibrate else 0,
        n_layers=len(args.layers),
        n_experts=sizing.n_experts,
        block=args.block,
    )

    info = _describe(be, trace, args, sizing, compute)
    runs: list[StrategyRun] = []
    analysis = AnalysisResult(trace=trace_summary(trace), results=tuple(sizing.rows))

    def assemble(interrupted: bool) -> ReplayResult:
        return ReplayResult(analysis, tuple(runs), dict(info), sizing.batches_total, interrupted)

    monitor: nvml.PcieMonitor | None = None
    try:
        monitor = _pcie_monitor(be, nv)
        calibration: Calibration | None = None
        check: dict[str, Any] | None = None
        if calibrate:
            calibration, check, monitor = _calibrate(be, calibration_bytes, monitor, nv)
        info["counter_check"] = check
        peak = calibration.peak_gbps if calibration else None
        info["calibration"] = calibration.to_dict() if calibration else None
        info["peak_h2d_gbps"] = peak
        be.allocate_pools(sizing.n_experts, args.block)
        info["host_memory"] = be.host_memory
        info["measurement_method"] = monitor.method
        info["measurement_reason"] = monitor.reason
        info["measurement_notes"] = monitor.probe_notes
        info["link"] = _link_info(be, nv)
        info["ffn"] = None
        for plan, counts in zip(sizing.plans, sizing.counts):
            for strategy in args.strategies:
                schedule = strategy.schedule(trace, plan, args.layers, args.cache_experts)
                be.allocate_slots(schedule.total_slots())
                if compute:
                    shapes = be.prepare_compute(args.hidden, int(plan.batch_tokens.max(initial=1)))
                    info["ffn"] = [s.to_dict() for s in shapes]
                run = _run_one(
                    be,
                    monitor,
                    schedule,
                    strategy,
                    counts,
                    args,
                    compute=compute,
                    peak=peak,
                    on_progress=on_progress,
                )
                runs.append(run)
    except KeyboardInterrupt:
        be.abort_run()
        raise ReplayInterrupted(assemble(True)) from None
    finally:
        if monitor is not None:
            monitor.close()  # a window left open by an error: its polling thread ends here
        be.release()
    return assemble(False)
