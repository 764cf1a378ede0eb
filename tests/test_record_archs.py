"""Recorded routing vs routing captured independently, on tiny random-weight models of many architectures.

Each model is built from its transformers config (hidden 32, 2-3 layers, 4-8 experts), run once
as a padded prefill and once through greedy ``generate``. The test captures the routing on its
own: from the router's outputs (a separate hook on the gate), and, where the router is a plain
softmax/top-k or the model routes outside a fused experts module (Llama 4, DBRX, JetMoe), by
recomputing top-k from the router's captured inputs. Expert and shared-expert bytes are checked
against the sizes the config implies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import moeprof  # noqa: E402

H = 32  # hidden size of every tiny model
BASE: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=H,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
)


@dataclass
class Spec:
    model_type: str
    config: dict[str, Any]
    n_experts: int
    top_k: int
    moe_layers: list[int]
    expert_inter: int  # intermediate size of one routed expert
    expert_extra: int = 0  # extra per-expert elements (biases)
    shared_inter: int = 0  # intermediate size of the layer's shared experts (0 = none)
    reference: str = "gate"  # how the test captures routing on its own
    router: str = "gate"  # attribute of the MoE block holding the router
    block_attr: str = "mlp"
    extra: dict[str, Any] = field(default_factory=dict)


SPECS: dict[str, Spec] = {
    "mixtral": Spec(
        "mixtral",
        dict(num_local_experts=4, num_experts_per_tok=2),
        4,
        2,
        [0, 1],
        64,
        reference="softmax-topk",
    ),
    "qwen2_moe": Spec(
        "qwen2_moe",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
        ),
        4,
        2,
        [0, 1],
        16,
        shared_inter=32,
        reference="softmax-topk",
    ),
    "qwen3_moe": Spec(
        "qwen3_moe",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16),
        8,
        2,
        [0, 1],
        16,
        reference="softmax-topk",
    ),
    "olmoe": Spec(
        "olmoe",
        dict(num_experts=8, num_experts_per_tok=2, pad_token_id=1, eos_token_id=2),
        8,
        2,
        [0, 1],
        64,
        reference="softmax-topk",
    ),
    "deepseek_v2": Spec(
        "deepseek_v2",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            num_hidden_layers=3,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
            topk_method="greedy",
            num_key_value_heads=4,
        ),
        8,
        2,
        [1, 2],
        16,
        shared_inter=16,
    ),
    "deepseek_v3": Spec(
        "deepseek_v3",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=2,
            first_k_dense_replace=1,
            num_hidden_layers=3,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_group=2,
            topk_group=1,
            num_key_value_heads=4,
        ),
        8,
        2,
        [1, 2],
        16,
        shared_inter=32,
    ),
    "gpt_oss": Spec(
        "gpt_oss",
        dict(
            num_local_experts=4,
            num_experts_per_tok=2,
            intermediate_size=32,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=16,
            pad_token_id=1,
            eos_token_id=2,
        ),
        4,
        2,
        [0, 1],
        32,
        expert_extra=2 * 32 + H,
        router="router",
    ),
    "llama4_text": Spec(
        "llama4_text",
        dict(
            num_local_experts=4,
            num_experts_per_tok=1,
            intermediate_size_mlp=64,
            moe_layers=[1],
            no_rope_layers=[1, 1],
            pad_token_id=1,
            eos_token_id=2,
        ),
        4,
        1,
        [1],
        64,
        shared_inter=64,
        reference="llama4",
        router="router",
        block_attr="feed_forward",
    ),
    "dbrx": Spec(
        "dbrx",
        dict(
            d_model=H,
            n_heads=4,
            n_layers=2,
            max_seq_len=128,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2},
        ),
        4,
        2,
        [0, 1],
        16,
        reference="dbrx",
        router="router",
        block_attr="ffn",
    ),
    "jetmoe": Spec(
        "jetmoe",
        dict(num_local_experts=4, num_experts_per_tok=2, kv_channels=8),
        4,
        2,
        [0, 1],
        64,
        reference="jetmoe",
        router="router",
    ),
    "granitemoe": Spec(
        "granitemoe",
        dict(num_local_experts=4, num_experts_per_tok=2),
        4,
        2,
        [0, 1],
        64,
        router="router",
        block_attr="block_sparse_moe",
    ),
    "granitemoeshared": Spec(
        "granitemoeshared",
        dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32),
        4,
        2,
        [0, 1],
        64,
        shared_inter=32,
        router="router",
        block_attr="block_sparse_moe",
    ),
    "phimoe": Spec(
        "phimoe",
        dict(num_local_experts=4, num_experts_per_tok=2),
        4,
        2,
        [0, 1],
        64,
        router="router",
    ),
    "ernie4_5_moe": Spec(
        "ernie4_5_moe",
        dict(
            moe_num_experts=4,
            moe_k=2,
            moe_intermediate_size=16,
            moe_num_shared_experts=1,
            moe_layer_start_index=0,
        ),
        4,
        2,
        [0, 1],
        16,
        shared_inter=16,
    ),
    "glm4_moe": Spec(
        "glm4_moe",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
        ),
        8,
        2,
        [1],
        16,
        shared_inter=16,
    ),
    "hunyuan_v1_moe": Spec(
        "hunyuan_v1_moe",
        dict(num_experts=4, moe_topk=2, moe_intermediate_size=16),
        4,
        2,
        [0, 1],
        64,
        shared_inter=64,
    ),
    "minimax": Spec(
        "minimax",
        dict(
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["full_attention", "full_attention"],
            pad_token_id=1,
            eos_token_id=2,
            bos_token_id=None,
        ),
        4,
        2,
        [0, 1],
        64,
        reference="softmax-topk",
    ),
    "flex_olmo": Spec(
        "flex_olmo",
        dict(
            num_experts=4, num_experts_per_tok=2, pad_token_id=1, eos_token_id=2, bos_token_id=None
        ),
        4,
        2,
        [0, 1],
        64,
    ),
    "dots1": Spec(
        "dots1",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
        ),
        8,
        2,
        [1],
        16,
        shared_inter=16,
    ),
}


def build(spec: Spec) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(BASE)
    kwargs.update(spec.config)
    config = AutoConfig.for_model(spec.model_type, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    # Random routers at init std 0.02 give near-ties between experts; scale them up so top-k is
    # decisive and a float rounding difference cannot flip a choice in the reference.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in (".gate.", ".router.", "gate.weight", "router.weight")):
                p.mul_(50.0)
    return model


class Reference:
    """Routing captured by the test itself, per MoE layer and per call: (ids [N, k], weights [N, k])."""

    def __init__(self, model: Any, spec: Spec) -> None:
        self.calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.handles: list[Any] = []
        blocks = [
            (i, getattr(layer, spec.block_attr))
            for i, layer in enumerate(_decoder_layers(model))
            if i in spec.moe_layers
        ]
        for i, block in blocks:
            router = getattr(block, spec.router)
            self.calls[i] = []
            self.handles.append(router.register_forward_hook(self._hook(i, spec, router, block)))

    def _hook(self, layer: int, spec: Spec, router: Any, block: Any) -> Any:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            if spec.reference == "llama4":
                logits = x @ router.weight.float().T
                top, ids = torch.topk(logits, spec.top_k, dim=1)
                weights = torch.sigmoid(top)
            elif spec.reference == "dbrx":
                probs = torch.softmax(output.float(), dim=1)
                top, ids = torch.topk(probs, spec.top_k, dim=1)
                p = block.moe_normalize_expert_weights
                weights = top / torch.norm(top, p=p, dim=-1, keepdim=True) if p is not None else top
            elif spec.reference == "jetmoe":
                logits = x @ router.layer.weight.float().T
                top, ids = logits.topk(spec.top_k, dim=1)
                weights = torch.softmax(top, dim=1)
            else:
                ints = [o for o in output if torch.is_tensor(o) and not o.is_floating_point()]
                ids = ints[-1]
                weights = next(
                    o
                    for o in output
                    if torch.is_tensor(o) and o.is_floating_point() and o.shape == ids.shape
                )
                if spec.reference == "softmax-topk":
                    # Independent of the router's own outputs: recompute from its input.
                    logits = x @ module.weight.float().T
                    _, again = torch.topk(torch.softmax(logits, dim=1), spec.top_k, dim=1)
                    assert torch.equal(again, ids), "router top-k disagrees with a recomputation"
            self.calls[layer].append((ids.detach().clone(), weights.detach().float().clone()))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _decoder_layers(model: Any) -> Any:
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    return getattr(base, "layers", None) or base.blocks


def _prompt_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as batched generation does
    mask[2, :5] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _expected_rows(
    calls: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Reference ids/weights in the trace's request-major order: per row, prompt then decode steps."""
    batch, seq = mask.shape
    ids0, w0 = calls[0]
    per_row_ids = [[ids0.reshape(batch, seq, -1)[b][mask[b].bool()]] for b in range(batch)]
    per_row_w = [[w0.reshape(batch, seq, -1)[b][mask[b].bool()]] for b in range(batch)]
    for ids, w in calls[1:]:
        for b in range(batch):
            per_row_ids[b].append(ids.reshape(batch, 1, -1)[b])
            per_row_w[b].append(w.reshape(batch, 1, -1)[b])
    ids_all = torch.cat([torch.cat(r) for r in per_row_ids]).numpy()
    w_all = torch.cat([torch.cat(r) for r in per_row_w]).numpy()
    return ids_all, w_all


@pytest.mark.parametrize("arch", sorted(SPECS))
def test_recorded_routing_matches_independent_capture(arch: str) -> None:
    spec = SPECS[arch]
    model = build(spec)
    ids, mask = _prompt_batch()
    ref = Reference(model, spec)
    new_tokens = 3
    with torch.no_grad(), moeprof.record_routing(model) as rec:
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # no row stops early: every decode step is real work
            do_sample=False,
            pad_token_id=0,
        )
    ref.remove()
    assert not rec.attached
    trace = rec.to_trace()

    # Shape and placement.
    n_prompt = int(mask.sum())
    n_decode = 3 * (new_tokens - 1)  # the last generated token is never fed back
    assert trace.n_tokens == n_prompt + n_decode
    assert trace.n_layers == len(spec.moe_layers)
    assert trace.moe_layer_indices == spec.moe_layers
    assert trace.n_experts.tolist() == [spec.n_experts] * len(spec.moe_layers)
    assert trace.top_k == spec.top_k
    assert trace.n_requests == 3
    assert trace.meta["model"]["architecture"] == type(model).__name__

    # Routing, layer by layer, against the test's own capture.
    for l_idx, model_layer in enumerate(spec.moe_layers):
        calls = ref.calls[model_layer]
        assert len(calls) == new_tokens  # prefill + decode passes
        want_ids, want_w = _expected_rows(calls, mask)
        np.testing.assert_array_equal(
            trace.expert_ids[:, l_idx, :], want_ids, err_msg=f"{arch} L{l_idx}"
        )
        assert trace.gate_weights is not None
        np.testing.assert_allclose(
            trace.gate_weights[:, l_idx, :].astype(np.float32), want_w, rtol=2e-3, atol=2e-3
        )

    # Token bookkeeping: prompt positions without padding, steps, phases.
    first = trace.request_ids == 0
    assert trace.positions[first].tolist() == list(range(4 + new_tokens - 1))
    assert trace.phase is not None and trace.steps is not None
    assert int((trace.phase == 0).sum()) == n_prompt
    assert set(trace.steps[trace.phase == 1].tolist()) == {1, 2}
    assert trace.token_ids is not None
    np.testing.assert_array_equal(trace.token_ids[trace.phase == 0], ids[mask.bool()].numpy())

    # Bytes of one routed expert / of the shared experts, from the config (fp32 weights).
    expected_expert = (3 * H * spec.expert_inter + spec.expert_extra) * 4
    assert trace.expert_bytes.tolist() == [expected_expert] * len(spec.moe_layers)
    assert trace.meta["shared_expert_bytes"] == 3 * H * spec.shared_inter * 4


def test_at_least_ten_architectures() -> None:
    assert len(SPECS) >= 10
