"""moeprof.record: request/position/step bookkeeping, hooks lifecycle, adapters, no per-layer sync."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import moeprof  # noqa: E402
from moeprof.errors import MoeprofError  # noqa: E402
from moeprof.record import Adapter, Recorder, find_moe_layers, register_adapter, unregister_adapter  # noqa: E402
from moeprof.trace import load_trace  # noqa: E402


def tiny_qwen3(**overrides: Any) -> Any:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        mlp_only_layers=[1],  # model layer 1 is dense: MoE layers are model layers 0 and 2
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".gate." in name:
                p.mul_(50.0)  # decisive routing (no near-ties)
    return model


def gate_capture(model: Any) -> tuple[list[list[torch.Tensor]], list[Any]]:
    """The test's own capture: top-k ids from each MoE gate's output, per call."""
    calls: list[list[torch.Tensor]] = []
    handles = []
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(gate, "top_k"):
            continue
        store: list[torch.Tensor] = []
        calls.append(store)
        handles.append(gate.register_forward_hook(lambda m, a, o, s=store: s.append(o[2].clone())))
    return calls, handles


def hook_count(model: Any) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------------------- generate
def test_generate_rows_positions_phases_and_eos() -> None:
    model = tiny_qwen3()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids = ids.masked_fill(mask == 0, 0)
    new = 6
    # Pick as end token what row 0 generates second: row 0 then stops early, the others go on.
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    eos = int(free[0, ids.shape[1] + 1])
    calls, handles = gate_capture(model)
    with moeprof.record_routing(model, settings={"note": "test"}) as rec:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    for h in handles:
        h.remove()
    trace = rec.to_trace()

    # Expected tokens per request, from generate's own output: the prompt without padding, then
    # every generated token that was fed back, up to (not including) the end token.
    gen = out[:, ids.shape[1] :]
    expected_tokens = []
    for b in range(3):
        fed = []
        for tok in gen[b, :-1].tolist():  # the last generated token is never fed back
            if tok == eos:
                break
            fed.append(tok)
        expected_tokens.append(ids[b][mask[b].bool()].tolist() + fed)
    assert trace.n_requests == 3
    for b in range(3):
        rows = trace.request_ids == b
        assert trace.token_ids is not None and trace.token_ids[rows].tolist() == expected_tokens[b]
        assert trace.positions[rows].tolist() == list(range(len(expected_tokens[b])))
        n_prompt = int(mask[b].sum())
        assert trace.phase is not None and trace.phase[rows].tolist() == [0] * n_prompt + [1] * (
            len(expected_tokens[b]) - n_prompt
        )
        assert trace.steps is not None
        assert trace.steps[rows].tolist() == [0] * n_prompt + list(
            range(1, len(expected_tokens[b]) - n_prompt + 1)
        )
    assert len(expected_tokens[0]) == int(mask[0].sum()) + 1  # row 0 really stopped early

    # Ids: the gate's top-k at the rows that were recorded (same mapping as the tokens).
    assert trace.moe_layer_indices == [0, 2]
    for layer, layer_calls in enumerate(calls):
        want = []
        step_ids = [c.reshape(3, -1, 2) for c in layer_calls]
        for b in range(3):
            n_prompt = int(mask[b].sum())
            want.append(step_ids[0][b][mask[b].bool()])
            n_dec = len(expected_tokens[b]) - n_prompt
            want.extend(step_ids[s][b] for s in range(1, n_dec + 1))
        np.testing.assert_array_equal(trace.expert_ids[:, layer], torch.cat(want).numpy())
    assert trace.meta["source"]["note"] == "test"
    assert trace.meta["source"]["kind"] == "record"


def test_separate_forwards_are_separate_requests_and_steps() -> None:
    model = tiny_qwen3()
    a = torch.randint(1, 64, (2, 5))
    b = torch.randint(1, 64, (1, 4))
    with torch.no_grad(), moeprof.record_routing(model) as rec:
        model(input_ids=a, use_cache=False)
        model(b)  # positional input_ids
    trace = rec.to_trace()
    assert trace.n_requests == 3 and trace.n_tokens == 14
    assert trace.steps is not None and trace.steps.tolist() == [0] * 10 + [1] * 4
    assert trace.phase is not None and not trace.phase.any()
    assert trace.token_ids is not None
    np.testing.assert_array_equal(
        trace.token_ids, torch.cat([a.reshape(-1), b.reshape(-1)]).numpy()
    )


def test_manual_kv_cache_loop_continues_requests() -> None:
    model = tiny_qwen3()
    prompt = torch.randint(1, 64, (2, 4))
    with torch.no_grad(), moeprof.record_routing(model) as rec:
        out = model(input_ids=prompt, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        model(input_ids=nxt, cache=out.past_key_values, use_cache=True)
    trace = rec.to_trace()
    assert trace.n_requests == 2
    assert trace.positions.tolist() == [0, 1, 2, 3, 4] * 2
    assert trace.phase is not None and trace.phase.tolist() == [0, 0, 0, 0, 1] * 2


def test_inputs_embeds_records_without_token_ids() -> None:
    model = tiny_qwen3()
    embeds = model.get_input_embeddings()(torch.randint(1, 64, (2, 3)))
    with torch.no_grad(), moeprof.record_routing(model) as rec:
        model(inputs_embeds=embeds)
    trace = rec.to_trace()
    assert trace.n_tokens == 6 and trace.token_ids is None


def test_empty_recording_is_a_valid_trace(tmp_path: Any) -> None:
    model = tiny_qwen3()
    with moeprof.record_routing(model) as rec:
        pass
    trace = rec.to_trace()
    assert trace.n_tokens == 0 and trace.n_layers == 2 and trace.top_k == 2
    trace.save(tmp_path / "empty.moe")
    assert load_trace(tmp_path / "empty.moe").n_tokens == 0


# ---------------------------------------------------------------------------- lifecycle
def test_hooks_detach_on_exit_and_on_error() -> None:
    model = tiny_qwen3()
    before = hook_count(model)
    with moeprof.record_routing(model) as rec:
        assert hook_count(model) == before + 2 + 2  # 2 MoE layers + begin/end of pass
        assert "generate" in model.__dict__
    assert hook_count(model) == before and "generate" not in model.__dict__
    assert not rec.attached
    with pytest.raises(ValueError, match="boom"):
        with moeprof.record_routing(model):
            model(input_ids=torch.randint(1, 64, (1, 3)))
            raise ValueError("boom")
    assert hook_count(model) == before and "generate" not in model.__dict__


def test_failed_forward_pass_is_dropped() -> None:
    model = tiny_qwen3()
    layer2 = model.model.layers[2].mlp
    original = layer2.forward
    with torch.no_grad(), moeprof.record_routing(model) as rec:
        layer2.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("mid-pass"))
        with pytest.raises(RuntimeError, match="mid-pass"):
            model(input_ids=torch.randint(1, 64, (2, 3)))
        layer2.forward = original
        model(input_ids=torch.randint(1, 64, (1, 4)))
    trace = rec.to_trace()
    assert trace.n_tokens == 4 and trace.n_requests == 1


def test_model_without_moe_layers_is_a_clear_error() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    dense = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(MoeprofError, match="LlamaForCausalLM has no MoE layer"):
        moeprof.record_routing(dense)
    with pytest.raises(MoeprofError, match="torch.nn.Module"):
        moeprof.record_routing("not a model")  # type: ignore[arg-type]


def test_record_routing_is_the_function_not_the_package() -> None:
    import types

    import moeprof.record as package
    from moeprof.record import record

    # Importing the package binds moeprof.record to it; the lazy export has its own name.
    assert isinstance(package, types.ModuleType) and not callable(package)
    assert moeprof.record_routing is record
    assert isinstance(moeprof.record_routing(tiny_qwen3()), Recorder)


# ---------------------------------------------------------------------------- metadata, sizes
def test_metadata_sizes_and_roundtrip(tmp_path: Any) -> None:
    model = tiny_qwen3().to(torch.bfloat16)
    with (
        torch.no_grad(),
        moeprof.record_routing(model, model_id="org/tiny", revision="abc123") as rec,
    ):
        model(input_ids=torch.randint(1, 64, (2, 3)))
    trace = rec.to_trace()
    trace.save(tmp_path / "t.moe")
    back = load_trace(tmp_path / "t.moe")
    # One routed Qwen3 expert: gate+up [2*16, 32] and down [32, 16], bf16 = 2 bytes.
    assert back.expert_bytes.tolist() == [3 * 16 * 32 * 2] * 2
    assert back.meta["model"] == {
        "id": "org/tiny",
        "architecture": "Qwen3MoeForCausalLM",
        "revision": "abc123",
    }
    assert back.meta["moe_layer_indices"] == [0, 2]
    assert back.meta["shared_expert_bytes"] == 0
    assert back.meta["source"]["expert_dtype"] == "bfloat16"
    assert back.meta["source"]["moe_modules"] == [
        "model.layers.0.mlp.experts",
        "model.layers.2.mlp.experts",
    ]
    assert back.meta["library_versions"]["transformers"]
    assert back.gate_weights is not None and back.gate_weights.dtype == np.float16
    np.testing.assert_array_equal(back.expert_ids, trace.expert_ids)


# ---------------------------------------------------------------------------- adapters
class ToyMoe(torch.nn.Module):
    """A custom MoE block no built-in adapter knows: router + a ModuleList of experts."""

    def __init__(self, hidden: int = 8, n_experts: int = 5, k: int = 2) -> None:
        super().__init__()
        self.router = torch.nn.Linear(hidden, n_experts, bias=False)
        self.experts = torch.nn.ModuleList(
            torch.nn.Linear(hidden, hidden) for _ in range(n_experts)
        )
        self.k = k
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = torch.softmax(self.router(flat), -1).topk(self.k, dim=-1)
        self.last = (ids, weights)
        out = torch.zeros_like(flat)
        for slot in range(self.k):
            for e, expert in enumerate(self.experts):
                sel = ids[:, slot] == e
                out[sel] += weights[sel, slot, None] * expert(flat[sel])
        return out.reshape(x.shape)


class ToyModel(torch.nn.Module):
    def __init__(self, ks: tuple[int, ...] = (2, 2)) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.blocks = torch.nn.ModuleList(ToyMoe(k=k) for k in ks)
        self.skip_last = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            if self.skip_last and i == len(self.blocks) - 1:
                continue  # e.g. an early exit: this MoE layer does not run
            h = h + block(h)
        return h


@pytest.fixture
def toy_adapter() -> Any:
    def routing(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        ids, weights = module.last
        return ids, weights

    adapter = register_adapter(
        Adapter(
            name="toy",
            matches=lambda name, module, parent: isinstance(module, ToyMoe),
            routing=routing,
            n_experts=lambda module, parent: len(module.experts),
            hook="post",
            expert_modules=lambda module, parent: [module.experts],
        )
    )
    yield adapter
    unregister_adapter("toy")


def test_registered_adapter_records_a_custom_model(toy_adapter: Adapter) -> None:
    model = ToyModel()
    assert moeprof.record.adapters()[0] is toy_adapter
    ids = torch.randint(0, 16, (3, 4))
    with torch.no_grad(), moeprof.record_routing(model) as rec:
        model(ids)
        seen = [block.last[0].clone() for block in model.blocks]  # type: ignore[index]
    trace = rec.to_trace()
    assert trace.n_experts.tolist() == [5, 5] and trace.moe_layer_indices == [0, 1]
    for layer in range(2):
        np.testing.assert_array_equal(trace.expert_ids[:, layer], seen[layer].numpy())
    # One Linear(8, 8) expert: 8*8 weights + 8 biases, fp32.
    assert trace.expert_bytes.tolist() == [(64 + 8) * 4] * 2
    assert trace.meta["source"]["adapter"] == "toy"


def test_layers_with_fewer_slots_or_skipped_get_the_sentinel(toy_adapter: Adapter) -> None:
    model = ToyModel(ks=(2, 1))
    with torch.no_grad(), moeprof.record_routing(model) as rec:
        model(torch.randint(0, 16, (1, 3)))
        k1 = model.blocks[1].last[0].clone()  # type: ignore[index]
        model.skip_last = True
        model(torch.randint(0, 16, (1, 2)))
    trace = rec.to_trace()
    assert trace.top_k == 2 and trace.n_tokens == 5
    first = trace.request_ids == 0
    np.testing.assert_array_equal(trace.expert_ids[first, 1, 0], k1[:, 0].numpy())
    assert (trace.expert_ids[first, 1, 1] == 5).all()  # missing slot: sentinel = expert count
    assert (trace.expert_ids[~first, 1] == 5).all()  # the layer did not run
    assert trace.gate_weights is not None and np.isnan(trace.gate_weights[~first, 1]).all()


def test_adapter_can_be_forced_by_name() -> None:
    model = tiny_qwen3()
    assert find_moe_layers(model, "fused-experts")[0].name == "model.layers.0.mlp.experts"
    with pytest.raises(MoeprofError, match="no adapter named 'nope'"):
        find_moe_layers(model, "nope")
    with pytest.raises(MoeprofError, match="no MoE layer"):
        find_moe_layers(model, "llama4")


def test_register_adapter_rejects_non_adapters() -> None:
    with pytest.raises(
        MoeprofError, match=r"register_adapter\(\) takes a moeprof\.record\.Adapter"
    ):
        register_adapter("x")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- overhead
def test_layer_hooks_do_not_touch_host_memory() -> None:
    """Layer hooks on meta tensors: any .item()/.cpu()/bool() would raise. Only the end of a pass copies."""
    model = tiny_qwen3()
    rec = Recorder(model)
    rec.attach()
    try:
        meta_ids = torch.zeros(2, 3, dtype=torch.long, device="meta")
        rec._begin_pass(
            model, (), {"input_ids": meta_ids, "attention_mask": torch.ones(2, 3, device="meta")}
        )
        for layer in rec.layers:
            hooks = list(layer.module._forward_pre_hooks.values())
            assert len(hooks) == 1
            x = torch.zeros(6, 32, device="meta")
            top_ids = torch.zeros(6, 2, dtype=torch.long, device="meta")
            top_w = torch.zeros(6, 2, device="meta")
            hooks[0](layer.module, (x, top_ids, top_w), {})
        assert rec._active is not None
        assert all(len(c) == 1 and c[0][0].is_meta for c in rec._active.captures)
        with pytest.raises((NotImplementedError, RuntimeError)):
            rec._finish(rec._active)  # the single host copy of the step happens here
    finally:
        rec.detach()


def _record_generate(model: Any, eos: int) -> Any:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 64, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :4] = 0
    with moeprof.record_routing(model) as rec:
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=5,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return rec.to_trace()


def test_packed_copy_path_gives_the_same_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accelerator passes go through one packed int64 copy; run that path on the CPU and compare."""
    model = tiny_qwen3()
    eos = 5  # a token this model generates: some rows stop early, so end-token handling runs too
    direct = _record_generate(model, eos)
    monkeypatch.setattr(Recorder, "_host_step", Recorder._copied_step)
    packed = _record_generate(model, eos)
    assert direct.n_tokens == packed.n_tokens > 0
    assert direct.phase is not None and int((direct.phase == 1).sum()) < 3 * 4  # rows stopped
    for name in ("expert_ids", "request_ids", "positions", "steps", "phase", "token_ids"):
        np.testing.assert_array_equal(getattr(direct, name), getattr(packed, name), err_msg=name)
    assert direct.gate_weights is not None and packed.gate_weights is not None
    np.testing.assert_array_equal(
        direct.gate_weights.view(np.uint16), packed.gate_weights.view(np.uint16)
    )


def test_each_generate_call_keeps_its_own_end_tokens() -> None:
    """Steps are counted later (when n_tokens or the trace is asked for); a step must still be
    judged by the end token of its own generate() call, not by a later call's."""
    model = tiny_qwen3()
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    free = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    eos = int(free[0, 5 + 1])  # row 0's second generated token: row 0 stops after 1 token
    unused = next(t for t in range(3, 64) if t not in free.tolist()[0] + free.tolist()[1])

    def run(peek: bool) -> Any:
        with moeprof.record_routing(model) as rec:
            for end in (eos, unused):
                model.generate(
                    input_ids=ids,
                    max_new_tokens=6,
                    do_sample=False,
                    eos_token_id=end,
                    pad_token_id=0,
                )
                if peek:
                    assert rec.n_tokens > 0
        return rec.to_trace()

    late, early = run(peek=False), run(peek=True)
    for trace in (late, early):
        per_request = np.bincount(trace.request_ids).tolist()
        assert per_request[0] == 5 + 1 and per_request[2:] == [10, 10]  # 5 prompt + 5 fed
    np.testing.assert_array_equal(late.expert_ids, early.expert_ids)
    np.testing.assert_array_equal(late.token_ids, early.token_ids)


def test_ctrl_c_while_steps_are_counted_or_unpacked_loses_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counting and unpacking run late (a progress callback, to_trace); a Ctrl-C in the middle
    of either must leave every step to be worked off by the next call."""
    model = tiny_qwen3()
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(1))

    def recorded() -> Any:
        rec = moeprof.record_routing(model)
        with rec:
            model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        return rec

    want = recorded().to_trace()

    def interrupt_on(calls: list[int], at: int, real: Any) -> Any:
        def fn(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == at:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        return fn

    rec = recorded()
    with monkeypatch.context() as m:
        m.setattr(np, "cumsum", interrupt_on([], 3, np.cumsum))  # in the 3rd step's count
        with pytest.raises(KeyboardInterrupt):
            _ = rec.n_tokens
    with monkeypatch.context() as m:
        m.setattr(Recorder, "_unpack", interrupt_on([], 4, Recorder._unpack))
        with pytest.raises(KeyboardInterrupt):
            rec.to_trace()
    got = rec.to_trace()
    assert got.n_tokens == want.n_tokens == rec.n_tokens
    for name in ("expert_ids", "request_ids", "positions", "steps", "token_ids"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def test_a_pass_without_new_tokens_records_nothing() -> None:
    model = tiny_qwen3()
    with torch.no_grad(), moeprof.record_routing(model) as rec:
        rec._begin_pass(
            model,
            (),
            {"input_ids": torch.zeros(2, 0, dtype=torch.long), "attention_mask": torch.ones(2, 4)},
        )
        for layer in rec.layers:
            hook = next(iter(layer.module._forward_pre_hooks.values()))
            ids = torch.zeros(0, 2, dtype=torch.long)
            hook(layer.module, (torch.zeros(0, 32), ids, torch.zeros(0, 2)), {})
        assert rec._active is not None
        rec._finish(rec._active)
    assert rec.n_passes == 1 and rec.n_tokens == 0 and rec.to_trace().n_tokens == 0


def test_inputs_reused_in_place_after_a_pass_do_not_change_the_trace() -> None:
    """A serving loop may refill its input buffers; the recorder keeps its own copy of each step."""
    model = tiny_qwen3()
    ids = torch.randint(1, 64, (2, 4), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 0] = 0
    want_tokens = torch.cat([ids[0], ids[1, 1:]]).tolist()
    with torch.no_grad(), moeprof.record_routing(model) as rec:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        ids.fill_(5)
        mask.fill_(1)
        assert rec.n_tokens == 7
        trace = rec.to_trace()
    assert trace.token_ids is not None and trace.token_ids.tolist() == want_tokens
    assert trace.positions.tolist() == [0, 1, 2, 3, 0, 1, 2]


@pytest.mark.gpu
def test_cuda_layer_hooks_never_synchronise() -> None:
    model = tiny_qwen3().cuda()
    ids = torch.randint(1, 64, (2, 5), device="cuda")
    with torch.no_grad(), moeprof.record_routing(model) as rec:
        rec._begin_pass(model, (), {"input_ids": ids})
        torch.cuda.set_sync_debug_mode("error")
        try:
            for layer in rec.layers:
                hook = next(iter(layer.module._forward_pre_hooks.values()))
                hook(
                    layer.module,
                    (
                        torch.zeros(10, 32, device="cuda"),
                        torch.zeros(10, 2, dtype=torch.long, device="cuda"),
                        torch.zeros(10, 2, device="cuda"),
                    ),
                    {},
                )
        finally:
            torch.cuda.set_sync_debug_mode("default")
        rec._active = None
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    trace = rec.to_trace()
    assert trace.n_tokens == 10 + 2 * 3
    np.testing.assert_array_equal(
        trace.token_ids[trace.phase == 1].reshape(2, 3), out[:, 5:8].cpu().numpy()
    )


def test_docs_python_examples_run(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "record.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"docs/record.md block {i}", "exec"), {})
    finally:
        unregister_adapter("my-moe")
    assert load_trace(tmp_path / "mine.moe").n_requests == 4


def test_a_layer_that_never_ran_is_left_out_and_named(toy_adapter: Adapter) -> None:
    # E.g. the vision experts of a model with per-modality experts, on text-only input.
    model = ToyModel(ks=(2, 2, 2))
    model.skip_last = True
    with torch.no_grad(), moeprof.record_routing(model) as rec:
        model(torch.randint(0, 16, (2, 3)))
        seen = [block.last[0].clone() for block in model.blocks[:2]]  # type: ignore[index]
    trace = rec.to_trace()
    assert trace.n_layers == 2 and trace.moe_layer_indices == [0, 1]
    assert trace.n_experts.tolist() == [5, 5] and len(trace.expert_bytes) == 2
    for layer in range(2):
        np.testing.assert_array_equal(trace.expert_ids[:, layer], seen[layer].numpy())
    assert trace.meta["source"]["moe_modules"] == ["blocks.0", "blocks.1"]
    assert trace.meta["source"]["moe_modules_not_run"] == ["blocks.2"]


def test_no_layer_firing_at_all_is_still_an_error(toy_adapter: Adapter) -> None:
    model = ToyModel(ks=(2,))
    model.skip_last = True  # a kernel that bypasses every hooked module looks like this
    with torch.no_grad(), moeprof.record_routing(model) as rec:
        model(torch.randint(0, 16, (1, 3)))
    with pytest.raises(MoeprofError, match="routing hook of blocks.0 never fired"):
        rec.to_trace()


class _SwitchExperts(torch.nn.Module):
    num_experts = 4

    def forward(self, hidden_states: Any, selected_experts: Any, routing_weights: Any) -> Any:
        return hidden_states


class _NllbExperts(torch.nn.Module):
    num_experts = 4

    def forward(self, hidden_states: Any, router_mask: Any, router_probs: Any) -> Any:
        return hidden_states


def test_one_hot_masks_become_ids_and_dropped_tokens_no_expert() -> None:
    from moeprof.record.adapters import ONE_HOT, find_adapter

    # Switch: [N, 1, E] one-hot, token 2 dropped by capacity (all zeros).
    mask = torch.tensor([[[0, 0, 1, 0]], [[1, 0, 0, 0]], [[0, 0, 0, 0]]])
    probs = torch.tensor([[0.7], [0.6], [0.9]])
    ids, weights = ONE_HOT.routing(_SwitchExperts(), (None, mask, probs), {}, None)
    assert ids.tolist() == [[2], [0], [4]]
    assert weights is not None
    np.testing.assert_allclose(weights.numpy(), [[0.7], [0.6], [0.9]])
    # NLLB-MoE: top-1 mask [N, E] and combine weights [N, E]; token 1 lost its second expert,
    # token 2 its first (capacity), so its only expert is the second.
    top1 = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    combine = torch.tensor([[0.0, 0.6, 0.0, 0.4], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.3, 0.0]])
    ids, weights = ONE_HOT.routing(
        _NllbExperts(), (None,), {"router_mask": top1, "router_probs": combine}, None
    )
    assert ids.tolist() == [[1, 3], [3, 4], [4, 2]]
    assert weights is not None
    np.testing.assert_allclose(weights.numpy(), [[0.6, 0.4], [1.0, 0.0], [0.0, 0.3]])
    holder = torch.nn.Module()
    holder.experts = _NllbExperts()
    assert find_adapter(holder)[0].name == "one-hot"


def test_models_without_per_token_routing_are_refused_with_the_reason() -> None:
    class DogeCDMoE(torch.nn.Module):  # the class name is what moeprof recognises
        pass

    model = torch.nn.Module()
    model.mlp = DogeCDMoE()
    with pytest.raises(MoeprofError, match=r"product-key retrieval .*\(DogeCDMoE at mlp\)"):
        moeprof.record_routing(model)
