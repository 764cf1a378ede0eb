"""Import of SGLang per_token expert-distribution dumps (moeprof/importers/sglang.py): a simulated
scheduler's dump round-trips, sequence linking matches the sequential rule, bad dumps are refused."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pytest

import moeprof
from moeprof.errors import MoeprofError
from moeprof.importers import import_trace
from moeprof.importers.sglang import link_sequences
from moeprof.synth import synthesize


def simulate_sglang(
    trace,
    *,
    prompt_len: list[int],
    max_running: int,
    chunk: int,
    n_model_layers: int,
    physical_of: list[np.ndarray],
    seed: int = 0,
) -> dict:
    """An SGLang per_token dump of `trace`'s requests under continuous batching with chunked
    prefill, written the way _DetailSinglePassGatherer / _DetailAccumulator write it."""
    import torch

    rng = np.random.default_rng(seed)
    first = np.searchsorted(trace.request_ids, np.arange(trace.n_requests))
    length = np.diff(np.append(first, trace.n_tokens))
    waiting = deque(range(trace.n_requests))
    prefilling: list[int] = []
    running: list[int] = []
    done_upto = {r: 0 for r in range(trace.n_requests)}  # tokens already run
    records = []
    while waiting or prefilling or running:
        if prefilling or (waiting and len(running) + len(prefilling) < max_running):
            batch = list(prefilling)
            while waiting and len(batch) + len(running) < max_running and len(batch) < 2:
                batch.append(waiting.popleft())
            seqs = [(r, min(chunk, prompt_len[r] - done_upto[r])) for r in batch]
            mode, seq_lens = 1, [n for _, n in seqs]
        else:
            seqs, mode, seq_lens = [(r, 1) for r in running], 2, None
        rows, positions = [], []
        for r, n in seqs:
            rows.extend(first[r] + done_upto[r] + np.arange(n))
            positions.extend(done_upto[r] + np.arange(n))
            done_upto[r] += n
        prefilling = [r for r, _ in seqs if mode == 1 and done_upto[r] < prompt_len[r]]
        finished_prefill = [r for r, _ in seqs if mode == 1 and done_upto[r] == prompt_len[r]]
        running = [r for r in running if done_upto[r] < length[r]] + [
            r for r in finished_prefill if done_upto[r] < length[r]
        ]
        rows_arr = np.asarray(rows)
        topk = np.full((n_model_layers, len(rows), 8), -1, dtype=np.int32)
        for layer in range(trace.n_layers):
            logical = trace.expert_ids[rows_arr, layer].astype(np.int64)
            replicas = physical_of[layer][logical]  # [n, k, replicas]
            pick = rng.integers(0, replicas.shape[-1], logical.shape)
            topk[trace.moe_layer_indices[layer], :, : trace.top_k] = np.take_along_axis(
                replicas, pick[..., None], axis=-1
            )[..., 0]
        records.append(
            dict(
                forward_pass_id=len(records) + 100,
                rank=0,
                gatherer_key="primary",
                input_ids=trace.token_ids[rows_arr].tolist(),
                positions=[int(p) for p in positions],
                extend_seq_lens=seq_lens,
                forward_mode=mode,
                topk_ids_of_layer=torch.from_numpy(topk),
                misc_objects=[],
                global_physical_count=torch.zeros((n_model_layers, 10), dtype=torch.int32),
            )
        )
    return {"records": records}


def physical_layout(n_layers: int, n_model_layers: int, moe_layers: list[int], seed: int):
    """EPLB-style layout: 10 physical slots for 8 logical experts (two replicated)."""
    rng = np.random.default_rng(seed)
    to_logical = np.zeros((n_model_layers, 10), dtype=np.int64)
    physical_of = []
    for layer in range(n_layers):
        logical_of_slot = rng.permutation(
            np.concatenate([np.arange(8), rng.choice(8, 2, replace=False)])
        )
        to_logical[moe_layers[layer]] = logical_of_slot
        replicas = np.zeros((8, 2), dtype=np.int64)
        for e in range(8):
            slots = np.flatnonzero(logical_of_slot == e)
            replicas[e] = [slots[0], slots[-1]]
        physical_of.append(replicas)
    return to_logical, physical_of


def test_sglang_per_token_dump_round_trip(tmp_path: Path) -> None:
    import torch

    n_requests = 7
    source = synthesize(
        n_experts=8,
        top_k=2,
        n_layers=3,
        n_requests=n_requests,
        tokens_per_request=[9, 14, 6, 11, 20, 8, 13],
        seed=3,
    )
    lengths = np.bincount(source.request_ids)
    token_ids = np.random.default_rng(5).integers(0, 30000, source.n_tokens)
    source = moeprof.Trace.from_arrays(
        source.expert_ids,
        n_experts=8,
        request_ids=source.request_ids,
        positions=source.positions,
        token_ids=token_ids,
        meta={"moe_layer_indices": [1, 2, 3]},
    )
    # Lockstep pairs occur (requests 0 and 1 prefill side by side); no request finishes while
    # another stands at its position, the one case positions cannot tell apart (see sglang.py).
    prompt_len = [5, 8, 3, 7, 11, 2, 6]
    to_logical, physical_of = physical_layout(3, 4, [1, 2, 3], seed=1)
    dump = simulate_sglang(
        source,
        prompt_len=prompt_len,
        max_running=3,
        chunk=4,
        n_model_layers=4,
        physical_of=physical_of,
    )
    dump["last_physical_to_logical_map"] = torch.from_numpy(to_logical)
    path = tmp_path / "expert_distribution_recorder_1700000000.0_0.pt"
    torch.save(dump, path)

    trace = import_trace(path)  # sglang, from the .pt ending
    assert trace.n_requests == n_requests and trace.n_tokens == source.n_tokens
    assert trace.moe_layer_indices == [1, 2, 3]  # layer 0 never routes: dense
    assert trace.top_k == 2 and trace.n_experts.tolist() == [8, 8, 8]
    # Requests come out in order of first appearance, which is the scheduler's arrival order.
    assert (trace.request_ids == source.request_ids).all()
    assert (trace.positions == source.positions).all()
    assert (trace.expert_ids == source.expert_ids).all()  # physical ids mapped back to logical
    assert trace.token_ids is not None and (trace.token_ids == token_ids).all()
    assert trace.phase is not None
    expected_phase = np.where(source.positions >= np.asarray(prompt_len)[source.request_ids], 1, 0)
    assert (trace.phase == expected_phase).all()
    # Steps are the forward passes: the recorded policy replays them.
    steps_seen = {int(s) for s in trace.steps} if trace.steps is not None else set()
    assert steps_seen == {r["forward_pass_id"] for r in dump["records"]}
    assert lengths.tolist() == np.bincount(trace.request_ids).tolist()


def reference_links(passes: list[tuple[int, list[tuple[int, int]]]]) -> list[int]:
    """The linking rule written out one sequence at a time, to check the vectorised one.

    passes: (forward mode, [(start position, length), ...] in batch order)."""
    open_requests: list[dict] = []  # {"req", "next", "key", "decoding"}
    out: list[int] = []
    n_requests = 0
    for f, (mode, seqs) in enumerate(passes):
        roles = [mode == 2 or (mode == 3 and n == 1 and s > 0) for s, n in seqs]
        taken: list[dict] = []
        result: dict[int, tuple[int, tuple[int, int]]] = {}
        for role in (True, False):  # decode tokens match first, then extend chunks
            for i, (start, _length) in enumerate(seqs):
                if roles[i] != role or start == 0:
                    continue
                waiting = [
                    o
                    for o in open_requests
                    if o["next"] == start and o not in taken and (role or not o["decoding"])
                ]
                if waiting:
                    # Decode: batch order. A chunk: the latest pass first, then batch order.
                    match = min(
                        waiting, key=lambda o: o["key"] if role else (-o["key"][0], o["key"][1])
                    )
                    taken.append(match)
                    result[i] = (match["req"], match["key"] if role else (f, i))
        seen = []
        for i, (start, length) in enumerate(seqs):
            if i not in result:
                result[i] = (n_requests, (f, i))
                n_requests += 1
            req, key = result[i]
            out.append(req)
            seen.append({"req": req, "next": start + length, "key": key, "decoding": roles[i]})
        if mode in (2, 3):
            open_requests = seen  # a decode pass runs every running request
        else:
            open_requests = [o for o in open_requests if o not in taken] + seen
    return out


def test_link_sequences_matches_sequential_rule() -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        n_pass = int(rng.integers(1, 12))
        passes = []
        for _ in range(n_pass):
            mode = int(rng.choice([1, 2, 3]))
            n = int(rng.integers(1, 6))
            seqs = [
                (int(rng.integers(0, 5) * rng.integers(0, 2)), int(rng.integers(1, 3)))
                for _ in range(n)
            ]
            passes.append((mode, seqs))
        seq_pass = np.array([f for f, (_, seqs) in enumerate(passes) for _ in seqs])
        seq_start = np.array([s for _, seqs in passes for s, _ in seqs])
        seq_len = np.array([n for _, seqs in passes for _, n in seqs])
        modes = np.array([m for m, _ in passes])
        got = link_sequences(seq_pass, seq_start, seq_len, modes).tolist()
        assert got == reference_links(passes)


def test_sglang_bad_dumps(tmp_path: Path) -> None:
    import torch

    torch.save({"logical_count": torch.zeros(3)}, tmp_path / "stat.pt")
    with pytest.raises(MoeprofError, match=r"stat\.pt: no 'records' in the dump; .*per_token"):
        import_trace(tmp_path / "stat.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(MoeprofError, match=r"junk\.pt: not a readable torch\.save dump"):
        import_trace(tmp_path / "junk.pt")

    class Evil:
        def __reduce__(self):  # weights_only refuses arbitrary objects: no code runs
            return (print, ("pwned",))

    torch.save({"records": [Evil()]}, tmp_path / "evil.pt")
    with pytest.raises(MoeprofError, match=r"evil\.pt: not a readable torch\.save dump"):
        import_trace(tmp_path / "evil.pt")
    rec = {
        "forward_pass_id": 0,
        "positions": [0, 1],
        "input_ids": [1, 2],
        "forward_mode": 1,
        "extend_seq_lens": [2],
        "topk_ids_of_layer": torch.full((2, 3, 8), -1, dtype=torch.int32),
    }
    torch.save({"records": [rec]}, tmp_path / "short.pt")
    with pytest.raises(MoeprofError, match=r"short\.pt: record 0: 2 positions for 3 tokens"):
        import_trace(tmp_path / "short.pt")


def test_sglang_hostile_records(tmp_path: Path) -> None:
    import torch

    ids = torch.full((2, 3, 8), -1, dtype=torch.int32)
    ids[1, :, 0], ids[1, :, 1] = 0, 1

    def rec(**kw: object) -> dict:
        return {
            "topk_ids_of_layer": ids,
            "positions": torch.tensor([0, 1, 2]),
            "forward_mode": 1,
            **kw,
        }

    def refused(dump: object, match: str) -> None:
        torch.save(dump, tmp_path / "d.pt")
        with pytest.raises(MoeprofError, match=rf"d\.pt: {match}"):
            import_trace(tmp_path / "d.pt", "sglang")

    refused({"records": [rec(forward_mode="extend")]}, "record 0: forward_mode must be")
    refused({"records": [rec(forward_pass_id="x")]}, "record 0: forward_pass_id must be")
    refused({"records": [rec(forward_pass_id=2**70)]}, "record 0: forward_pass_id .*int64")
    refused({"records": [rec(forward_pass_id=[1, 2])]}, "record 0: forward_pass_id must be one")
    refused({"records": [rec(topk_ids_of_layer=ids.to_sparse())]}, "record 0: .* dense tensor")
    refused({"records": [rec(topk_ids_of_layer=ids.float())]}, "record 0: .* integers")
    refused({"records": [rec(topk_ids_of_layer=[[["a"]]])]}, "record 0: topk_ids_of_layer")
    refused({"records": [rec(positions=[[0, 1, 2]])]}, "record 0: positions must have 1 dim")
    refused({"records": [rec(positions=["a", "b", "c"])]}, "record 0: positions must hold")
    refused({"records": [rec(positions=[0, [1], 2])]}, "record 0: positions is not a list")
    refused({"records": [rec(positions=None)]}, "record 0: positions is missing")
    refused({"records": [rec(positions=[0, -1, 0])]}, "record 0: positions must not be negative")
    refused({"records": [rec(input_ids="abc")]}, "record 0: input_ids must be integers")
    refused({"records": [rec(extend_seq_lens=[4, -1])]}, "record 0: extend_seq_lens must not")
    refused({"records": [rec(extend_seq_lens="3")]}, "record 0: extend_seq_lens must be")
    bad_map = torch.zeros((2, 2), dtype=torch.int64)
    bad_map[1, 1] = -2
    refused({"records": [rec()], "last_physical_to_logical_map": bad_map}, "last_physical.*-2")
    refused({"records": [rec()], "last_physical_to_logical_map": "x"}, "last_physical.*must be")

    # A tensor of sequence lengths (what SGLang writes) is fine.
    torch.save({"records": [rec(extend_seq_lens=torch.tensor([2, 1]))]}, tmp_path / "ok.pt")
    trace = import_trace(tmp_path / "ok.pt", "sglang")
    assert trace.n_tokens == 3 and trace.request_ids.tolist() == [0, 0, 1]
