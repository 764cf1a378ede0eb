"""Expert sizes from model configs (moeprof/importers/model_config.py): per architecture, with
quantization, and refusal of bad or hostile configs; `import --model-config`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from import_helpers import CONFIGS, DATA

from moeprof.errors import MoeprofError
from moeprof.importers import MoeprofImportWarning, import_trace
from moeprof.importers.model_config import load_model_config


def swiglu(hidden: int, inter: int, bytes_per_value: int) -> int:
    # gate [inter, hidden], up [inter, hidden], down [hidden, inter]
    return (inter * hidden + inter * hidden + hidden * inter) * bytes_per_value


def test_expert_bytes_mixtral_and_deepseek_v2_lite() -> None:
    mixtral = load_model_config(CONFIGS / "mixtral-8x7b.json")
    assert mixtral.expert_bytes == 3 * 4096 * 14336 * 2 == 352_321_536
    assert mixtral.n_experts == 8 and mixtral.top_k == 2
    assert mixtral.moe_layer_indices == tuple(range(32))
    assert mixtral.shared_expert_bytes == 0
    assert mixtral.architecture == "MixtralForCausalLM"

    ds = load_model_config(CONFIGS / "deepseek-v2-lite.json")
    assert ds.expert_bytes == 3 * 2048 * 1408 * 2 == 17_301_504
    assert ds.n_experts == 64 and ds.top_k == 6
    assert ds.moe_layer_indices == tuple(range(1, 27))  # layer 0 is dense
    # Two shared experts run as one MLP of 2 x 1408.
    assert ds.shared_expert_bytes == swiglu(2048, 2 * 1408, 2)


def test_expert_bytes_other_architectures() -> None:
    qwen15 = load_model_config(CONFIGS / "qwen1.5-moe-a2.7b.json")
    assert qwen15.expert_bytes == swiglu(2048, 1408, 2)
    assert qwen15.n_experts == 60 and len(qwen15.moe_layer_indices) == 24
    # Shared expert of 5632 plus its sigmoid gate (a [1, hidden] linear).
    assert qwen15.shared_expert_bytes == swiglu(2048, 5632, 2) + 2048 * 2

    qwen3 = load_model_config(CONFIGS / "qwen3-30b-a3b.json")
    assert qwen3.expert_bytes == swiglu(2048, 768, 2) and qwen3.shared_expert_bytes == 0
    assert qwen3.n_experts == 128 and len(qwen3.moe_layer_indices) == 48

    olmoe = load_model_config(CONFIGS / "olmoe-1b-7b.json")
    assert olmoe.expert_bytes == swiglu(2048, 1024, 2) and olmoe.n_experts == 64

    # gpt-oss-20b in MXFP4, from its checkpoint's tensor shapes (per expert):
    # gate_up_proj_blocks [5760, 90, 16] u8, _scales [5760, 90] u8, _bias [5760] bf16,
    # down_proj_blocks [2880, 90, 16] u8, _scales [2880, 90] u8, _bias [2880] bf16.
    gpt = load_model_config(CONFIGS / "gpt-oss-20b.json")
    assert (
        gpt.expert_bytes
        == (5760 * 90 * 16 + 5760 * 90 + 5760 * 2 + 2880 * 90 * 16 + 2880 * 90 + 2880 * 2)
        == 13_236_480
    )
    assert gpt.n_experts == 32 and gpt.top_k == 4 and gpt.weight_format == "mxfp4"

    # DeepSeek-V3 FP8: weight [2048, 7168] e4m3 + weight_scale_inv [16, 56] fp32 per projection.
    v3 = load_model_config(CONFIGS / "deepseek-v3.json")
    per_proj = 2048 * 7168 + math.ceil(2048 / 128) * math.ceil(7168 / 128) * 4
    assert v3.expert_bytes == 3 * per_proj
    assert v3.moe_layer_indices == tuple(range(3, 61))
    assert v3.shared_expert_bytes == 3 * per_proj  # one shared expert, same shape


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"model_type": "llama", "torch_dtype": "bfloat16"}, "not one moeprof knows"),
        ({"model_type": "mixtral", "hidden_size": 8}, "no 'torch_dtype' or 'dtype'"),
        (
            {
                "model_type": "mixtral",
                "torch_dtype": "bfloat16",
                "hidden_size": 8,
                "num_hidden_layers": 2,
                "num_local_experts": 4,
            },
            "'intermediate_size' is missing",
        ),
        (
            {
                "model_type": "mixtral",
                "torch_dtype": "bfloat16",
                "quantization_config": {"quant_method": "gptq"},
            },
            "quantization 'gptq' is not supported",
        ),
    ],
)
def test_bad_model_configs(tmp_path: Path, cfg: dict, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(MoeprofError, match=message):
        load_model_config(tmp_path)  # a folder holding config.json works too


def test_import_with_model_config_sets_sizes_counts_and_model(tmp_path: Path) -> None:
    with pytest.warns(
        MoeprofImportWarning, match="routes 2 experts per token; the model config says 6"
    ):
        trace = import_trace(
            DATA / "long_csv", "long-csv", model_config=CONFIGS / "deepseek-v2-lite.json"
        )
    assert trace.n_experts.tolist() == [64, 64]  # from the config, not largest id + 1
    assert trace.expert_bytes.tolist() == [17_301_504, 17_301_504]
    assert trace.meta["shared_expert_bytes"] == swiglu(2048, 2816, 2)
    assert trace.meta["model"]["architecture"] == "DeepseekV2ForCausalLM"
    assert trace.meta["model"]["hidden_size"] == 2048  # replay's FFN shape
    assert trace.meta["model"]["expert_intermediate_size"] == 1408
    # A config with fewer experts than the ids: the row is named.
    tiny = {**json.loads((CONFIGS / "mixtral-8x7b.json").read_text()), "num_local_experts": 4}
    (tmp_path / "config.json").write_text(json.dumps(tiny))
    with pytest.raises(
        MoeprofError, match=r"req_b\.csv:2: expert id 5 is out of range for 4 experts"
    ):
        import_trace(DATA / "long_csv", "long-csv", model_config=tmp_path / "config.json")


DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "num_hidden_layers": 4,
    "n_routed_experts": 8,
    "hidden_size": 64,
    "moe_intermediate_size": 32,
    "torch_dtype": "bfloat16",
}
LLAMA4 = {
    "model_type": "llama4_text",
    "num_hidden_layers": 4,
    "num_local_experts": 8,
    "hidden_size": 64,
    "intermediate_size": 32,
    "torch_dtype": "bfloat16",
}
QWEN = {
    "model_type": "qwen3_moe",
    "num_hidden_layers": 4,
    "num_experts": 8,
    "hidden_size": 64,
    "moe_intermediate_size": 32,
    "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({**QWEN, "num_hidden_layers": 10**9}, "'num_hidden_layers' must be in 1..100000"),
        ({**QWEN, "num_hidden_layers": 0}, "'num_hidden_layers' must be in 1..100000"),
        ({**QWEN, "decoder_sparse_step": 0}, "'decoder_sparse_step' must be in 1"),
        ({**QWEN, "decoder_sparse_step": "2"}, "'decoder_sparse_step' must be an integer"),
        ({**QWEN, "mlp_only_layers": 5}, "'mlp_only_layers' must be a list of integers"),
        ({**QWEN, "mlp_only_layers": ["a"]}, "'mlp_only_layers' must be a list of integers"),
        ({**QWEN, "quantization_config": "fp8"}, "'quantization_config' must be an object"),
        (
            {**QWEN, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}},
            "'weight_block_size' must be a list of two positive integers",
        ),
        (
            {**QWEN, "quantization_config": {"quant_method": "fp8", "weight_block_size": [0, 0]}},
            "'weight_block_size' must be a list of two positive integers",
        ),
        ({**QWEN, "architectures": 5}, "'architectures' must be a list of strings"),
        ({**QWEN, "architectures": [1]}, "'architectures' must be a list of strings"),
        (
            {**QWEN, "shared_expert_intermediate_size": "x"},
            "'shared_expert_intermediate_size' must be an integer",
        ),
        ({**QWEN, "hidden_size": -64}, "'hidden_size' must be in 1"),
        (
            {**DEEPSEEK_V3, "moe_layer_freq": 0},
            "'moe_layer_freq' must be in 1",
        ),
        (
            {**DEEPSEEK_V3, "n_shared_experts": [1]},
            "'n_shared_experts' must be an integer",
        ),
        (
            {**LLAMA4, "interleave_moe_layer_step": 0},
            "'interleave_moe_layer_step' must be in 1",
        ),
        (
            {**LLAMA4, "moe_layers": "1,3"},
            "'moe_layers' must be a list of integers",
        ),
        (
            {**LLAMA4, "moe_layers": [1, 4]},
            "'moe_layers' names layers outside 0..3",
        ),
        (
            {
                "model_type": "jamba",
                "num_hidden_layers": 4,
                "num_experts": 8,
                "hidden_size": 64,
                "intermediate_size": 32,
                "torch_dtype": "bfloat16",
                "expert_layer_period": 0,
            },
            "'expert_layer_period' must be in 1",
        ),
        (
            {"model_type": "dbrx", "n_layers": 4, "d_model": 64, "ffn_config": "x"},
            "'ffn_config' must be an object",
        ),
    ],
)
def test_hostile_model_configs(tmp_path: Path, cfg: dict, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"torch_dtype": "bfloat16", **cfg}))
    with pytest.raises(MoeprofError, match=rf"config\.json: field {message}"):
        load_model_config(path)
