"""Replay: copy counts against analyze and an independent LRU, the slot protocol against a
simulated pair of CUDA streams, bad input, Ctrl-C, renderers, and (with CUDA) the GPU path."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REFERENCE_TRACES, random_trace
from test_nvml import FakeGpu, gateway_for

import moeprof
from moeprof.analyze import analyze
from moeprof.errors import MoeprofError
from moeprof.policies import plan_batches
from moeprof.replay import ReplayInterrupted, replay
from moeprof.replay import engine as engine_mod
from moeprof.replay.backends import Backend, ffn_shape
from moeprof.replay.results import compare_with_naive
from moeprof.replay.schedule import build_schedule
from moeprof.report.replay import replay_markdown, replay_renderables, replay_rows
from moeprof.trace import Trace

CAL = 1 << 20  # small calibration copy: tests check logic, not memory bandwidth


def cpu_replay(trace: Trace, **kw: Any) -> Any:
    kw.setdefault("calibrate", False)
    kw.setdefault("expert_bytes", 1024)
    return replay(trace, device="cpu", **kw)


def strategy(doc_row: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in doc_row["replay"]["strategies"] if s["strategy"] == name)


def brute_force_lru(trace: Trace, policy: str, batch_size: int, layer: int, capacity: int) -> int:
    """Misses of a per-layer LRU cache of `capacity` experts, walking every request in order.

    A batch's experts are all resident while it runs (eviction once the batch is done); an
    expert counts as a miss once per batch when it was not cached at the batch's start.
    """
    plan = plan_batches(trace, policy, batch_size)
    sentinel = int(trace.n_experts[layer])
    cache: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for b in range(plan.n_batches):
        loaded: set[int] = set()
        for row in plan.rows(b):
            for e in trace.expert_ids[row, layer].tolist():
                if e == sentinel:
                    continue
                if e not in cache and e not in loaded:
                    misses += 1
                    loaded.add(e)
                cache[e] = None
                cache.move_to_end(e)
        while len(cache) > capacity:
            cache.popitem(last=False)
    return misses


# ---------------------------------------------------------------------- counts


@pytest.mark.parametrize("seed", range(6))
def test_cpu_copy_counts_equal_analyze(seed: int) -> None:
    rng = np.random.default_rng(seed)
    trace = random_trace(rng)
    policy = ["tokens", "decode", "recorded"][seed % 3]
    sizes = [1, 3, 8]
    doc = cpu_replay(trace, batch_sizes=sizes, policy=policy).to_dict()
    counted = analyze(trace, sizes, policy).to_dict()
    assert len(doc["results"]) == len(counted["results"])
    for row, arow in zip(doc["results"], counted["results"]):
        plain = {k: v for k, v in row.items() if k != "replay"}
        assert plain == arow  # the counted part is analyze's own result for the same batches
        naive, dedup = strategy(row, "naive"), strategy(row, "dedup")
        assert naive["copies"] == arow["requests"]
        assert dedup["copies"] == arow["unique"]
        assert naive["layer_copies"] == [lr["requests"] for lr in arow["layers"]]
        assert dedup["layer_copies"] == [lr["unique"] for lr in arow["layers"]]
        assert naive["copies_match_counted"] and dedup["copies_match_counted"]
        assert dedup["bytes_copied"] == 1024 * arow["unique"]
        # Full-size projection uses the trace's own expert bytes per layer.
        assert dedup["bytes_copied_full_size"] == arow["bytes_unique"]


@pytest.mark.parametrize("capacity", [0, 1, 3, 100])
def test_lru_against_brute_force(capacity: int) -> None:
    trace = moeprof.synthesize(
        n_experts=8,
        top_k=2,
        n_layers=2,
        n_requests=6,
        tokens_per_request=24,
        length_spread=0.5,
        zipf=1.2,
        locality=0.4,
        seed=capacity,
    )
    sizes = [1, 4, 16]
    doc = cpu_replay(trace, batch_sizes=sizes, cache_experts=capacity).to_dict()
    for row in doc["results"]:
        b = row["batch_size"]
        lru, dedup = strategy(row, "lru"), strategy(row, "dedup")
        expected = [brute_force_lru(trace, "tokens", b, layer, capacity) for layer in range(2)]
        assert lru["layer_copies"] == expected
        assert lru["copies"] + lru["hits"] == dedup["copies"]
        if capacity == 0:
            assert lru["layer_copies"] == dedup["layer_copies"]
        if capacity >= 8:  # everything fits: only cold misses
            distinct = [
                len(set(trace.expert_ids[:, layer].ravel().tolist()) - {8}) for layer in range(2)
            ]
            assert lru["layer_copies"] == distinct


def test_lru_with_decode_policy_against_brute_force() -> None:
    trace = random_trace(np.random.default_rng(11), n_tokens=50, n_layers=2, top_k=2, n_experts=6)
    doc = cpu_replay(trace, batch_sizes=[3], policy="decode", cache_experts=2).to_dict()
    lru = strategy(doc["results"][0], "lru")
    assert lru["layer_copies"] == [
        brute_force_lru(trace, "decode", 3, layer, 2) for layer in (0, 1)
    ]


def test_max_batches_and_layers_count_only_what_is_replayed() -> None:
    trace = moeprof.synthesize(n_layers=4, n_requests=5, tokens_per_request=30, zipf=1.0, seed=3)
    doc = cpu_replay(trace, batch_sizes=[4], max_batches=5, layers="3,1").to_dict()
    row = doc["results"][0]
    # Independent count: the first 5 batches of 4 rows are rows 0..19.
    sub = Trace.from_arrays(
        trace.expert_ids[:20],
        n_experts=trace.n_experts,
        request_ids=trace.request_ids[:20],
        positions=trace.positions[:20],
        expert_bytes=trace.expert_bytes,
    )
    expect = analyze(sub, [4]).to_dict()["results"][0]
    assert row["n_batches"] == 5 and row["replay"]["batches_total"] == 38
    assert [lr["layer"] for lr in row["layers"]] == [1, 3]
    assert row["unique"] == expect["layers"][1]["unique"] + expect["layers"][3]["unique"]
    assert strategy(row, "dedup")["layer_copies"] == [
        expect["layers"][1]["unique"],
        expect["layers"][3]["unique"],
    ]
    assert strategy(row, "naive")["copies"] == 20 * 2 * 2
    assert doc["replay"]["layers"] == [1, 3] and doc["replay"]["scaled_blocks"] is True


class CheckingBackend(Backend):
    """The CPU backend, checking every copy's bytes and which expert each compute reads."""

    def __init__(self) -> None:
        super().__init__()
        self.slot_holds: dict[int, tuple[int, int]] = {}
        self.computed: list[tuple[int, int]] = []

    def allocate_pools(self, n_experts: list[int], block_bytes: list[int]) -> None:
        super().allocate_pools(n_experts, block_bytes)
        for j, pool in enumerate(self.pools):
            for e in range(pool.shape[0]):
                pool[e].fill_((31 * j + e + 1) % 251)  # a distinct byte per (layer, expert)

    def copy(self, layer: int, expert: int, slot: int) -> None:
        super().copy(layer, expert, slot)
        nb = self.block_bytes[layer]
        assert bool((self.slots[slot, :nb] == (31 * layer + expert + 1) % 251).all())
        self.slot_holds[slot] = (layer, expert)

    def warm_up(self) -> None:
        super().warm_up()
        self.computed.clear()  # the untimed warm-up is not part of the schedule

    def compute(self, layer: int, slot: int, tokens: int) -> None:
        held = self.slot_holds[slot]
        assert held[0] == layer
        self.computed.append(held)


def test_compute_reads_the_expert_the_schedule_says() -> None:
    trace = moeprof.synthesize(
        n_experts=8,
        top_k=2,
        n_layers=3,
        n_requests=4,
        tokens_per_request=20,
        zipf=1.0,
        locality=0.3,
        seed=5,
    )
    for strat in ("naive", "dedup", "lru"):
        backend = CheckingBackend()
        replay(
            trace,
            strategies=[strat],
            batch_sizes=[4],
            cache_experts=2,
            expert_bytes=512,
            compute=True,
            hidden_size=8,
            calibrate=False,
            backend=backend,
        )
        plan = plan_batches(trace, "tokens", 4)
        sched = build_schedule(trace, plan, strat, [0, 1, 2], cache_experts=2)
        expected = []
        for b in range(plan.n_batches):
            for j, ls in enumerate(sched.layers):
                for i in range(int(ls.ptr[b]), int(ls.ptr[b + 1])):
                    expected.append((j, int(ls.expert[i])))
        assert backend.computed == expected, strat


SPECMOE = REFERENCE_TRACES / "specmoe-mixtral-decode"


def mixtral_decode_trace() -> Trace:
    """Real Mixtral-8x7B decode routing (4 requests, 32 layers, top-2), read from the shared
    reference folder; (token, layer) rows the recording lacks hold the sentinel."""
    if not (SPECMOE / "gsm8k_2_routing.jsonl").exists():
        pytest.skip(f"reference traces not found at {SPECMOE}")
    rows = []
    for name in ("humaneval_2_routing.jsonl", "gsm8k_2_routing.jsonl"):
        with open(SPECMOE / name, encoding="utf-8") as fh:
            for line in fh:
                d = json.loads(line)
                rows.append(
                    ((d["dataset"], d["problem_id"]), d["token_idx"], d["layer"], d["experts"])
                )
    requests = {key: i for i, key in enumerate(sorted({r[0] for r in rows}))}
    tokens = {k: i for i, k in enumerate(sorted({(requests[r[0]], r[1]) for r in rows}))}
    ids = np.full((len(tokens), 32, 2), 8, dtype=np.int64)
    for req, token, layer, experts in rows:
        ids[tokens[(requests[req], token)], layer] = experts
    return Trace.from_arrays(
        ids,
        n_experts=8,
        request_ids=[k[0] for k in tokens],
        positions=[k[1] for k in tokens],
        expert_bytes=3 * 4096 * 14336 * 2,
    )


def test_real_mixtral_decode_routing() -> None:
    trace = mixtral_decode_trace()
    # SOURCE.md's sanity number: the 4 requests as one batch for their first 79 decode steps
    # request 20,214 expert loads, 13,578 unique per (step, layer).
    doc = cpu_replay(trace, policy="decode", batch_sizes=[4], max_batches=79, cache_experts=4)
    row = doc.to_dict()["results"][0]
    assert strategy(row, "naive")["copies"] == 20_214
    assert strategy(row, "dedup")["copies"] == 13_578
    lru = strategy(row, "lru")
    full = cpu_replay(trace, policy="decode", batch_sizes=[4], cache_experts=4, layers="0,31")
    lru_full = strategy(full.to_dict()["results"][0], "lru")
    assert lru_full["layer_copies"] == [
        brute_force_lru(trace, "decode", 4, layer, 4) for layer in (0, 31)
    ]
    assert lru["copies"] < strategy(row, "dedup")["copies"]


# ---------------------------------------------------------------------- the CUDA slot protocol


class StreamSimBackend(Backend):
    """Simulates the CUDA path's two streams with vector clocks and records every hazard.

    Copies run on stream 0, computes on stream 1. An operation A happens before B when B's
    clock has seen A (same stream in order, or through an event record -> wait). A copy into a
    slot must come after every compute that read the slot's previous expert (WAR); a compute
    must come after the copy that filled its slot (RAW).
    """

    def __init__(self, *, honour_free: bool = True) -> None:
        super().__init__()
        self.vc = [[0, 0], [0, 0]]
        self.ready: dict[int, list[int]] = {}
        self.free: dict[int, list[int]] = {}
        self.last_write: dict[int, tuple[int, int]] = {}
        self.reads: dict[int, list[tuple[int, int]]] = {}
        self.hazards: list[str] = []
        self.honour_free = honour_free
        self.ops = 0

    def _issue(self, stream: int) -> tuple[int, list[int]]:
        self.vc[stream][stream] += 1
        self.ops += 1
        return self.vc[stream][stream], list(self.vc[stream])

    def copy(self, layer: int, expert: int, slot: int) -> None:
        index, clock = self._issue(0)
        for stream, i in self.reads.get(slot, []):
            if clock[stream] < i:
                self.hazards.append(f"copy into slot {slot} before compute {i} read it")
        self.last_write[slot] = (0, index)
        self.reads[slot] = []

    def compute(self, layer: int, slot: int, tokens: int) -> None:
        index, clock = self._issue(1)
        stream, i = self.last_write[slot]
        if clock[stream] < i:
            self.hazards.append(f"compute {index} on slot {slot} before its copy landed")
        self.reads.setdefault(slot, []).append((1, index))

    def wait_slot_free(self, slot: int) -> None:
        if self.honour_free and slot in self.free:
            self.vc[0] = [max(a, b) for a, b in zip(self.vc[0], self.free[slot])]

    def mark_slot_ready(self, slot: int) -> None:
        self.ready[slot] = list(self.vc[0])

    def wait_slot_ready(self, slot: int) -> None:
        if slot in self.ready:
            self.vc[1] = [max(a, b) for a, b in zip(self.vc[1], self.ready[slot])]

    def mark_slot_free(self, slot: int) -> None:
        self.free[slot] = list(self.vc[1])

    def warm_up(self) -> None:
        pass


@pytest.mark.parametrize("strat", ["naive", "dedup", "lru"])
def test_slot_protocol_has_no_stream_hazards(strat: str) -> None:
    trace = moeprof.synthesize(
        n_experts=16, top_k=4, n_layers=3, n_requests=6, tokens_per_request=16, zipf=0.8, seed=9
    )
    backend = StreamSimBackend()
    replay(
        trace,
        strategies=[strat],
        batch_sizes=[2, 8],
        cache_experts=3,
        expert_bytes=512,
        compute=True,
        hidden_size=8,
        calibrate=False,
        backend=backend,
    )
    assert backend.ops > 100
    assert backend.hazards == []


def test_stream_simulator_catches_a_missing_wait() -> None:
    trace = moeprof.synthesize(
        n_experts=16, top_k=4, n_layers=2, n_requests=2, tokens_per_request=8, seed=9
    )
    backend = StreamSimBackend(honour_free=False)
    replay(
        trace,
        strategies=["naive"],
        batch_sizes=[4],
        expert_bytes=512,
        compute=True,
        hidden_size=8,
        calibrate=False,
        backend=backend,
    )
    assert any("before compute" in h for h in backend.hazards)


# ---------------------------------------------------------------------- results and rendering


def test_results_json_and_markdown(tmp_path: Path) -> None:
    trace = moeprof.synthesize(n_layers=2, n_requests=4, tokens_per_request=16, zipf=1.0, seed=1)
    result = replay(
        trace,
        device="cpu",
        batch_sizes=[2, 8],
        expert_bytes=4096,
        calibration_bytes=CAL,
        compute=True,
        hidden_size=16,
    )
    doc = result.to_dict()
    json.loads(json.dumps(doc))
    info = doc["replay"]
    assert info["ran_on_cpu"] is True and "CPU" in info["note"]
    assert info["measurement_method"] == "counted_only"
    assert info["peak_h2d_gbps"] > 0 and info["calibration"]["bytes"] == CAL
    for row in doc["results"]:
        for s in row["replay"]["strategies"]:
            assert s["seconds"] > 0
            assert s["gbps"] == pytest.approx(s["bytes_copied"] / s["seconds"] / 1e9)
            assert s["share_of_peak"] == pytest.approx(s["gbps"] / info["peak_h2d_gbps"])
            assert s["nvml_rx_bytes"] is None and s["nvml_tx_bytes"] is None
            assert "CPU backend" in s["nvml_reason"]
            assert s["batch_latency"]["batches"] == row["n_batches"]
            assert 0 < s["issue_seconds"] <= s["wall_seconds"] and s["host_bound"] is None
            full = trace.expert_bytes[0]
            assert s["projected_seconds_full_size"] == pytest.approx(
                s["copies"] * full / (s["gbps"] * 1e9)
            )
    text = replay_markdown(doc)
    assert text.startswith("## Replay (measured)")
    assert "Ran on the CPU" in text and "Per-batch latency" in text
    header, rows = replay_rows(doc)
    assert len(rows) == 2 * 3
    dedup8 = strategy(doc["results"][1], "dedup")
    row = next(r for r in rows if r[0] == "8" and r[1] == "dedup")
    assert row[header.index("Copies")] == f"{dedup8['copies']:,}"
    assert len(replay_renderables(doc)) == 4
    assert replay_markdown({"results": [], "trace": {}}) == ""


def _run(
    strategy_name: str, nbytes: int, seconds: float, rx: int | None, host_bound: bool | None = None
) -> Any:
    from moeprof.nvml import PcieMeasurement
    from moeprof.replay.results import StrategyRun

    pcie = PcieMeasurement(
        "nvml_counters" if rx is not None else "counted_only",
        rx,
        None if rx is None else 1000,
        None,
        seconds,
        2,
    )
    return StrategyRun(
        strategy_name,
        8,
        10,
        nbytes // 100,
        nbytes // 100,
        "x",
        (nbytes // 100,),
        0,
        nbytes,
        nbytes,
        seconds,
        seconds,
        50.0,
        pcie,
        host_bound=host_bound,
    )


def test_compare_with_naive() -> None:
    naive = _run("naive", 1000_00, 2.0, 105_000)
    dedup = _run("dedup", 250_00, 0.52, 26_500)  # counted cost 0.25, NVML 26.5/105 = 0.2524
    cmp = compare_with_naive(dedup, naive)
    assert cmp["counted_savings"] == pytest.approx(0.75)
    assert cmp["measured_savings_nvml"] == pytest.approx(1 - 26_500 / 105_000)
    assert cmp["measured_savings_seconds"] == pytest.approx(1 - 0.52 / 2.0)
    assert cmp["basis"] == "nvml_rx_bytes" and cmp["agrees_within_10pct"] is True
    slow = _run("dedup", 250_00, 1.0, None)  # time says cost 0.5 vs counted 0.25
    cmp = compare_with_naive(slow, _run("naive", 1000_00, 2.0, None))
    assert cmp["basis"] == "seconds" and cmp["agrees_within_10pct"] is False
    assert compare_with_naive(dedup, None)["reason"].startswith("naive was not")
    assert compare_with_naive(naive, naive)["reason"] == "baseline"
    # Markdown of NVML-measured runs shows the RX ratio.
    assert dedup.measured_to_counted == pytest.approx(26_500 / 25_000)


def test_markdown_of_nvml_measured_runs() -> None:
    from moeprof.replay.results import ReplayResult

    trace = moeprof.synthesize(n_layers=1, n_requests=2, tokens_per_request=8, seed=0)
    analysis = analyze(trace, [8])
    runs = (_run("naive", 1000_00, 2.0, 106_000), _run("dedup", 250_00, 0.52, 26_500))
    info = {
        "device": "cuda:0",
        "device_name": "NVIDIA H200",
        "ran_on_cpu": False,
        "peak_h2d_gbps": 50.0,
        "measurement_method": "nvml_counters",
        "layers": [0],
        "strategies": ["naive", "dedup"],
        "policy": "tokens",
        "link": {"pcie_gen_max": 5, "pcie_width_max": 16},
        "counter_check": {
            "bytes_copied": 6 << 30,
            "nvml_rx_bytes": 6_500_000_000,
            "rx_to_copied": 6_500_000_000 / (6 << 30),
            "reason": None,
        },
    }
    doc = ReplayResult(analysis, runs, info).to_dict()
    text = replay_markdown(doc)
    assert "NVIDIA H200" in text and "Gen5 x16" in text and "byte counters" in text
    assert "the calibration's 6.00 GiB showed as 6.05 GiB RX (1.009x)" in text
    header, rows = replay_rows(doc)
    naive_row, dedup_row = rows
    assert naive_row[header.index("RX / counted")] == "1.060x"
    assert dedup_row[header.index("RX / counted")] == "1.060x"
    assert dedup_row[header.index("Counted savings")] == "75.0%"
    assert dedup_row[header.index("Measured savings")] == "75.0% NVML"
    assert dedup_row[header.index("Agree (±10%)")] == "yes"
    assert "Ran on the CPU" not in text and "Host-bound" not in text
    # A run whose copies Python could not queue fast enough is named as host-bound.
    runs = (_run("naive", 1000_00, 2.0, 106_000), _run("dedup", 250_00, 0.52, 26_500, True))
    text = replay_markdown(ReplayResult(analysis, runs, info).to_dict())
    assert "**Host-bound runs** (dedup B=8)" in text


def test_ffn_shape() -> None:
    s = ffn_shape(3 * 64 * 10 * 2, 64, 2)
    assert (s.hidden, s.intermediate, s.weight_bytes) == (64, 10, 3 * 64 * 10 * 2)
    small = ffn_shape(600, 4096, 4)  # 150 floats: hidden shrinks to fit
    assert small.weight_bytes <= 600 and small.intermediate >= 1
    with pytest.raises(MoeprofError):
        ffn_shape(4, 64, 4)


# ---------------------------------------------------------------------- refusals


def test_bad_arguments_raise_before_any_work() -> None:
    trace = moeprof.synthesize(n_layers=2, n_requests=2, tokens_per_request=8, seed=0)
    cases = [
        dict(strategies="naive,fast"),
        dict(layers="0,5"),
        dict(layers="x"),
        dict(expert_bytes=0),
        dict(max_batches=0),
        dict(cache_experts=-1),
        dict(policy="random"),
        dict(batch_sizes="0"),
        dict(device="tpu"),
        dict(compute=True, hidden_size=0),  # not silently the default
        dict(compute=True, hidden_size=-4),
    ]
    for kw in cases:
        with pytest.raises(MoeprofError):
            replay(trace, calibrate=False, **kw)  # type: ignore[arg-type]


def test_unknown_expert_size_needs_expert_bytes() -> None:
    trace = Trace.from_arrays(np.zeros((4, 1, 1), dtype=np.int64), n_experts=2)
    with pytest.raises(MoeprofError, match="--expert-bytes"):
        replay(trace, calibrate=False)
    doc = replay(trace, calibrate=False, expert_bytes=256, strategies="dedup").to_dict()
    assert doc["replay"]["expert_bytes_full"] == [256] and not doc["replay"]["expert_bytes_known"]


def test_refuses_a_pool_larger_than_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    trace = moeprof.synthesize(n_layers=2, n_requests=2, tokens_per_request=8, seed=0)
    monkeypatch.setattr(engine_mod, "host_available_bytes", lambda: 10 << 20)
    with pytest.raises(MoeprofError, match="host memory"):
        replay(trace, calibrate=False)  # default expert size: 336 MiB x 8 x 2 layers


class TinyDevice(Backend):
    def device_free_bytes(self) -> int | None:
        return 64 << 20

    def allocate_pools(self, n_experts: list[int], block_bytes: list[int]) -> None:
        raise AssertionError("must refuse before allocating")


def test_pinned_pool_is_held_to_half_the_available_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    trace = moeprof.synthesize(n_layers=2, n_requests=2, tokens_per_request=8, seed=0)
    monkeypatch.setattr(engine_mod, "host_available_bytes", lambda: 120 << 20)

    class PinnedDevice(TinyDevice):
        ran_on_cpu = False

        def device_free_bytes(self) -> int | None:
            return None

    # 2 layers x 8 experts x 4 MiB = 64 MiB: more than the pinned 50% of 120 MiB; the CPU
    # backend (pool + 32 MiB of slots, nothing pinned) fits its 90%.
    with pytest.raises(MoeprofError, match=r"pinned host memory .*at most 50% of it is pinned"):
        replay(trace, calibrate=False, expert_bytes=4 << 20, backend=PinnedDevice())
    replay(trace, calibrate=False, expert_bytes=4 << 20, strategies="dedup", max_batches=1)


def test_refuses_slots_larger_than_device_memory() -> None:
    trace = moeprof.synthesize(n_layers=2, n_requests=2, tokens_per_request=8, seed=0)
    with pytest.raises(MoeprofError, match="device slots"):
        replay(trace, calibrate=False, expert_bytes=32 << 20, backend=TinyDevice())


def test_cuda_without_cuda_is_refused() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    trace = moeprof.synthesize(n_layers=1, n_requests=1, tokens_per_request=4, seed=0)
    with pytest.raises(MoeprofError, match="--device cuda"):
        replay(trace, device="cuda", expert_bytes=1024)


class InterruptingBackend(Backend):
    def __init__(self, after_copies: int) -> None:
        super().__init__()
        self.left = after_copies
        self.released = False

    def copy(self, layer: int, expert: int, slot: int) -> None:
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        super().copy(layer, expert, slot)

    def release(self) -> None:
        self.released = True
        super().release()


def test_ctrl_c_keeps_finished_runs() -> None:
    trace = moeprof.synthesize(n_layers=2, n_requests=2, tokens_per_request=16, seed=0)
    # naive issues 2 layers x 32 tokens x top-2 = 128 copies (+1 warm-up); dedup fewer.
    backend = InterruptingBackend(after_copies=129 + 10)
    with pytest.raises(ReplayInterrupted) as info:
        replay(trace, batch_sizes=[4], expert_bytes=256, calibrate=False, backend=backend)
    partial = info.value.partial
    assert partial is not None and partial.interrupted
    assert [r.strategy for r in partial.runs] == ["naive"]
    assert partial.runs[0].copies == 128
    assert backend.released
    assert partial.to_dict()["replay"]["interrupted"] is True


# ---------------------------------------------------------------------- CLI


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "t.moe"
    moeprof.synthesize(
        n_layers=2, n_requests=4, tokens_per_request=16, zipf=1.0, seed=2, expert_bytes=8192
    ).save(path)
    return path


def test_cli_replay_writes_json_and_markdown(
    run_cli: Any, trace_file: Path, tmp_path: Path
) -> None:
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    res = run_cli(
        "replay",
        trace_file,
        "--batch-sizes",
        "2,8",
        "--cache-experts",
        "2",
        "--json",
        out,
        "--markdown",
        md,
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(out.read_text())
    assert doc["replay"]["ran_on_cpu"] is True
    assert {s["strategy"] for s in doc["results"][0]["replay"]["strategies"]} == {
        "naive",
        "dedup",
        "lru",
    }
    text = md.read_text()
    assert "## Replay (measured)" in text and "## Savings by Batch Size" in text
    assert "Replay (measured)" in res.stdout
    report = run_cli("report", out)  # the analyze part of the contract still holds
    assert report.exit_code == 0, report.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--layers", "7"], "does not exist"),
        (["--strategies", "naive,warp"], "unknown strategy"),
        (["--expert-bytes", "0"], "--expert-bytes"),
        (["--policy", "recorded"], "recorded steps"),
        (["--batch-sizes", "a"], "batch size"),
    ],
)
def test_cli_bad_input(
    run_cli: Any, trace_file: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "r.json"
    res = run_cli("replay", trace_file, *args, "--json", out)
    assert res.exit_code == 2
    assert res.stderr.startswith("moeprof: error:") and message in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert not out.exists()


def test_cli_refuses_overwrite_and_cuda(run_cli: Any, trace_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    out.write_text("keep")
    res = run_cli("replay", trace_file, "--json", out)
    assert res.exit_code == 2 and "--force" in res.stderr and out.read_text() == "keep"
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        res = run_cli("replay", trace_file, "--device", "cuda", "--json", tmp_path / "c.json")
        assert res.exit_code == 2 and "--device cuda" in res.stderr
        assert not (tmp_path / "c.json").exists()


def test_cli_ctrl_c_writes_partial_results(
    run_cli: Any, trace_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # naive at B=8 issues 64 tokens x 2 layers x top-2 = 256 copies (+1 warm-up), then dedup starts.
    monkeypatch.setattr(
        engine_mod, "make_backend", lambda device: InterruptingBackend(256 + 1 + 10)
    )
    out = tmp_path / "r.json"
    res = run_cli("replay", trace_file, "--batch-sizes", "8", "--json", out)
    assert res.exit_code == 130
    doc = json.loads(out.read_text())
    assert doc["replay"]["interrupted"] is True
    assert [s["strategy"] for s in doc["results"][0]["replay"]["strategies"]] == ["naive"]


# ---------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_replay_counts_times_and_measures() -> None:
    trace = moeprof.synthesize(
        n_experts=8, top_k=2, n_layers=2, n_requests=8, tokens_per_request=32, zipf=1.0, seed=4
    )
    sizes = [8, 64]
    result = replay(
        trace,
        device="cuda",
        batch_sizes=sizes,
        cache_experts=2,
        expert_bytes=4 << 20,
        calibration_bytes=256 << 20,
    )
    doc = result.to_dict()
    counted = analyze(trace, sizes).to_dict()
    info = doc["replay"]
    assert info["ran_on_cpu"] is False and info["device"].startswith("cuda")
    assert info["peak_h2d_gbps"] > 1.0
    assert info["measurement_method"] in ("nvml_counters", "nvml_throughput", "counted_only")
    assert "pinned" in info["host_memory"]
    for row, arow in zip(doc["results"], counted["results"]):
        naive, dedup = strategy(row, "naive"), strategy(row, "dedup")
        assert naive["copies"] == arow["requests"] and dedup["copies"] == arow["unique"]
        for s in row["replay"]["strategies"]:
            assert s["seconds"] > 0 and s["gbps"] > 0
            if info["measurement_method"] == "nvml_counters":
                raw = s["nvml_raw"]
                assert raw["first"] is not None and raw["last"] is not None, raw
                assert s["nvml_rx_bytes"] is not None, s["nvml_reason"]
                assert s["nvml_rx_bytes"] >= 0.9 * s["bytes_copied"], raw


@pytest.mark.gpu
def test_cuda_compute_overlaps_and_reports_latency() -> None:
    trace = moeprof.synthesize(
        n_experts=8, top_k=2, n_layers=2, n_requests=4, tokens_per_request=16, seed=4
    )
    doc = replay(
        trace,
        device="cuda",
        batch_sizes=[8],
        expert_bytes=3 * 1024 * 512 * 2,
        compute=True,
        hidden_size=1024,
        calibration_bytes=64 << 20,
    ).to_dict()
    for s in doc["results"][0]["replay"]["strategies"]:
        lat = s["batch_latency"]
        assert lat["batches"] == doc["results"][0]["n_batches"] and lat["mean_ms"] > 0
        # Critical-path latencies tile the run: together at most its device time.
        assert lat["mean_ms"] * lat["batches"] / 1e3 <= s["seconds"] * (1 + 1e-6)
    assert doc["replay"]["ffn"][0] == {"hidden": 1024, "intermediate": 512, "dtype_bytes": 2}


def test_package_attribute_is_callable_before_and_after_import() -> None:
    import moeprof.replay.engine  # binds moeprof.replay to the package module

    trace = moeprof.synthesize(n_layers=1, n_requests=1, tokens_per_request=4, seed=0)
    result = moeprof.replay(trace, expert_bytes=256, calibrate=False, strategies="dedup")  # type: ignore[operator]
    assert result.runs[0].copies == analyze(trace, [8]).results[0].unique


@pytest.mark.parametrize("seed", range(4))
def test_up_front_slot_sizing_matches_the_schedules(seed: int) -> None:
    from moeprof.analyze import expert_masks, unique_per_batch
    from moeprof.replay.schedule import slots_needed

    trace = random_trace(np.random.default_rng(100 + seed))
    plan = plan_batches(trace, "tokens", 3)
    layers = list(range(trace.n_layers))
    unique_b = unique_per_batch(expert_masks(trace), plan)
    requests = np.array([lr.requests for lr in analyze(trace, [3]).results[0].layers])
    for strat in ("naive", "dedup", "lru"):
        sched = build_schedule(trace, plan, strat, layers, cache_experts=2)
        assert [ls.n_slots for ls in sched.layers] == slots_needed(strat, unique_b, 2, requests)


def test_cpu_backend_restores_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    trace = moeprof.synthesize(n_layers=1, n_requests=1, tokens_per_request=8, seed=0)
    cpu_replay(trace, calibrate=True, calibration_bytes=CAL)
    assert torch.get_num_threads() == before
    monkeypatch.setattr(engine_mod, "host_available_bytes", lambda: 1 << 20)
    with pytest.raises(MoeprofError):
        cpu_replay(trace, expert_bytes=None)
    assert torch.get_num_threads() == before


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
    assert strategy(row, "naive")["copies"] == arow["requests"]
    assert strategy(row, "dedup")["copies"] == arow["unique"]
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
        strategies="dedup",
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


def test_loaded_cudart_is_found_in_the_process_maps() -> None:
    from moeprof.replay import backends

    maps = (
        "7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/libc.so.6\n"
        "7f10-7f20 r-xp 00000000 08:01 2 /venv/nvidia/cuda_runtime/lib/libcudart.so.12\n"
        "7f20-7f30 r--p 00100000 08:01 2 /venv/nvidia/cuda_runtime/lib/libcudart.so.12\n"
        "7f30-7f40 rw-p 00000000 00:00 0 \n"
        "7f40-7f50 r-xp 00000000 08:01 3 /opt/lib/libcudart_static_helper.so\n"
        "7f50-7f60 r-xp 00000000 08:01 4 /venv/torch/lib/libtorch_cuda.so\n"
        "7f60-7f70 r-xp 00000000 08:01 5 /venv/torch/lib/libcudart-d0da41ae.so.11.0\n"
    )
    assert backends.loaded_cudart_paths(maps) == [
        "/venv/nvidia/cuda_runtime/lib/libcudart.so.12",
        "/venv/torch/lib/libcudart-d0da41ae.so.11.0",  # a wheel's renamed copy
        "/venv/torch/lib/libtorch_cuda.so",  # last: a statically linked runtime
    ]
    torch = pytest.importorskip("torch")
    if torch.version.cuda is None:  # a CPU-only torch never loads libcudart: nothing to clear
        assert backends.find_loaded_cudart() is None
        assert backends.cuda_clear_last_error() is None


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


def test_schedule_lists_are_built_before_the_timed_run(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    build = engine_mod._layer_lists

    def recording_build(schedule: Any) -> Any:
        events.append("lists")
        return build(schedule)

    class Ordered(Backend):
        def start_run(self) -> None:
            events.append("start_run")
            super().start_run()

    monkeypatch.setattr(engine_mod, "_layer_lists", recording_build)
    trace = moeprof.synthesize(n_layers=1, n_requests=2, tokens_per_request=8, seed=0)
    replay(trace, batch_sizes=[4], expert_bytes=256, calibrate=False, backend=Ordered())
    assert events == ["lists", "start_run"] * 3


def test_host_bound_needs_a_short_tail_too() -> None:
    """Issue time near device time also happens when a GPU-bound run fills CUDA's launch queue
    (the host blocks while issuing); then a queue's worth of work is left after issuing."""
    from moeprof.replay.engine import _host_bound

    assert _host_bound(0.95, 0.9502, 0.95)  # GPU done right after the last issue
    assert not _host_bound(9.7, 10.0, 10.0)  # queue full: 0.3 s of copies still queued
    assert not _host_bound(0.1, 1.0, 1.0)  # issued fast, GPU busy long after
    assert not _host_bound(0.0, 0.0, 0.0)  # nothing ran
