"""replay(): copy counts against analyze and an independent reference (conftest.reference_loads),
what each compute reads, the slot protocol against a simulated pair of CUDA streams, bad input,
refusals before any work, Ctrl-C, and (with CUDA) the GPU path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    REFERENCE_TRACES,
    cpu_replay,
    plan_rows,
    random_trace,
    reference_loads,
    strategy_entry,
)

import moeprof
from moeprof.analyze import analyze
from moeprof.batching import plan_batches
from moeprof.errors import MoeprofError
from moeprof.replay import ReplayInterrupted, replay
from moeprof.replay import engine as engine_mod
from moeprof.replay.backends import Backend
from moeprof.trace import Trace


def reference_copies(
    trace: Trace, policy: str, batch_size: int, strategy: str, layers: list[int], capacity: int = 0
) -> list[int]:
    """Copies per layer by the reference simulation over the policy's batches."""
    batches = plan_rows(plan_batches(trace, policy, batch_size))
    return [
        sum(
            copy
            for batch in reference_loads(trace, batches, strategy, layer, capacity)
            for _, copy, _ in batch
        )
        for layer in layers
    ]


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
        naive, dedup = strategy_entry(row, "naive"), strategy_entry(row, "dedup")
        assert naive["copies"] == arow["requests"]
        assert dedup["copies"] == arow["unique"]
        assert naive["layer_copies"] == [lr["requests"] for lr in arow["layers"]]
        assert dedup["layer_copies"] == [lr["unique"] for lr in arow["layers"]]
        assert naive["copies_match_counted"] and dedup["copies_match_counted"]
        assert naive["counted_basis"] == "analyze requests"
        assert dedup["counted_basis"] == "analyze unique"
        assert dedup["bytes_copied"] == 1024 * arow["unique"]
        # Full-size projection uses the trace's own expert bytes per layer.
        assert dedup["bytes_copied_full_size"] == arow["bytes_unique"]


@pytest.mark.parametrize("capacity", [0, 1, 3, 100])
def test_lru_against_the_reference(capacity: int) -> None:
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
        lru, dedup = strategy_entry(row, "lru"), strategy_entry(row, "dedup")
        expected = reference_copies(trace, "tokens", b, "lru", [0, 1], capacity)
        # Independent of the schedule: counted_copies (the LRU simulation) must equal it too.
        assert lru["layer_copies"] == expected and lru["counted_copies"] == sum(expected)
        assert lru["counted_basis"] == "LRU simulation"
        assert lru["copies"] + lru["hits"] == dedup["copies"]
        if capacity == 0:
            assert lru["layer_copies"] == dedup["layer_copies"]
        if capacity >= 8:  # everything fits: only cold misses
            distinct = [
                len(set(trace.expert_ids[:, layer].ravel().tolist()) - {8}) for layer in range(2)
            ]
            assert lru["layer_copies"] == distinct


@pytest.mark.parametrize("seed", range(4))
def test_every_strategy_against_the_reference_under_decode(seed: int) -> None:
    trace = random_trace(np.random.default_rng(11 + seed), n_tokens=50, n_layers=2, top_k=2)
    doc = cpu_replay(trace, batch_sizes=[3], policy="decode", cache_experts=2).to_dict()
    row = doc["results"][0]
    for name in ("naive", "dedup", "lru"):
        want = reference_copies(trace, "decode", 3, name, [0, 1], 2)
        assert strategy_entry(row, name)["layer_copies"] == want, name


def test_max_batches_and_layers_count_only_what_is_replayed() -> None:
    trace = moeprof.synthesize(n_layers=4, n_requests=5, tokens_per_request=30, zipf=1.0, seed=3)
    doc = cpu_replay(trace, batch_sizes=[4], max_batches=5, layers=[3, 1]).to_dict()
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
    assert strategy_entry(row, "dedup")["layer_copies"] == [
        expect["layers"][1]["unique"],
        expect["layers"][3]["unique"],
    ]
    assert strategy_entry(row, "naive")["copies"] == 20 * 2 * 2
    assert doc["replay"]["layers"] == [1, 3] and doc["replay"]["scaled_blocks"] is True


def test_max_batches_of_a_plan_in_stored_order_counts_those_batches() -> None:
    """One request decoded one token a step: the plan's rows are in stored order, like tokens
    batches; the first 3 batches are rows 0, 1 and 2 and nothing after them."""
    trace = Trace.from_arrays(np.arange(10).reshape(10, 1, 1) % 8, n_experts=8)
    doc = cpu_replay(trace, strategies=["dedup"], batch_sizes=[1], policy="decode", max_batches=3)
    row = doc.to_dict()["results"][0]
    assert (row["requests"], row["unique"], row["memory_savings"]) == (3, 3, 0.0)
    dedup = strategy_entry(row, "dedup")
    assert dedup["copies"] == 3 and dedup["copies_match_counted"]


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


@pytest.mark.parametrize("name", ["naive", "dedup", "lru"])
def test_compute_reads_the_expert_the_reference_issues(name: str) -> None:
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
    backend = CheckingBackend()
    replay(
        trace,
        strategies=[name],
        batch_sizes=[4],
        cache_experts=2,
        expert_bytes=512,
        compute=True,
        hidden_size=8,
        calibrate=False,
        backend=backend,
    )
    batches = plan_rows(plan_batches(trace, "tokens", 4))
    per_layer = [reference_loads(trace, batches, name, layer, 2) for layer in range(3)]
    expected = [
        (j, expert)
        for b in range(len(batches))
        for j in range(3)
        for expert, _, _ in per_layer[j][b]
    ]
    assert backend.computed == expected


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
    assert strategy_entry(row, "naive")["copies"] == 20_214
    assert strategy_entry(row, "dedup")["copies"] == 13_578
    lru = strategy_entry(row, "lru")
    full = cpu_replay(trace, policy="decode", batch_sizes=[4], cache_experts=4, layers=[0, 31])
    lru_full = strategy_entry(full.to_dict()["results"][0], "lru")
    assert lru_full["layer_copies"] == reference_copies(trace, "decode", 4, "lru", [0, 31], 4)
    assert lru["copies"] < strategy_entry(row, "dedup")["copies"]


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


# ---------------------------------------------------------------------- refusals


class NoWork(Backend):
    """Fails the test if replay() gets as far as the device."""

    def allocate_pools(self, n_experts: list[int], block_bytes: list[int]) -> None:
        raise AssertionError("must refuse before allocating")

    def calibrate(self, nbytes: int = 0, repeats: int = 5) -> Any:
        raise AssertionError("must refuse before calibrating")


@pytest.mark.parametrize(
    "kw,message",
    [
        (
            dict(strategies=["naive", "fast"]),
            "unknown strategy 'fast'; choose from naive, dedup, lru",
        ),
        (dict(strategies=[]), "no strategies given"),
        (dict(strategies="naive,dedup"), "strategies must be a list of names, not the text"),
        (dict(layers=[0, 5]), r"MoE layer 5 does not exist \(the trace has 2: 0\.\.1\)"),
        (dict(layers=["x"]), "MoE layer 'x' is not a whole number"),
        (dict(layers=[]), "no layers given"),
        (dict(layers="0,1"), "layers must be MoE layer numbers, not the text"),
        (dict(expert_bytes=0), "expert_bytes must be at least 1, got 0"),
        (dict(max_batches=0), "max_batches must be at least 1, got 0"),
        (dict(cache_experts=-1), "cache_experts must be 0 or more, got -1"),
        (dict(policy="random"), "unknown policy 'random'"),
        (dict(batch_sizes=[0]), "batch size must be at least 1, got 0"),
        (dict(batch_sizes="8"), "batch sizes must be whole numbers, not the text"),
        (dict(compute=True, hidden_size=0), "hidden_size must be at least 1, got 0"),
        (dict(compute=True, hidden_size=-4), "hidden_size must be at least 1, got -4"),
    ],
)
def test_bad_arguments_raise_before_any_work(kw: dict[str, Any], message: str) -> None:
    trace = moeprof.synthesize(n_layers=2, n_requests=2, tokens_per_request=8, seed=0)
    with pytest.raises(MoeprofError, match=message) as info:
        replay(trace, backend=NoWork(), **kw)
    assert "--" not in str(info.value)  # the library names parameters, not command-line options


def test_bad_device_is_refused() -> None:
    trace = moeprof.synthesize(n_layers=2, n_requests=2, tokens_per_request=8, seed=0)
    with pytest.raises(MoeprofError, match="unknown device 'tpu'"):
        replay(trace, calibrate=False, device="tpu")


def test_unknown_expert_size_needs_expert_bytes() -> None:
    trace = Trace.from_arrays(np.zeros((4, 1, 1), dtype=np.int64), n_experts=2)
    with pytest.raises(MoeprofError, match="does not record its expert size; pass expert_bytes"):
        replay(trace, calibrate=False)
    doc = replay(trace, calibrate=False, expert_bytes=256, strategies=["dedup"]).to_dict()
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
    replay(trace, calibrate=False, expert_bytes=4 << 20, strategies=["dedup"], max_batches=1)


def test_refuses_slots_larger_than_device_memory() -> None:
    trace = moeprof.synthesize(n_layers=2, n_requests=2, tokens_per_request=8, seed=0)
    with pytest.raises(MoeprofError, match="device slots"):
        replay(trace, calibrate=False, expert_bytes=32 << 20, backend=TinyDevice())


def test_slot_sizing_reads_each_strategy() -> None:
    """The up-front size is the slots each strategy then allocates: naive's ring and dedup's
    widest batch in one space shared by the layers, lru's cache plus widest batch per layer,
    added up."""
    trace = moeprof.synthesize(n_experts=8, top_k=2, n_layers=3, n_requests=2, seed=0)
    batches = plan_rows(plan_batches(trace, "tokens", 4))
    widest = [
        max(len(b) for b in reference_loads(trace, batches, "dedup", layer)) for layer in range(3)
    ]
    want = {"naive": 4, "dedup": max(widest), "lru": sum(w + 2 for w in widest)}

    class Sized(Backend):
        allocated: list[int]

        def allocate_slots(self, n_slots: int) -> None:
            self.allocated.append(n_slots)
            super().allocate_slots(n_slots)

    for name, n_slots in want.items():
        be = Sized()
        be.allocated = []
        doc = replay(
            trace,
            strategies=[name],
            batch_sizes=[4],
            cache_experts=2,
            expert_bytes=512,  # one aligned block: a slot is 512 bytes
            calibrate=False,
            backend=be,
        ).to_dict()
        assert be.allocated == [n_slots], name
        assert doc["replay"]["max_slot_bytes"] == n_slots * 512, name


def test_cuda_without_cuda_is_refused() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    trace = moeprof.synthesize(n_layers=1, n_requests=1, tokens_per_request=4, seed=0)
    with pytest.raises(MoeprofError, match="device cuda: "):
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


def test_cpu_backend_restores_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    trace = moeprof.synthesize(n_layers=1, n_requests=1, tokens_per_request=8, seed=0)
    cpu_replay(trace, calibrate=True, calibration_bytes=1 << 20)
    assert torch.get_num_threads() == before
    monkeypatch.setattr(engine_mod, "host_available_bytes", lambda: 1 << 20)
    with pytest.raises(MoeprofError, match="host memory"):
        cpu_replay(trace, expert_bytes=None)
    assert torch.get_num_threads() == before


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


def test_results_json_is_plain_json(tmp_path: Path) -> None:
    trace = moeprof.synthesize(n_layers=2, n_requests=2, tokens_per_request=8, seed=0)
    doc = cpu_replay(trace, batch_sizes=[4]).to_dict()
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    assert json.loads(path.read_text()) == doc


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
        naive, dedup = strategy_entry(row, "naive"), strategy_entry(row, "dedup")
        assert naive["copies"] == arow["requests"] and dedup["copies"] == arow["unique"]
        lru = strategy_entry(row, "lru")
        b = row["batch_size"]
        assert lru["layer_copies"] == reference_copies(trace, "tokens", b, "lru", [0, 1], 2)
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
