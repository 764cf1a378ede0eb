"""Bounded-memory recording: `record --shard-tokens N` / ``record(shard_tokens=, on_shard=)``.

Every check compares the shards with an unsharded recording of the same prompts on the demo
model (greedy, CPU: both runs make the same passes), concatenated here with each shard's request
ids shifted past the previous shards' requests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import moeprof  # noqa: E402
from moeprof import demo  # noqa: E402
from moeprof.errors import MoeprofError  # noqa: E402
from moeprof.record import record  # noqa: E402
from moeprof.record.run import (  # noqa: E402
    LoadedModel,
    ShardFiles,
    load_model,
    record_prompts,
    shard_path,
)
from moeprof.trace import Trace, load_trace  # noqa: E402

PROMPTS = 16
BATCH = 4
NEW_TOKENS = 4
SHARD_TOKENS = 200  # batches of the first demo prompts hold ~130 tokens: shards of 2 batches


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    torch.set_num_threads(1)
    return load_model(None, device="cpu")


@pytest.fixture(scope="module")
def whole(loaded: LoadedModel) -> Trace:
    """The unsharded recording every sharded one must reproduce."""
    return record_prompts(
        loaded, demo.prompts()[:PROMPTS], batch_size=BATCH, max_new_tokens=NEW_TOKENS
    ).trace


def _concatenate(shards: list[Trace]) -> dict[str, np.ndarray]:
    """The shards' rows one after another; request ids shifted so shards stay distinct."""
    out: dict[str, list[np.ndarray]] = {}
    offset = 0
    for shard in shards:
        cols = {
            "expert_ids": shard.expert_ids,
            "request_ids": shard.request_ids.astype(np.int64) + offset,
            "positions": shard.positions,
            "steps": shard.steps,
            "phase": shard.phase,
            "token_ids": shard.token_ids,
            "gate_weights": shard.gate_weights,
        }
        for name, value in cols.items():
            assert value is not None, name
            out.setdefault(name, []).append(np.asarray(value))
        offset += shard.n_requests
    return {name: np.concatenate(parts) for name, parts in out.items()}


def _rows(trace: Trace, keep: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The whole trace's columns (optionally only rows `keep`), request ids made dense again."""
    sel = np.arange(trace.n_tokens) if keep is None else np.flatnonzero(keep)
    cols = {
        "expert_ids": trace.expert_ids,
        "request_ids": trace.request_ids,
        "positions": trace.positions,
        "steps": trace.steps,
        "phase": trace.phase,
        "token_ids": trace.token_ids,
        "gate_weights": trace.gate_weights,
    }
    rows = {name: np.asarray(value)[sel] for name, value in cols.items() if value is not None}
    # Dense request numbers in order of first appearance (rows are request-major).
    _, first, dense = np.unique(rows["request_ids"], return_index=True, return_inverse=True)
    rows["request_ids"] = np.argsort(np.argsort(first))[dense]
    return rows


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(
            got[name].astype(np.float64), want[name].astype(np.float64), err_msg=name
        )


def _same_layout(shard: Trace, whole: Trace) -> None:
    assert shard.n_experts.tolist() == whole.n_experts.tolist()
    assert shard.expert_bytes.tolist() == whole.expert_bytes.tolist()
    assert shard.top_k == whole.top_k
    assert shard.moe_layer_indices == whole.moe_layer_indices
    assert shard.meta["model"] == whole.meta["model"]


def _batch_tokens(whole: Trace) -> list[int]:
    """Tokens of each batch of BATCH prompts (requests are numbered in prompt order)."""
    per_request = np.bincount(whole.request_ids)
    return [int(per_request[i : i + BATCH].sum()) for i in range(0, len(per_request), BATCH)]


def test_shards_are_valid_whole_requests_and_concatenate_to_the_unsharded_recording(
    loaded: LoadedModel, whole: Trace, tmp_path: Path
) -> None:
    out = tmp_path / "run.moe"
    files = ShardFiles(out)
    run = record_prompts(
        loaded,
        demo.prompts()[:PROMPTS],
        batch_size=BATCH,
        max_new_tokens=NEW_TOKENS,
        shard_tokens=SHARD_TOKENS,
        on_shard=files,
    )
    assert not run.interrupted and run.shards == len(files.written) >= 2
    assert not out.exists()
    paths = [info.path for info in files.written]
    assert paths == [shard_path(out, i) for i in range(len(paths))]
    assert [p.name for p in paths][:2] == ["run-00000.moe", "run-00001.moe"]
    shards = [load_trace(p) for p in paths]  # each one a valid trace file
    for i, shard in enumerate(shards):
        _same_layout(shard, whole)
        assert shard.meta["source"]["shard"] == i
        assert shard.meta["source"]["shard_tokens"] == SHARD_TOKENS
        # Whole requests: every request starts at position 0 in its shard.
        starts = np.flatnonzero(np.diff(shard.request_ids, prepend=-1) != 0)
        assert (shard.positions[starts] == 0).all()
    _assert_same(_concatenate(shards), _rows(whole))
    # Whole requests means the same request lengths, request by request.
    lengths = np.concatenate([np.bincount(s.request_ids) for s in shards])
    assert lengths.tolist() == np.bincount(whole.request_ids).tolist()
    # A shard is closed at the end of the batch during which it reached N tokens.
    batches = _batch_tokens(whole)
    ends = np.cumsum(batches)
    cuts = np.cumsum([s.n_tokens for s in shards])
    assert set(cuts.tolist()) <= set(ends.tolist())
    for shard in shards[:-1]:
        assert SHARD_TOKENS <= shard.n_tokens < SHARD_TOKENS + max(batches)
    passes = sum(int(s.meta["source"]["forward_passes"]) for s in shards)
    assert whole.steps is not None and passes == len(np.unique(whole.steps))
    # Read back as one logical trace (a glob of the shards), every analysis equals the
    # unsharded recording's.
    from moeprof.shards import load_traces

    logical = load_traces(str(tmp_path / "run-*.moe"))
    source = logical.meta["source"]  # the run's, not shard 0's
    assert source["forward_passes"] == passes and "shard" not in source
    assert source["prompts_completed"] == PROMPTS
    for policy in ("tokens", "decode", "recorded"):
        got = moeprof.analyze(logical, [1, 4, 16], policy).results
        assert got == moeprof.analyze(whole, [1, 4, 16], policy).results, policy


def _batch_first_steps(whole: Trace) -> list[int]:
    """The step at which each batch of BATCH prompts started."""
    assert whole.steps is not None
    batch_of_row = whole.request_ids // BATCH
    return [int(whole.steps[batch_of_row == b].min()) for b in range(int(batch_of_row.max()) + 1)]


def test_the_recorder_frees_its_buffers_after_each_shard(loaded: LoadedModel, whole: Trace) -> None:
    held: list[int] = []
    shards: list[Trace] = []
    inputs_per_batch = [demo.prompts()[i : i + BATCH] for i in range(0, PROMPTS, BATCH)]
    model, tokenizer = loaded.model, loaded.tokenizer
    with (
        torch.inference_mode(),
        record(
            model,
            shard_tokens=SHARD_TOKENS,
            on_shard=shards.append,
            on_step=lambda rec: held.append(rec.held_tokens),
        ) as rec,
    ):
        for prompts in inputs_per_batch:
            enc = tokenizer(prompts, padding=True, return_tensors="pt")
            model.generate(
                **enc,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        last = rec.take_trace()
    assert rec.held_tokens == 0
    assert len(shards) >= 2
    all_shards = [*shards, last] if last.n_tokens else shards
    _assert_same(_concatenate(all_shards), _rows(whole))
    # Held tokens after each pass, by brute force from the unsharded trace: everything recorded
    # since the last shard was cut (cuts fall between batches).
    assert whole.steps is not None
    per_step = np.bincount(whole.steps, minlength=int(whole.steps.max()) + 1)
    cut_after = set(np.cumsum([s.n_tokens for s in shards]).tolist())
    expected, total, since_cut = [], 0, 0
    for n in per_step:
        if total in cut_after:
            since_cut = 0
        total += int(n)
        since_cut += int(n)
        expected.append(since_cut)
    assert held == expected
    assert max(held) < SHARD_TOKENS + max(_batch_tokens(whole))


@pytest.mark.parametrize("where", ["on_step", "on_shard"])
def test_ctrl_c_keeps_the_finished_shards_and_writes_the_partial_one(
    loaded: LoadedModel, whole: Trace, tmp_path: Path, where: str
) -> None:
    """Ctrl-C during a pass of the third batch, or while the second shard is being stored."""
    out = tmp_path / "cut.moe"
    files = ShardFiles(out)
    stop_step = _batch_first_steps(whole)[2] + 1  # the 2nd pass of the 3rd batch
    calls = {"steps": 0, "shards": 0}

    def on_step(rec: Any) -> None:
        calls["steps"] += 1
        if where == "on_step" and calls["steps"] == stop_step + 1:
            raise KeyboardInterrupt

    def on_shard(trace: Trace) -> None:
        calls["shards"] += 1
        if where == "on_shard" and calls["shards"] == 2:
            raise KeyboardInterrupt  # before anything was written: the tokens stay held
        files(trace)

    run = record_prompts(
        loaded,
        demo.prompts()[:PROMPTS],
        batch_size=BATCH,
        max_new_tokens=NEW_TOKENS,
        shard_tokens=1,  # a shard per batch
        on_shard=on_shard,
        on_step=on_step,
    )
    assert run.interrupted
    shards = [load_trace(info.path) for info in files.written]
    assert [i.path for i in files.written] == [shard_path(out, i) for i in range(len(shards))]
    assert shards[-1].meta["source"]["interrupted"] is True
    assert whole.steps is not None
    if where == "on_step":
        # Two finished batches, then the partial third: its passes up to the interrupted one.
        assert [s.n_requests for s in shards] == [BATCH, BATCH, BATCH]
        keep = whole.steps <= stop_step
    else:
        # Ctrl-C while storing the 2nd batch's shard: it is written with the last (partial) one.
        assert [s.n_requests for s in shards] == [BATCH, BATCH]
        keep = whole.steps < _batch_first_steps(whole)[2]
    assert len(shards) == (3 if where == "on_step" else 2)
    _assert_same(_concatenate(shards), _rows(whole, keep))
    for shard in shards:
        _same_layout(shard, whole)


def test_shard_options_are_checked(loaded: LoadedModel) -> None:
    for bad in (0, -3):
        with pytest.raises(MoeprofError, match="shard_tokens must be at least 1"):
            record(loaded.model, shard_tokens=bad, on_shard=lambda t: None)
    with pytest.raises(MoeprofError, match="needs on_shard"):
        record(loaded.model, shard_tokens=10)


# ---------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("value", ["0", "-5"])
def test_cli_shard_tokens_below_one_is_one_line(run_cli: Any, tmp_path: Path, value: str) -> None:
    out = tmp_path / "x.moe"
    res = run_cli("record", "--shard-tokens", value, "-o", out)
    assert res.exit_code == 2
    assert "--shard-tokens must be at least 1" in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_shards_and_replaces_an_older_runs_only_with_force(
    run_cli: Any, tmp_path: Path, whole: Trace
) -> None:
    out = tmp_path / "cli.moe"
    stale = shard_path(out, 7)
    stale.write_bytes(b"an older run")
    args = ["record", "--limit", str(PROMPTS), "-b", str(BATCH), "-n", str(NEW_TOKENS)]
    args += ["--device", "cpu", "--shard-tokens", str(SHARD_TOKENS), "-o", out]
    res = run_cli(*args)
    assert res.exit_code == 2 and "--force" in res.stderr and str(stale) in res.stderr
    assert stale.read_bytes() == b"an older run"
    res = run_cli(*args, "--force")
    assert res.exit_code == 0, res.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [shard_path(out, i).name for i in range(len(names))]  # the stale one is gone
    shards = [load_trace(tmp_path / n) for n in names]
    _assert_same(_concatenate(shards), _rows(whole))
    assert f"{whole.n_tokens:,} (prefill" in res.stdout and f"{len(names)} shard(s)" in res.stdout


def test_cli_ctrl_c_names_the_partial_shard(
    run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, whole: Trace
) -> None:
    from moeprof.record.recorder import Recorder

    original = Recorder._finish
    calls = {"n": 0}
    second = _batch_first_steps(whole)[1]

    def finish_then_interrupt(self: Recorder, p: Any) -> None:
        calls["n"] += 1
        if calls["n"] == second + 2:  # Ctrl-C during the 2nd pass of the 2nd batch
            raise KeyboardInterrupt
        original(self, p)

    monkeypatch.setattr(Recorder, "_finish", finish_then_interrupt)
    out = tmp_path / "cut.moe"
    res = run_cli(
        "record", "--limit", str(PROMPTS), "-b", str(BATCH), "-n", str(NEW_TOKENS),
        "--device", "cpu", "--shard-tokens", "1", "-o", out,
    )  # fmt: skip
    assert res.exit_code == 130
    partial = shard_path(out, 1)
    assert "interrupted" in res.stderr and f"partial shard {partial}" in res.stderr
    shards = [load_trace(shard_path(out, 0)), load_trace(partial)]
    assert not shard_path(out, 2).exists()
    assert whole.steps is not None
    _assert_same(_concatenate(shards), _rows(whole, whole.steps <= second))
