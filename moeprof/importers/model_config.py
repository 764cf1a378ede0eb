"""Expert sizes from a Hugging Face ``config.json``, without loading any weights.

Bytes of one routed expert = its parameters (gate, up and down projections, plus biases where the
architecture has them) times the bytes of the stored dtype; quantized checkpoints add their scales
(FP8 with one float32 scale per weight block, MXFP4 with one byte per 32 values). The shared
expert(s) of DeepSeek / Qwen2-MoE / Llama 4 / Granite-MoE-shared count separately: they are used
by every token, so they are never part of per-batch deduplication.

Field names and layer rules follow the transformers implementations of each architecture.

Two places know architectures, for two different jobs. This module sizes experts from a config
alone, for routing captured elsewhere (``moeprof import --model-config``); one ``_layout_*``
function per config layout, registered in ``_ARCHITECTURES`` by ``model_type``. Its sibling,
:mod:`moeprof.record.adapters`, finds the routing points of a *running* model for
``moeprof record`` (sizes then come from the loaded tensors). Supporting a new architecture: add
a layout here (plus a case in ``tests/test_import_model_config.py``) if ``--model-config``
refuses its ``model_type``; add an adapter there (plus a case in ``tests/test_record_archs.py``)
if ``moeprof record`` cannot find its MoE layers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprof.errors import MoeprofError

_DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}


@dataclass(frozen=True)
class WeightFormat:
    """How one weight matrix is stored: bytes per value plus per-block scales."""

    name: str  # "bfloat16", "fp8 (block 128x128)", "mxfp4"
    value_bits: int  # bits per stored weight value
    bias_bytes: int  # bytes per bias value (biases are never quantized)
    block: tuple[int, int] | None = None  # FP8: (rows, cols) of one scale block
    scale_bytes: int = 0  # bytes of one scale
    group: int | None = None  # MXFP4: values (along the input dim) sharing one scale

    def matrix_bytes(self, rows: int, cols: int) -> int:
        """Bytes of one [rows (out), cols (in)] weight matrix including its scales."""
        values = rows * cols * self.value_bits // 8
        if self.block is not None:
            scales = math.ceil(rows / self.block[0]) * math.ceil(cols / self.block[1])
        elif self.group is not None:
            scales = rows * math.ceil(cols / self.group)
        else:
            scales = 0
        return values + scales * self.scale_bytes


@dataclass(frozen=True)
class ModelExperts:
    """What a config says about a model's experts."""

    model_type: str
    architecture: str | None
    model_id: str | None
    n_layers: int  # decoder layers, dense ones included
    moe_layer_indices: tuple[int, ...]  # model layer index of each MoE layer
    n_experts: int  # routed experts per MoE layer
    top_k: int | None
    hidden_size: int
    expert_intermediate_size: int
    weight_format: str
    expert_params: int  # parameters of one routed expert
    expert_bytes: int  # bytes of one routed expert as stored
    shared_expert_bytes: int  # bytes of the shared expert(s) of one MoE layer (0 if none)

    def model_meta(self) -> dict[str, Any]:
        """The trace's ``model`` metadata (replay reads ``hidden_size`` for its FFN shapes)."""
        return {
            "id": self.model_id,
            "architecture": self.architecture,
            "revision": None,
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "expert_intermediate_size": self.expert_intermediate_size,
            "weight_format": self.weight_format,
        }


def _need(cfg: dict[str, Any], key: str, where: str) -> Any:
    if cfg.get(key) is None:
        raise MoeprofError(f"{where}: field {key!r} is missing; give expert_bytes instead")
    return cfg[key]


_MAX_LAYERS = 100_000
_MAX_SIZE = 1 << 40


def _int(
    cfg: dict[str, Any],
    key: str,
    where: str,
    default: int | None = None,
    *,
    lo: int | None = None,
    hi: int | None = None,
) -> int:
    value = cfg.get(key)
    if value is None:
        if default is None:
            return int(_need(cfg, key, where))
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise MoeprofError(f"{where}: field {key!r} must be an integer, got {value!r:.60}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"{lo if lo is not None else '...'}..{hi if hi is not None else '...'}"
        raise MoeprofError(f"{where}: field {key!r} must be in {bounds}, got {value}")
    return int(value)


def _layers(cfg: dict[str, Any], key: str, where: str) -> int:
    """A layer count, bounded before anything is built from it."""
    return _int(cfg, key, where, lo=1, hi=_MAX_LAYERS)


def _step(cfg: dict[str, Any], key: str, where: str, default: int) -> int:
    """A layer period / step: an integer of at least 1."""
    return _int(cfg, key, where, default, lo=1, hi=_MAX_LAYERS)


def _size(cfg: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    """A dimension or count that must not be negative (0 allowed only where a default says so)."""
    return _int(cfg, key, where, default, lo=0 if default == 0 else 1, hi=_MAX_SIZE)


def _experts(cfg: dict[str, Any], key: str, where: str) -> int:
    """A routed-expert count (0: a dense model, refused later with its own message)."""
    return _int(cfg, key, where, lo=0, hi=_MAX_SIZE)


def _int_list(cfg: dict[str, Any], key: str, where: str) -> list[int] | None:
    value = cfg.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in value
    ):
        raise MoeprofError(f"{where}: field {key!r} must be a list of integers, got {value!r:.60}")
    return [int(x) for x in value]


def _weight_format(cfg: dict[str, Any], where: str) -> WeightFormat:
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    if dtype is None:
        raise MoeprofError(f"{where}: no 'torch_dtype' or 'dtype' field; give expert_bytes instead")
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in _DTYPE_BYTES:
        raise MoeprofError(f"{where}: dtype {dtype!r} is not known; give expert_bytes instead")
    dtype_bytes = _DTYPE_BYTES[dtype]
    quant = cfg.get("quantization_config")
    if quant is not None and not isinstance(quant, dict):
        raise MoeprofError(
            f"{where}: field 'quantization_config' must be an object, got {quant!r:.60}"
        )
    if not quant:
        return WeightFormat(dtype, dtype_bytes * 8, dtype_bytes)
    method = str(quant.get("quant_method", "")).lower()
    if method == "fp8":
        block = quant.get("weight_block_size")
        if block is not None:
            if not (
                isinstance(block, list)
                and len(block) == 2
                and all(
                    isinstance(x, int) and not isinstance(x, bool) and 0 < x <= _MAX_SIZE
                    for x in block
                )
            ):
                raise MoeprofError(
                    f"{where}: field 'weight_block_size' must be a list of two positive "
                    f"integers, got {block!r:.60}"
                )
            rows, cols = block
            return WeightFormat(f"fp8 (block {rows}x{cols})", 8, dtype_bytes, (rows, cols), 4)
        # Per-tensor FP8: one float32 scale per matrix (a block larger than any matrix).
        return WeightFormat("fp8 (per tensor)", 8, dtype_bytes, (1 << 62, 1 << 62), 4)
    if method == "mxfp4":
        # OCP MX: 4-bit E2M1 values, one E8M0 (1 byte) scale per 32 values along the input dim.
        return WeightFormat("mxfp4", 4, dtype_bytes, None, 1, 32)
    raise MoeprofError(
        f"{where}: quantization {method or quant!r} is not supported; give expert_bytes instead"
    )


def _swiglu_bytes(hidden: int, inter: int, fmt: WeightFormat, *, bias: bool = False) -> int:
    """Gate and up [inter, hidden] plus down [hidden, inter], optional biases."""
    weights = 2 * fmt.matrix_bytes(inter, hidden) + fmt.matrix_bytes(hidden, inter)
    biases = (2 * inter + hidden) * fmt.bias_bytes if bias else 0
    return weights + biases


@dataclass(frozen=True)
class _Layout:
    n_experts: int
    top_k: int | None
    hidden: int
    inter: int
    moe_layers: list[int]
    shared_bytes: int  # computed with the weight format
    bias: bool = False


def _layout_mixtral(c: dict[str, Any], w: str, fmt: WeightFormat) -> _Layout:
    n = _layers(c, "num_hidden_layers", w)
    return _Layout(
        _experts(c, "num_local_experts", w),
        c.get("num_experts_per_tok"),
        _size(c, "hidden_size", w),
        _size(c, "intermediate_size", w),
        list(range(n)),
        0,
    )


def _layout_qwen_moe(c: dict[str, Any], w: str, fmt: WeightFormat) -> _Layout:
    # transformers Qwen2MoeDecoderLayer: MoE unless listed in mlp_only_layers, every
    # decoder_sparse_step-th layer; the shared expert has its own size and a hidden->1 gate.
    n = _layers(c, "num_hidden_layers", w)
    n_exp = _experts(c, "num_experts", w)
    step = _step(c, "decoder_sparse_step", w, 1)
    dense = set(_int_list(c, "mlp_only_layers", w) or [])
    layers = [i for i in range(n) if i not in dense and n_exp > 0 and (i + 1) % step == 0]
    hidden = _size(c, "hidden_size", w)
    shared_inter = _size(c, "shared_expert_intermediate_size", w, 0)
    shared = (
        _swiglu_bytes(hidden, shared_inter, fmt) + fmt.matrix_bytes(1, hidden)
        if shared_inter
        else 0
    )
    return _Layout(
        n_exp,
        c.get("num_experts_per_tok"),
        hidden,
        _size(c, "moe_intermediate_size", w),
        layers,
        shared,
    )


def _layout_deepseek(c: dict[str, Any], w: str, fmt: WeightFormat) -> _Layout:
    # DeepSeek-V2/V3 (and GLM-4.5 MoE, same fields): dense for the first first_k_dense_replace
    # layers, then MoE every moe_layer_freq layers; the n_shared_experts shared experts run as one
    # MLP of n_shared_experts x moe_intermediate_size.
    n = _layers(c, "num_hidden_layers", w)
    first_dense = _int(c, "first_k_dense_replace", w, 0, lo=0)
    freq = _step(c, "moe_layer_freq", w, 1)
    layers = [i for i in range(n) if i >= first_dense and i % freq == 0]
    hidden = _size(c, "hidden_size", w)
    inter = _size(c, "moe_intermediate_size", w)
    n_shared = _size(c, "n_shared_experts", w, 0)
    shared = _swiglu_bytes(hidden, inter * n_shared, fmt) if n_shared else 0
    return _Layout(
        _experts(c, "n_routed_experts", w),
        c.get("num_experts_per_tok"),
        hidden,
        inter,
        layers,
        shared,
    )


def _layout_olmoe(c: dict[str, Any], w: str, fmt: WeightFormat) -> _Layout:
    n = _layers(c, "num_hidden_layers", w)
    return _Layout(
        _experts(c, "num_experts", w),
        c.get("num_experts_per_tok"),
        _size(c, "hidden_size", w),
        _size(c, "intermediate_size", w),
        list(range(n)),
        0,
    )


def _layout_gpt_oss(c: dict[str, Any], w: str, fmt: WeightFormat) -> _Layout:
    # gate_up_proj [hidden, 2 x inter] + bias, down_proj [inter, hidden] + bias, every layer.
    n = _layers(c, "num_hidden_layers", w)
    top_k = c.get("num_experts_per_tok", c.get("experts_per_token"))
    return _Layout(
        _experts(c, "num_local_experts", w),
        top_k,
        _size(c, "hidden_size", w),
        _size(c, "intermediate_size", w),
        list(range(n)),
        0,
        bias=True,
    )


def _layout_dbrx(c: dict[str, Any], w: str, fmt: WeightFormat) -> _Layout:
    ffn = c.get("ffn_config")
    if ffn is None:
        ffn = {}
    if not isinstance(ffn, dict):
        raise MoeprofError(f"{w}: field 'ffn_config' must be an object, got {ffn!r:.60}")
    where = f"{w} (ffn_config)"
    n = _layers(c, "n_layers", w)
    return _Layout(
        _experts(ffn, "moe_num_experts", where),
        ffn.get("moe_top_k"),
        _size(c, "d_model", w),
        _size(ffn, "ffn_hidden_size", where),
        list(range(n)),
        0,
    )


def _layout_granite(c: dict[str, Any], w: str, fmt: WeightFormat) -> _Layout:
    n = _layers(c, "num_hidden_layers", w)
    hidden = _size(c, "hidden_size", w)
    shared_inter = _size(c, "shared_intermediate_size", w, 0)
    shared = _swiglu_bytes(hidden, shared_inter, fmt) if shared_inter else 0
    return _Layout(
        _experts(c, "num_local_experts", w),
        c.get("num_experts_per_tok"),
        hidden,
        _size(c, "intermediate_size", w),
        list(range(n)),
        shared,
    )


def _layout_jamba(c: dict[str, Any], w: str, fmt: WeightFormat) -> _Layout:
    n = _layers(c, "num_hidden_layers", w)
    period = _step(c, "expert_layer_period", w, 2)
    offset = _int(c, "expert_layer_offset", w, 1, lo=0, hi=_MAX_LAYERS)
    return _Layout(
        _experts(c, "num_experts", w),
        c.get("num_experts_per_tok"),
        _size(c, "hidden_size", w),
        _size(c, "intermediate_size", w),
        [i for i in range(n) if i % period == offset],
        0,
    )


def _layout_llama4(c: dict[str, Any], w: str, fmt: WeightFormat) -> _Layout:
    # Llama 4 text model: MoE layers listed in moe_layers, else every interleave_moe_layer_step-th;
    # one shared expert of intermediate_size (the same size as a routed expert).
    n = _layers(c, "num_hidden_layers", w)
    layers = _int_list(c, "moe_layers", w)
    if layers is None:
        step = _step(c, "interleave_moe_layer_step", w, 1)
        layers = list(range(step - 1, n, step))
    elif any(not 0 <= x < n for x in layers):
        raise MoeprofError(f"{w}: field 'moe_layers' names layers outside 0..{n - 1}")
    hidden = _size(c, "hidden_size", w)
    inter = _size(c, "intermediate_size", w)
    return _Layout(
        _experts(c, "num_local_experts", w),
        c.get("num_experts_per_tok"),
        hidden,
        inter,
        layers,
        _swiglu_bytes(hidden, inter, fmt),
    )


_ARCHITECTURES: dict[str, Callable[[dict[str, Any], str, WeightFormat], _Layout]] = {
    "mixtral": _layout_mixtral,
    "phimoe": _layout_mixtral,
    "qwen2_moe": _layout_qwen_moe,
    "qwen3_moe": _layout_qwen_moe,
    "qwen3_next": _layout_qwen_moe,
    "deepseek_v2": _layout_deepseek,
    "deepseek_v3": _layout_deepseek,
    "glm4_moe": _layout_deepseek,
    "olmoe": _layout_olmoe,
    "gpt_oss": _layout_gpt_oss,
    "dbrx": _layout_dbrx,
    "granitemoe": _layout_granite,
    "granitemoeshared": _layout_granite,
    "jamba": _layout_jamba,
    "llama4": _layout_llama4,
    "llama4_text": _layout_llama4,
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_ARCHITECTURES))


def model_experts(
    cfg: dict[str, Any], *, where: str = "config", model_id: str | None = None
) -> ModelExperts:
    """Expert layout and sizes of the model a config dict describes."""
    if not isinstance(cfg, dict):
        raise MoeprofError(f"{where}: not a JSON object")
    model_type = str(cfg.get("model_type", ""))
    text = cfg.get("text_config")
    body = dict(cfg)
    if model_type == "llama4" and isinstance(text, dict):
        # Multimodal wrapper: the MoE lives in text_config; the dtype may sit on either level.
        body = {
            **text,
            **{k: cfg[k] for k in ("torch_dtype", "dtype", "quantization_config") if k in cfg},
        }
        for key in ("torch_dtype", "dtype"):
            body.setdefault(key, text.get(key))
    layout_fn = _ARCHITECTURES.get(model_type)
    if layout_fn is None:
        raise MoeprofError(
            f"{where}: model_type {model_type!r} is not one moeprof knows "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}); give expert_bytes instead"
        )
    fmt = _weight_format(body, where)
    lay = layout_fn(body, where, fmt)
    if lay.n_experts < 1 or not lay.moe_layers:
        raise MoeprofError(f"{where}: this config describes no routed experts")
    top_k = lay.top_k if isinstance(lay.top_k, int) and not isinstance(lay.top_k, bool) else None
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise MoeprofError(
            f"{where}: field 'architectures' must be a list of strings, got {archs!r:.60}"
        )
    n_layers = body.get("num_hidden_layers", body.get("n_layers", 0))
    params = 3 * lay.hidden * lay.inter + ((2 * lay.inter + lay.hidden) if lay.bias else 0)
    name = model_id or cfg.get("_name_or_path") or None
    return ModelExperts(
        model_type=model_type,
        architecture=str(archs[0]) if archs else None,
        model_id=str(name) if name else None,
        n_layers=n_layers if isinstance(n_layers, int) and not isinstance(n_layers, bool) else 0,
        moe_layer_indices=tuple(lay.moe_layers),
        n_experts=lay.n_experts,
        top_k=top_k,
        hidden_size=lay.hidden,
        expert_intermediate_size=lay.inter,
        weight_format=fmt.name,
        expert_params=params,
        expert_bytes=_swiglu_bytes(lay.hidden, lay.inter, fmt, bias=lay.bias),
        shared_expert_bytes=lay.shared_bytes,
    )


def load_model_config(path: str | os.PathLike[str]) -> ModelExperts:
    """Read a ``config.json`` (or a folder holding one) and compute its expert sizes."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise MoeprofError(f"model config {p} not found")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError: bad JSON or an integer too long to parse; RecursionError: absurd nesting.
        raise MoeprofError(
            f"{p}: not a readable JSON config ({str(exc)[:120] or type(exc).__name__})"
        ) from None
    return model_experts(cfg, where=str(p))
