"""Every MoE model type of the installed transformers records exactly, or is refused by name.

The test finds the MoE model types by itself (a config class, or one of its sub-configs, with an
expert-count field or an MoE switch), builds each tiny from its config (hidden 32, 2 layers,
8 experts, top-2; per-type fixes in ``OVERRIDES``), runs ``generate`` under
``moeprof.record.record`` and compares the trace with the routing an independent forward hook on
each router module saw (ids and gate weights). A type that fails is a test failure unless
``NOT_PER_TOKEN`` lists it with its reason; moeprof must then refuse it with that reason.
So a transformers upgrade that adds or changes an MoE architecture fails here.

``python tests/test_record_coverage.py`` prints the supported-architecture table of
``docs/record.md`` from the same runs.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.auto import configuration_auto, modeling_auto  # noqa: E402

from moeprof.errors import MoeprofError  # noqa: E402
from moeprof.record import record  # noqa: E402

EXPERT_COUNT_FIELDS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "num_routed_experts",
    "moe_num_experts",
)
MOE_SWITCH_FIELDS = ("enable_moe_block", "is_moe")
TOP_K_FIELDS = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_k",
    "moe_topk",
    "top_k_experts",
    "moe_top_k",
)
N_EXPERTS = 8
TOP_K = 2
VOCAB = 256
MAX_PARAMS = 8_000_000
NEW_TOKENS = 3
# Values given to every config field of these names (model and sub-configs), when it has one.
SMALL: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "d_model": 32,
    "intermediate_size": 64,
    "ffn_hidden_size": 64,
    "d_ff": 64,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_layers": 2,
    "n_layers": 2,
    "num_decoder_layers": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "depth": 1,
    "num_attention_heads": 4,
    "n_heads": 4,
    "num_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "d_kv": 8,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "out_hidden_size": 32,
    "vocab_size_per_layer_input": VOCAB,  # Gemma 4's per-layer embeddings
    "hidden_size_per_layer_input": 8,
    "expert_ffn_hidden_size": 16,
    "index_head_dim": 8,  # sparse-attention indexers (DeepSeek-V3.2 style)
    "index_n_heads": 2,
    "adapter_in_dim": 32,  # vision adapters: encoder width in, text width out
    "adapter_input_size": 32,
    "adapter_out_dim": 32,
    "per_layer_config": {},  # per-layer size exceptions name layers of the full model
    "max_position_embeddings": 256,
    "first_k_dense_replace": 0,
    "mlp_only_layers": [],
    "decoder_sparse_step": 1,
    "n_group": 2,
    "num_expert_group": 2,
    "topk_group": 1,
    "enable_moe_block": True,
    "is_moe": True,
    **{f: N_EXPERTS for f in EXPERT_COUNT_FIELDS},
    **{f: TOP_K for f in TOP_K_FIELDS},
}
SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True)
class Override:
    """Per-type fixes to the generic tiny build: config values (``sub`` for a sub-config, by its
    dotted path: ``"talker_config.text_config"``)."""

    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    sub: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    slow: bool = False
    generate: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra generate() kwargs


OVERRIDES: dict[str, Override] = {
    # Part features are carved out of the hidden size (default 256 of 768).
    "vitpose_backbone": Override(config={"part_features": 8, "num_experts": 2}),
    # The modeling code reads attn_config.rope_theta, which the attention config does not declare.
    "dbrx": Override(
        sub={"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}}
    ),
    # One attention layer then one Mamba layer with experts (defaults: attention every 8th).
    "jamba": Override(config={"attn_layer_period": 2, "attn_layer_offset": 0}),
    # LongCat-Flash routes over its experts plus identity "zero experts" (256 by default).
    "longcat_flash": Override(config={"zero_expert_num": 2}),
    "dots1": Override(config={"n_shared_experts": 1}),
    # Two dense layers by default, and no layer pattern (the model reads it per layer).
    "lfm2_moe": Override(config={"num_dense_layers": 0, "layer_types": ["conv", "full_attention"]}),
}
# Qwen4-Exp's indexed attention needs its sparse-attention indexer sized (all None by default).
_QWEN4_INDEXER = {
    "indexer_n_heads": 2,
    "indexer_kv_heads": 1,
    "indexer_head_dim": 8,
    "indexer_budget": 8,
    "indexer_compress_ratio": 2,
}
# Multimodal RoPE sections the modeling code defaults to full size when the config has none;
# they must add up to half the rotary dims (Ernie: h and w sections equal).
_ERNIE_ROPE = {"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [1, 1, 2]}
OVERRIDES["ernie4_5_vl_moe"] = Override(sub={"text_config": {"rope_parameters": _ERNIE_ROPE}})
_GLM4V_TEXT = {
    "head_dim": 16,  # rotary dims 8 with the partial factor 0.5: sections add up to 4
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": [2, 1, 1],
    },
}
OVERRIDES["glm4v_moe"] = Override(sub={"text_config": _GLM4V_TEXT})
OVERRIDES["glm4v_moe_text"] = Override(config=_GLM4V_TEXT)
OVERRIDES.update(
    {
        # Mamba-2 heads must tile expand * hidden (2 * 32).
        "granitemoehybrid": Override(
            config={
                "mamba_n_heads": 4,
                "mamba_d_head": 16,
                "mamba_d_state": 16,
                # All Mamba by default: keep one attention layer so the KV cache has a length.
                "layer_types": ["full_attention", "linear_attention"],
            }
        ),
        "mistral4": Override(config={"head_dim": 16}),  # rope dims = head_dim * 0.5 = 8
        "zaya": Override(config={"num_experts_per_tok": 1}),  # it supports top-1 only
        # Its audio encoder needs one patch size per layer (4 given).
        "muse_spark": Override(
            config={"projector_hidden_size": 32},
            sub={
                "audio_config": {
                    "num_hidden_layers": 4,
                    "hidden_sizes": [16, 16, 16, 16],
                    "depths": [1, 1, 1, 1],
                }
            },
        ),
        "inkling2_text": Override(config={"unpadded_vocab_size": VOCAB}),
        "inkling2_loop_text": Override(config={"unpadded_vocab_size": VOCAB}),
        "inkling2": Override(
            sub={
                "text_config": {"unpadded_vocab_size": VOCAB},
                "vision_config": {"text_hidden_size": 32},
            }
        ),
        "inkling2_loop": Override(
            sub={
                "text_config": {"unpadded_vocab_size": VOCAB},
                "vision_config": {"text_hidden_size": 32},
            }
        ),
    }
)
# GLM-5-Next's sparse-attention layers take no RoPE.
_GLM5_TEXT = {"qk_rope_head_dim": 0, "linear_head_dim": 8}
OVERRIDES["glm5_next_text"] = Override(config=_GLM5_TEXT)
OVERRIDES["glm5_next"] = Override(sub={"text_config": _GLM5_TEXT})
# dots3's sliding-window layers use plain heads as wide as the MLA query heads (8 + 8).
OVERRIDES["dots3_note_text"] = Override(config={"head_dim": 16})
OVERRIDES["dots3_note"] = Override(sub={"text_config": {"head_dim": 16}})
OVERRIDES["step3p7"] = Override(sub={"text_config": {"sliding_window": 4}})  # None by default
# One hash-routed layer (experts fixed per token id) and one learned top-k layer.
OVERRIDES["deepseek_v4"] = Override(config={"mlp_layer_types": ["hash_moe", "moe"]})
# Its text config has no mlp_layer_types default, which the model reads per layer.
OVERRIDES["deepseek_ocr2"] = Override(
    sub={"text_config": {"mlp_layer_types": ["sparse", "sparse"]}}
)
# Attributes the modeling code reads that the configs do not declare.
OVERRIDES["qwen3_omni_moe_thinker"] = Override(config={"vision_start_token_id": 210})
OVERRIDES["qwen3_omni_moe"] = Override(
    config={"enable_audio_output": False},  # text generation only: the thinker's MoE
    generate={"thinker_max_new_tokens": NEW_TOKENS},  # its generate() takes per-part lengths
    sub={
        "thinker_config": {"vision_start_token_id": 210},
        "talker_config": {"spatial_merge_size": 2},
        # Speech side: never run by text generation, but built; keep it small.
        "code2wav_config": {"decoder_dim": 16, "codebook_size": 16, "num_quantizers": 2},
        "thinker_config.audio_config": {"downsample_hidden_size": 8, "output_dim": 32},
        "talker_config.text_config": {"shared_expert_intermediate_size": 32},
    },
)
OVERRIDES["qwen4_exp_text"] = Override(config=_QWEN4_INDEXER)
OVERRIDES["qwen4_exp"] = Override(sub={"text_config": _QWEN4_INDEXER})

# Types whose experts are not chosen per token: moeprof refuses them with a line naming the reason
# (checked below), and docs/record.md lists them.
NOT_PER_TOKEN: dict[str, str] = {
    "diffusion_gemma": "it routes a fixed diffusion canvas of positions, not the input tokens",
    "diffusion_gemma_text": "it routes a fixed diffusion canvas of positions, not the input tokens",
    "doge": "its experts are product-key retrieval (keys looked up per token), not a routed top-k",
    "vitpose_backbone": "its experts are chosen per dataset (dataset_index), not per token",
}


# ---------------------------------------------------------------------------- discovery
def _config_fields(cls: type) -> set[str]:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return names | set(getattr(cls, "__annotations__", {}))


def _nested_configs(cls: type, depth: int = 3) -> list[type]:
    subs = [c for c in getattr(cls, "sub_configs", {}).values() if isinstance(c, type)]
    if depth == 0:
        return subs
    return subs + [n for c in subs for n in _nested_configs(c, depth - 1)]


def _is_moe_config(cls: type) -> bool:
    for c in [cls, *_nested_configs(cls)]:
        if isinstance(c, type) and _config_fields(c) & {*EXPERT_COUNT_FIELDS, *MOE_SWITCH_FIELDS}:
            return True
    return False


def discover_moe_types() -> list[str]:
    """MoE model types of the installed transformers, from their config classes alone."""
    found = []
    for model_type in sorted(configuration_auto.CONFIG_MAPPING_NAMES):
        try:
            cls = configuration_auto.CONFIG_MAPPING[model_type]
        except Exception:  # a config module that does not import (missing optional deps)
            continue
        if _is_moe_config(cls):
            found.append(model_type)
    return found


# ---------------------------------------------------------------------------- tiny builds
def _small_values(default: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """Config kwargs making `default` (a config instance) tiny."""
    have = default.to_dict()
    kwargs: dict[str, Any] = {}
    for name, value in SMALL.items():
        if name not in have:
            continue
        old = have[name]
        if isinstance(old, (list, tuple)) and isinstance(value, int) and old:
            value = [value] * len(old)  # per-layer or per-modality lists keep their length
        kwargs[name] = value
    for name, value in SPECIAL_TOKENS.items():
        if name in have:
            kwargs[name] = value
    spare = 200
    for name, old in have.items():
        if name in SPECIAL_TOKENS or not name.endswith(("_token_id", "_token_index")):
            continue
        if isinstance(old, int) and old >= 128:  # image/audio tokens: inside the vocab, never fed
            kwargs[name] = spare
            spare += 1
    rope = have.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list):
        # Multimodal RoPE sections add up to half the rotary dims, which shrank with head_dim.
        factor = rope.get("partial_rotary_factor") or have.get("partial_rotary_factor") or 1.0
        half = int(SMALL["head_dim"] * factor) // 2
        n = len(rope["mrope_section"])
        section = [half // n] * n
        section[0] += half - sum(section)
        kwargs["rope_parameters"] = {**rope, "mrope_section": section}
    if "kv_lora_rank" in have and "num_key_value_heads" in have:
        kwargs["num_key_value_heads"] = SMALL["num_attention_heads"]  # MLA: one KV head per head
    layers = kwargs.get("num_hidden_layers")
    if isinstance(have.get("mlp_layer_types"), list) and isinstance(layers, int):
        # The last layers: leading dense layers would leave no MoE.
        kwargs["mlp_layer_types"] = have["mlp_layer_types"][-layers:]
    if isinstance(have.get("layer_types"), list) and isinstance(layers, int):
        # Keep a window of the hybrid pattern ending on an attention layer, so the KV cache has a
        # length to measure.
        pattern = have["layer_types"]
        attention = [i for i, t in enumerate(pattern) if "attention" in t and "linear" not in t]
        end = attention[-1] + 1 if attention and attention[-1] + 1 >= layers else len(pattern)
        kwargs["layer_types"] = pattern[end - layers : end]
    kwargs.update(extra)
    return kwargs


def _tiny_kwargs(default: Any, override: Override, path: str = "") -> dict[str, Any]:
    """Kwargs for a tiny `default`, its sub-configs (and theirs) made tiny too."""
    kwargs = _small_values(default, override.config if not path else override.sub.get(path, {}))
    for sub_name in getattr(type(default), "sub_configs", {}):
        sub = getattr(default, sub_name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            kwargs[sub_name] = _tiny_kwargs(sub, override, f"{path}.{sub_name}".lstrip("."))
    return kwargs


def tiny_config(model_type: str) -> Any:
    cls = configuration_auto.CONFIG_MAPPING[model_type]
    return cls(**_tiny_kwargs(cls(), OVERRIDES.get(model_type, Override())))


def model_class(model_type: str) -> tuple[Any, str]:
    """The auto class to build `model_type` with, and how it is run."""
    if model_type in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForSeq2SeqLM, "generate"
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM, "generate"
    if model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return transformers.AutoModelForImageTextToText, "generate"
    if model_type in modeling_auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForMultimodalLM, "generate"
    if model_type in modeling_auto.MODEL_FOR_BACKBONE_MAPPING_NAMES:
        return transformers.AutoBackbone, "forward"
    return transformers.AutoModel, "forward"


_ROUTER_NAME = re.compile(r"(Router|Gate|Gating)$")


def build(model_type: str) -> tuple[Any, str]:
    auto, how = model_class(model_type)
    config = tiny_config(model_type)
    with torch.device("meta"):  # count first: a sub-config left at full size would take GBs
        n_params = sum(p.numel() for p in auto.from_config(config).parameters())
    if n_params > MAX_PARAMS:
        raise AssertionError(f"{model_type}: the tiny build has {n_params:,} parameters")
    torch.manual_seed(0)
    model = auto.from_config(config).eval()
    # Routers at init std 0.02 give near-ties; scale them so top-k is decisive and a rounding
    # difference between two computations cannot flip a choice.
    with torch.no_grad():
        for module in model.modules():
            if _ROUTER_NAME.search(type(module).__name__):
                for p in module.parameters():
                    if p.dim() == 2:
                        p.mul_(50.0)
            table = getattr(module, "tid2eid", None)
            if torch.is_tensor(table):
                # Hash routers look experts up per token id in a table the checkpoint fills (zeros
                # at init); fill it as a checkpoint would, with k distinct experts per token.
                n = int(getattr(module, "num_experts", N_EXPERTS))
                g = torch.Generator().manual_seed(2)
                rows = [torch.randperm(n, generator=g)[: table.shape[1]] for _ in range(len(table))]
                table.copy_(torch.stack(rows))
    return model, how


# ---------------------------------------------------------------------------- the reference
def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _routing_from_output(
    output: Any,
    n_experts: int | None,
    top_k: int | None,
    block_top_k: int | None = None,
    p_norm: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids [N, k], weights [N, k] | None) read from a router's outputs, by dtype and shape.

    Routers return their top-k ids (an integer tensor) with the weights (a float tensor of the
    same shape); mask routers (Switch, NLLB-MoE) return a one-hot [.., E] dispatch mask, decoded
    here token by token; Llama 4 returns (scores, logits) [N, E] only, JetMoe expert-sorted
    dispatch lists, and DBRX logits only (the block, with ``block_top_k`` and ``p_norm``, routes). Each is decoded here by brute force, separately from the adapters' code.
    """
    items = output if isinstance(output, (tuple, list)) else [output]
    tensors = [t.detach() for t in items if torch.is_tensor(t)]
    ints = [t for t in tensors if not t.is_floating_point() and t.dim() >= 1]
    floats = [t.float() for t in tensors if t.is_floating_point()]
    sizes = [x for x in items if isinstance(x, list)]
    if len(ints) == 2 and sizes and top_k:
        return _dispatch_lists(ints[0], ints[1], floats[0], sizes[0], top_k)
    if not ints and len(floats) == 2 and top_k and floats[0].shape == floats[1].shape:
        # (scores, logits): the k largest logits in descending order, weights the scores there.
        scores, logits = floats[0].numpy(), floats[1].numpy()
        ids = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
        return ids, np.take_along_axis(scores, ids, axis=1)
    if ints and n_experts and ints[0].shape[-1] == n_experts > TOP_K:
        mask = ints[0].reshape(-1, n_experts).numpy()
        probs = floats[0].reshape(mask.shape[0], -1).numpy()
        ids, weights = [], []
        for row, p in zip(mask, probs):
            first = [int(e) for e in np.flatnonzero(row)]
            if p.shape[0] == 1:  # Switch: one slot, the router's top probability
                ids.append(first or [n_experts])
                weights.append([float(p[0])])
                continue
            # NLLB-MoE: top-1 from the mask, then the other expert with a non-zero weight.
            second = [int(e) for e in np.flatnonzero(p) if int(e) not in first]
            slots = (first or [n_experts]) + (second or [n_experts])
            ids.append(slots)
            weights.append([float(p[e]) if e < n_experts else 0.0 for e in slots])
        return np.array(ids), np.array(weights, np.float32)
    if not ints and len(floats) == 1 and block_top_k:
        # Logits only (DBRX): the block takes softmax, its top-k, then divides by their p-norm.
        logits = floats[0].reshape(-1, floats[0].shape[-1]).numpy().astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        ids = np.argsort(-probs, axis=1, kind="stable")[:, :block_top_k]
        top = np.take_along_axis(probs, ids, axis=1)
        if p_norm is None:
            return ids, None
        return ids, (top / (np.sum(top**p_norm, axis=1, keepdims=True) ** (1 / p_norm)))
    if not ints:
        raise AssertionError(f"router output not understood: {[tuple(t.shape) for t in tensors]}")
    ids_t = ints[-1]
    ids_t = ids_t.reshape(-1, ids_t.shape[-1]) if ids_t.dim() > 1 else ids_t.reshape(-1, 1)
    same = [
        t.reshape(ids_t.shape).numpy()
        for t in floats
        if t.numel() == ids_t.numel() and t.shape[-1] == ids_t.shape[-1]
    ]
    return ids_t.numpy(), same[0] if same else None


def _dispatch_lists(
    sorted_slots: Any, token_of: Any, gates: Any, expert_size: list[int], top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """JetMoe's expert-sorted dispatch: entry j is slot ``sorted_slots[j]`` (token * k + slot) of
    token ``token_of[j]``, sent to the expert whose run of ``expert_size`` covers j."""
    slots, tokens, w = sorted_slots.numpy(), token_of.numpy(), gates.numpy()
    n_tokens = slots.shape[0] // top_k
    ids = np.full((n_tokens, top_k), -1)
    weights = np.zeros((n_tokens, top_k), np.float32)
    j = 0
    for expert, count in enumerate(expert_size):
        for _ in range(count):
            assert slots[j] // top_k == tokens[j]
            ids[tokens[j], slots[j] % top_k] = expert
            weights[tokens[j], slots[j] % top_k] = w[j]
            j += 1
    return ids, weights


class Reference:
    """Routing seen by forward hooks on the router modules, keyed by the MoE block's name.

    Outputs are kept raw and decoded only for the blocks the trace names, so other modules
    called ``*Gate`` (a linear-attention forget gate, say) are hooked but never read.
    """

    def __init__(self, model: Any) -> None:
        self.raw: dict[str, list[tuple[Any, Any]]] = {}
        self.blocks: dict[str, Any] = {}
        self.handles = []
        for name, module in model.named_modules():
            if _ROUTER_NAME.search(type(module).__name__) and any(
                p.dim() == 2 for p in module.parameters()
            ):
                self.blocks[_parent(name)] = model.get_submodule(_parent(name))
                self.handles.append(module.register_forward_hook(self._hook(_parent(name))))

    def _hook(self, block: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            items = output if isinstance(output, (tuple, list)) else [output]
            kept = [x.detach().clone() if torch.is_tensor(x) else x for x in items]
            self.raw.setdefault(block, []).append((module, kept))

        return hook

    def calls(self, block: str) -> list[tuple[np.ndarray, np.ndarray | None]]:
        parent = self.blocks.get(block)
        return [
            _routing_from_output(
                out,
                getattr(module, "num_experts", None),
                getattr(module, "top_k", None),
                getattr(parent, "top_k", None),
                getattr(parent, "moe_normalize_expert_weights", None),
            )
            for module, out in self.raw.get(block, [])
        ]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _prompt_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as batched generation does
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _expected(
    calls: list[Any], mask: torch.Tensor, n_experts: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reference ids/weights in the trace's request-major order: per row, pass after pass.

    ``calls`` has one entry per pass (the first over the prompt, the others one token per row);
    None where the layer did not run in that pass (the other stack of an encoder-decoder
    model), whose tokens then hold "no expert" there.
    """
    batch, seq = mask.shape
    k = max(c[0].shape[1] for c in calls if c is not None)
    rows_ids: list[list[np.ndarray]] = [[] for _ in range(batch)]
    rows_w: list[list[np.ndarray]] = [[] for _ in range(batch)]
    for step, call in enumerate(calls):
        width = seq if step == 0 else 1
        if call is None:
            ids = np.full((batch * width, k), n_experts)
            w = np.full((batch * width, k), np.nan, np.float32)
        else:
            # Ids outside the routed experts (LongCat-Flash's identity "zero experts") load no
            # weights: the trace holds "no expert" there.
            ids = np.where((call[0] < 0) | (call[0] >= n_experts), n_experts, call[0])
            w = call[1] if call[1] is not None else np.full(ids.shape, np.nan, np.float32)
        for b in range(batch):
            keep = mask[b].bool().numpy() if step == 0 else slice(None)
            rows_ids[b].append(ids.reshape(batch, width, -1)[b][keep])
            rows_w[b].append(w.reshape(batch, width, -1)[b][keep])
    return (
        np.concatenate([np.concatenate(r) for r in rows_ids]),
        np.concatenate([np.concatenate(r) for r in rows_w]),
    )


@dataclass
class Outcome:
    model_type: str
    architecture: str
    adapter: str
    how: str
    layers: int
    tokens: int


def record_and_check(model_type: str) -> Outcome:
    """Build `model_type` tiny, record it, and compare with the router hooks; raises on mismatch."""
    model, how = build(model_type)
    ids, mask = _prompt_batch()
    ref = Reference(model)
    try:
        with torch.no_grad(), record(model) as rec:
            if how == "generate":
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    pad_token_id=0,
                    suppress_tokens=list(range(128, VOCAB)),  # never feed image/audio tokens
                    **OVERRIDES.get(model_type, Override()).generate,
                )
            else:
                model(input_ids=ids, attention_mask=mask)
    finally:
        ref.remove()
    trace = rec.to_trace()
    names = trace.meta["source"]["moe_modules"]
    n_prompt = int(mask.sum())
    passes = NEW_TOKENS if how == "generate" else 1
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    n_decode = 3 * passes if encoder_decoder else 3 * (passes - 1)
    assert trace.n_tokens == n_prompt + n_decode
    assert trace.n_requests == 3
    for l_idx, name in enumerate(names):
        calls: list[Any] = ref.calls(_parent(name))
        assert calls, f"{model_type}: no router hook fired for {name}"
        if encoder_decoder:  # encoder once over the prompt, decoder once per generated token
            assert len(calls) == (1 if "encoder" in name else passes), name
            calls = calls + [None] * passes if "encoder" in name else [None, *calls]
        else:
            assert len(calls) == passes, f"{model_type}: {name} routed {len(calls)} times"
        n_experts = int(trace.n_experts[l_idx])
        want_ids, want_w = _expected(calls, mask, n_experts)
        got = trace.expert_ids[:, l_idx, : want_ids.shape[1]]
        np.testing.assert_array_equal(got, want_ids, err_msg=f"{model_type} {name}")
        routed = (want_ids < n_experts) & ~np.isnan(want_w)
        if routed.any():
            assert trace.gate_weights is not None, f"{model_type}: no gate weights recorded"
            got_w = trace.gate_weights[:, l_idx, : want_w.shape[1]].astype(np.float32)
            np.testing.assert_allclose(
                got_w[routed], want_w[routed], rtol=2e-3, atol=2e-3, err_msg=f"{model_type} {name}"
            )
    return Outcome(
        model_type,
        type(model).__name__,
        trace.meta["source"]["adapter"],
        how,
        trace.n_layers,
        trace.n_tokens,
    )


# ---------------------------------------------------------------------------- the tests
# Types the generic tiny build or reference does not handle yet: each is an expected failure with
# its reason (strict: once one passes, the test fails until it is removed here). These are gaps
# in this test, not refusals; docs/record.md lists them as untested.
BUILD_GAPS: dict[str, str] = {}


def _sub_config_parent(model_type: str, types: list[str]) -> str | None:
    """For a sub-config (no auto model of its own, e.g. a text config), the type holding it."""
    cls = configuration_auto.CONFIG_MAPPING[model_type]
    for other in sorted(configuration_auto.CONFIG_MAPPING_NAMES):
        if other == model_type:
            continue
        try:
            other_cls = configuration_auto.CONFIG_MAPPING[other]
        except Exception:  # a config module that does not import
            continue
        if cls in _nested_configs(other_cls):
            return other
    return None


def _has_auto_model(model_type: str) -> bool:
    return any(
        model_type in names
        for names in (
            modeling_auto.MODEL_MAPPING_NAMES,
            modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
            modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
            modeling_auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
            modeling_auto.MODEL_FOR_BACKBONE_MAPPING_NAMES,
        )
    )


TYPES = discover_moe_types()


def _param(model_type: str) -> Any:
    marks = []
    if OVERRIDES.get(model_type, Override()).slow:
        marks.append(pytest.mark.slow)
    if model_type in BUILD_GAPS:
        marks.append(pytest.mark.xfail(reason=BUILD_GAPS[model_type], strict=True))
    return pytest.param(model_type, marks=marks, id=model_type)


def test_discovery_finds_the_known_moe_types() -> None:
    # A scan that found nothing (or missed these) would make the coverage test vacuous.
    for known in ("mixtral", "qwen3_moe", "deepseek_v3", "switch_transformers", "nllb-moe"):
        assert known in TYPES
    assert "llama" not in TYPES and "bert" not in TYPES
    assert set(NOT_PER_TOKEN) <= set(TYPES)


@pytest.mark.parametrize("model_type", [_param(t) for t in TYPES])
def test_every_moe_type_records_exactly_or_is_refused(model_type: str) -> None:
    if model_type in NOT_PER_TOKEN:
        reason = NOT_PER_TOKEN[model_type]
        if not _has_auto_model(model_type):
            pytest.skip(f"sub-config of {_sub_config_parent(model_type, TYPES)}")
        with pytest.raises(MoeprofError, match=re.escape(reason)):
            record_and_check(model_type)
        return
    if not _has_auto_model(model_type):
        parent = _sub_config_parent(model_type, TYPES)
        assert parent is not None, f"{model_type} has no model class and no parent type"
        pytest.skip(f"recorded as part of {parent}")
    record_and_check(model_type)


def _results() -> Iterator[list[str]]:
    """One docs table row per discovered type: type, model class, adapter, MoE layers, checked."""
    for model_type in TYPES:
        if model_type in NOT_PER_TOKEN:
            yield [model_type, "", "refused", "", NOT_PER_TOKEN[model_type]]
        elif not _has_auto_model(model_type):
            parent = _sub_config_parent(model_type, TYPES)
            yield [model_type, "", "", "", f"sub-config of `{parent}`: its row applies"]
        else:
            try:
                o = record_and_check(model_type)
            except Exception as exc:  # noqa: BLE001 - the table reports every failure
                if model_type in BUILD_GAPS:
                    yield [model_type, "", "not covered", "", BUILD_GAPS[model_type]]
                    continue
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                yield [model_type, "", "**fails**", "", f"{type(exc).__name__}: {first[:100]}"]
                continue
            run = "generate: prefill + decode" if o.how == "generate" else "one forward pass"
            yield [model_type, o.architecture, o.adapter, str(o.layers), f"ids, weights ({run})"]


def write_docs_table() -> str:
    """The supported-architecture table of docs/record.md, from recording every type now."""
    rows = [
        "| model type | model class | adapter | MoE layers | checked against the router hook |",
        "| --- | --- | --- | --- | --- |",
    ]
    for cells in _results():
        cells[0] = f"`{cells[0]}`"
        if cells[2] and cells[2] not in ("refused", "**fails**", "not covered"):
            cells[2] = f"`{cells[2]}`"
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    table = write_docs_table()
    print(table)
    print(f"{time.perf_counter() - start:.1f} s", file=sys.stderr)


def _same_routing(a: Any, b: Any) -> None:
    for name in ("expert_ids", "request_ids", "positions", "steps", "phase", "token_ids"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.gate_weights, b.gate_weights)
    assert a.n_experts.tolist() == b.n_experts.tolist()
    assert a.expert_bytes.tolist() == b.expert_bytes.tolist()


def test_a_wrapper_that_generates_with_a_sub_model_records_that_sub_model() -> None:
    # Qwen3-Omni has no forward of its own: its generate() runs thinker.generate() (text), then
    # the talker (speech codes). The thinker's passes are recorded, as recording it directly does.
    model, _ = build("qwen3_omni_moe")
    ids, mask = _prompt_batch()
    with torch.no_grad(), record(model) as rec:
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            thinker_max_new_tokens=NEW_TOKENS,
            thinker_min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    wrapped = rec.to_trace()
    source = wrapped.meta["source"]
    assert source["recorded_sub_model"] == "thinker"
    assert all(name.startswith("thinker.") for name in source["moe_modules"])
    with torch.no_grad(), record(model.thinker) as rec:
        model.thinker.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=151645,  # what the wrapper passes its thinker by default
        )
    direct = rec.to_trace()
    assert direct.n_tokens == int(mask.sum()) + 3 * (NEW_TOKENS - 1)
    _same_routing(wrapped, direct)
    # With the talker built, its MoE layers (speech codes, not text tokens) are left out.
    model.enable_talker()
    rec = record(model)
    assert rec.sub_model == "thinker" and rec.sub_models_not_recorded == ["talker"]
    assert [layer.name for layer in rec.layers] == source["moe_modules"]


class _ForwardlessWrapper(torch.nn.Module):
    """Holds a causal LM and generates with it, with no forward of its own (as Qwen3-Omni)."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.lm = inner

    def generate(self, **kwargs: Any) -> Any:
        return self.lm.generate(**kwargs)


class _WrapperWithForward(_ForwardlessWrapper):
    def forward(self, **kwargs: Any) -> Any:
        return self.lm(**kwargs)


def test_wrappers_of_the_demo_model() -> None:
    from moeprof import demo

    inner, tokenizer = demo.load()
    enc = tokenizer(demo.prompts()[:3], padding=True, return_tensors="pt")
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad(), record(inner) as rec:
        inner.generate(**enc, **kwargs)
    direct = rec.to_trace()
    wrapper = _ForwardlessWrapper(inner)
    with torch.no_grad(), record(wrapper) as rec:
        wrapper.generate(**enc, **kwargs)
    wrapped = rec.to_trace()
    assert wrapped.meta["source"]["recorded_sub_model"] == "lm"
    _same_routing(wrapped, direct)
    assert "generate" not in wrapper.__dict__ and "generate" not in inner.__dict__  # unpatched
    # A wrapper with a forward of its own whose generate() bypasses it: the MoE layers run
    # outside every recorded pass, so no token can be placed; refused, not recorded empty.
    other = _WrapperWithForward(inner)
    with torch.no_grad(), record(other) as rec:
        other.generate(**enc, **kwargs)
    with pytest.raises(MoeprofError, match=r"outside .*forward .*record that sub-model instead"):
        rec.to_trace()
