"""`replay()`: re-execute a trace's expert loads per strategy and measure them.

Steps: validate everything and size the memory (refusing up front what cannot fit), count the
replayed batches with analyze's own code, calibrate the link, then for each batch size and
strategy build the schedule, allocate slots, and issue every copy (and FFN, with ``compute``)
through a backend while NVML watches the link.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from moeprof import nvml
from moeprof.analyze import (
    AnalysisResult,
    BatchSizeResult,
    expert_masks,
    log_miss_per_token,
    parse_batch_sizes,
    slots_per_token,
    summarize,
    trace_summary,
    unique_per_batch,
)
from moeprof.errors import MoeprofError
from moeprof.policies import BatchPlan, check_policy, plan_batches
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
from moeprof.replay.schedule import (
    STRATEGIES,
    Schedule,
    build_schedule,
    check_strategies,
    slots_needed,
    truncate_plan,
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


def _check_layers(layers: Iterable[int] | str | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, str):
        items: list[Any] = [s.strip() for s in layers.split(",") if s.strip()]
    else:
        items = list(layers)
    out: list[int] = []
    for item in items:
        try:
            value = int(item)
        except (TypeError, ValueError):
            raise MoeprofError(f"--layers: {item!r} is not a whole number") from None
        if not 0 <= value < n_layers:
            raise MoeprofError(
                f"--layers: MoE layer {value} does not exist (the trace has {n_layers}: "
                f"0..{n_layers - 1})"
            )
        out.append(value)
    if not out:
        raise MoeprofError("--layers: no layers given")
    return sorted(set(out))


def _block_sizes(
    trace: Trace, sel: list[int], expert_bytes: int | None
) -> tuple[list[int], list[int]]:
    """(bytes replayed per expert block, full-size bytes) for each replayed layer."""
    full = [int(trace.expert_bytes[layer]) for layer in sel]
    if expert_bytes is not None:
        if isinstance(expert_bytes, bool) or int(expert_bytes) < 1:
            raise MoeprofError(f"--expert-bytes must be at least 1, got {expert_bytes}")
        block = [int(expert_bytes)] * len(sel)
    elif all(f > 0 for f in full):
        block = full
    else:
        raise MoeprofError(
            "the trace does not record its expert size; pass --expert-bytes N to replay blocks "
            "of N bytes"
        )
    # Unknown full size: project with the replayed size (said so in the results).
    return block, [f if f > 0 else b for f, b in zip(full, block)]


def _human(n: float) -> str:
    from moeprof.formatting import human_bytes

    return human_bytes(n)


def _counted(
    trace: Trace, plan: BatchPlan, sel: list[int], masks: np.ndarray
) -> tuple[BatchSizeResult, np.ndarray, np.ndarray]:
    """analyze's numbers for the plan's batches at the replayed layers, with analyze's code.

    Returns the row, unique [n_batches, L_sel] and requests [L_sel].
    """
    n_rows = int(plan.starts[-1])
    layer_masks = masks[:, sel, :]
    if plan.policy == "tokens":
        layer_masks = layer_masks[:n_rows]  # the first batches are the first rows
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
        None
        if slots is None
        else log_miss_per_token(slots[:, sel], trace.n_experts[sel], trace.top_k),
    )
    # Layer numbers are the trace's MoE layer indices, not positions in the selection.
    layers = tuple(dataclasses.replace(lr, layer=sel[i]) for i, lr in enumerate(row.layers))
    row = dataclasses.replace(row, layers=layers, max_reuse_layer=sel[row.max_reuse_layer])
    return row, unique_b, requests


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
            + "; replay fewer layers (--layers) or smaller blocks (--expert-bytes)"
        )
    free = backend.device_free_bytes()
    if free is not None:
        device_need = max(slot_bytes, calibration_bytes) + DEVICE_RESERVE_BYTES
        if device_need > DEVICE_HEADROOM * free:
            raise MoeprofError(
                f"the device slots need {_human(device_need)} but the device has "
                f"{_human(free)} free; use smaller blocks (--expert-bytes), fewer layers "
                "(--layers) or a smaller --cache-experts"
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


def replay(
    trace: Trace,
    *,
    device: str = "cpu",
    strategies: Sequence[str] | str = STRATEGIES,
    batch_sizes: Iterable[int] | str = (8, 64),
    policy: str = "tokens",
    cache_experts: int = 0,
    max_batches: int | None = None,
    layers: Iterable[int] | str | None = None,
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
    strategy_list = check_strategies(strategies)
    check_policy(policy)
    sizes = parse_batch_sizes(batch_sizes)
    if isinstance(cache_experts, bool) or int(cache_experts) < 0:
        raise MoeprofError(f"--cache-experts must be 0 or more, got {cache_experts}")
    cache_experts = int(cache_experts)
    if max_batches is not None and int(max_batches) < 1:
        raise MoeprofError(f"--max-batches must be at least 1, got {max_batches}")
    if trace.n_tokens == 0:
        raise MoeprofError("the trace is empty (no tokens)")
    sel = _check_layers(layers, trace.n_layers)
    block, full = _block_sizes(trace, sel, expert_bytes)
    if hidden_size is not None and int(hidden_size) < 1:
        raise MoeprofError(f"--hidden-size must be at least 1, got {hidden_size}")
    hidden = int(
        hidden_size or (trace.meta.get("model") or {}).get("hidden_size") or DEFAULT_HIDDEN
    )
    if hidden < 1:
        raise MoeprofError(f"--hidden-size must be at least 1, got {hidden}")

    be = backend or make_backend(device)  # refuses --device cuda without CUDA, before any work

    # Batches, counted with analyze's code, and the slots each run needs.
    full_plans = (
        [plan_batches(trace, policy, 0)]
        if policy == "recorded"
        else [plan_batches(trace, policy, b) for b in sizes]
    )
    plans = [truncate_plan(p, max_batches) for p in full_plans]
    masks = expert_masks(trace)
    counted = [_counted(trace, p, sel, masks) for p in plans]
    n_experts = [int(trace.n_experts[layer]) for layer in sel]
    stride = aligned(max(block))
    slot_bytes = 0
    for _, unique_b, requests in counted:
        for strategy in strategy_list:
            need = slots_needed(strategy, unique_b, cache_experts, requests)
            total = max(need) if strategy in ("naive", "dedup") else sum(need)
            slot_bytes = max(slot_bytes, total * stride)
    pool_bytes = sum(e * aligned(b) for e, b in zip(n_experts, block))

    if calibration_bytes is None:
        calibration_bytes = GIB if isinstance(be, CudaBackend) else 256 << 20
    _check_memory(
        be,
        pool_bytes=pool_bytes,
        slot_bytes=slot_bytes,
        calibration_bytes=calibration_bytes if calibrate else 0,
        n_layers=len(sel),
        n_experts=n_experts,
        block=block,
    )

    import torch

    description = be.describe()
    info: dict[str, Any] = {
        **description,
        "backend": be.name,
        "ran_on_cpu": be.ran_on_cpu,
        "note": CPU_NOTE if be.ran_on_cpu else None,
        "strategies": list(strategy_list),
        "policy": policy,
        "batch_sizes": [p.batch_size for p in plans],
        "cache_experts": cache_experts,
        "max_batches": max_batches,
        "layers": sel,
        "model_layers": [trace.moe_layer_indices[layer] for layer in sel],
        "expert_bytes_replayed": block,
        "expert_bytes_full": full,
        "scaled_blocks": block != full,
        "expert_bytes_known": bool(all(int(trace.expert_bytes[layer]) > 0 for layer in sel)),
        "pool_bytes": pool_bytes,
        "max_slot_bytes": slot_bytes,
        "compute": compute,
        "torch_version": torch.__version__,
    }
    runs: list[StrategyRun] = []
    analysis = AnalysisResult(
        trace=trace_summary(trace), policy=policy, results=tuple(c[0] for c in counted)
    )
    batches_total = {p.batch_size: fp.n_batches for p, fp in zip(plans, full_plans)}

    def partial(interrupted: bool) -> ReplayResult:
        return ReplayResult(analysis, tuple(runs), dict(info), batches_total, interrupted)

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
        be.allocate_pools(n_experts, block)
        info["host_memory"] = be.host_memory
        info["measurement_method"] = monitor.method
        info["measurement_reason"] = monitor.reason
        info["measurement_notes"] = monitor.probe_notes
        info["link"] = _link_info(be, nv)
        info["ffn"] = None
        for plan, (_row, unique_b, requests) in zip(plans, counted):
            for strategy in strategy_list:
                schedule = build_schedule(trace, plan, strategy, sel, cache_experts)
                be.allocate_slots(schedule.total_slots())
                if compute:
                    shapes = be.prepare_compute(hidden, int(plan.batch_tokens.max(initial=1)))
                    info["ffn"] = [s.to_dict() for s in shapes]
                be.warm_up()
                label = f"{strategy} B={plan.batch_size}"
                per_layer = _layer_lists(schedule)
                be.synchronize()
                monitor.start()
                t0 = time.perf_counter()
                try:
                    be.start_run()
                    layer_copies, hits = _execute(
                        be,
                        per_layer,
                        schedule.n_batches,
                        compute=compute,
                        progress=on_progress,
                        label=label,
                    )
                    issue = time.perf_counter() - t0
                    seconds = be.finish_run()
                finally:
                    wall = time.perf_counter() - t0
                    pcie = monitor.stop()
                be.release_slots()
                if strategy == "naive":
                    expected, basis = int(requests.sum()), "analyze requests"
                elif strategy == "dedup":
                    expected, basis = int(unique_b.sum()), "analyze unique"
                else:
                    expected, basis = schedule.copies, "LRU simulation"
                runs.append(
                    StrategyRun(
                        strategy=strategy,
                        batch_size=plan.batch_size,
                        n_batches=plan.n_batches,
                        copies=sum(layer_copies),
                        counted_copies=expected,
                        counted_basis=basis,
                        layer_copies=tuple(layer_copies),
                        hits=hits,
                        bytes_copied=sum(c * b for c, b in zip(layer_copies, block)),
                        bytes_copied_full_size=sum(c * f for c, f in zip(layer_copies, full)),
                        seconds=seconds,
                        wall_seconds=wall,
                        peak_gbps=peak,
                        pcie=pcie,
                        batch_latency=LatencyStats.of(be.batch_latency_s) if compute else None,
                        issue_seconds=issue,
                        # The GPU may have waited for Python to queue the work: then seconds
                        # and GB/s describe the host, not the link.
                        host_bound=None if be.ran_on_cpu else _host_bound(issue, wall, seconds),
                    )
                )
    except KeyboardInterrupt:
        be.abort_run()
        raise ReplayInterrupted(partial(True)) from None
    finally:
        if monitor is not None:
            monitor.close()  # a window left open by an error: its polling thread ends here
        be.release()
    return partial(False)
