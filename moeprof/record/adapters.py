"""Where routing lives in a model: a registry of adapters, one per way of routing.

An :class:`Adapter` says which modules to hook and how to read, from the hook's arguments or
output, the routed expert ids ``[tokens, k]`` (in router order) and the gate weights ``[tokens, k]``.
Reading happens on the device: an adapter must not move tensors to the host or call ``.item()``.

Built in, tried in this order (user adapters, registered with :func:`register_adapter`, first):

- ``llama4``: Llama 4's experts take pre-scaled, expert-sorted inputs and no indices; the ids are
  the router's own top-k of its logits (the same ``torch.topk`` call on the same tensor).
- ``jetmoe``: JetMoe's ``JetMoeTopKGating`` (feed-forward MoE only; the mixture-of-attention
  experts are not offloadable weights and are not recorded).
- ``dbrx``: DBRX's ``DbrxExperts`` (ids and weights as arguments; experts stored as [E*ffn, hidden]).
- ``one-hot``: experts modules that receive a dispatch mask instead of ids: Switch Transformers'
  ``(hidden_states, selected_experts [N, k, E] one-hot, routing_weights [N, k])`` and NLLB-MoE's
  ``(hidden_states, router_mask [N, E] top-1 one-hot, router_probs [N, E] combine weights)``; a
  token dropped by expert capacity gets "no expert" in that slot. Encoder and decoder layers.
- ``fused-experts``: any experts module whose ``forward(hidden_states, top_k_index,
  top_k_weights)`` receives the routing, which covers most transformers >= 5 MoE models
  (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS, Granite-MoE, PhiMoE, Ernie 4.5, GLM-4.5...).

The first adapter that matches any module of a model is used for the whole model. Models whose
experts are not chosen per token (``NOT_PER_TOKEN``: diffusion canvases, per-dataset experts,
product-key retrieval) are refused with one line saying why.

Two places know architectures, for two different jobs. This module reads routing from a *running*
model (``moeprof record``); expert sizes then come from the loaded tensors. Its sibling,
:mod:`moeprof.importers.model_config`, computes expert sizes from a ``config.json`` alone, for
routing captured elsewhere (``moeprof import --model-config``). Supporting a new architecture:
add an adapter here if ``moeprof record`` cannot find its MoE layers (every MoE type of the
installed transformers is recorded by ``tests/test_record_coverage.py``; give one that needs its
own reference a case in ``tests/test_record_archs.py``); add a config layout there (plus a case in
``tests/test_import_model_config.py``) if ``--model-config`` refuses its ``model_type``. A model
whose experts module takes ``(hidden_states, top_k_index, top_k_weights)`` needs no adapter.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from moeprof.errors import MoeprofError
from moeprof.record import sizes

Routing = tuple[torch.Tensor, torch.Tensor | None]
RoutingFn = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], Routing]


@dataclass(frozen=True)
class Adapter:
    """How to find MoE layers in a model and read their routing.

    - ``matches(name, module, parent)``: is this module (qualified ``name``, owning ``parent``)
      one MoE layer's routing point?
    - ``routing(module, args, kwargs, output)``: expert ids ``[N, k]`` (integers, router order)
      and gate weights ``[N, k]`` (or None) for the N tokens of this call. ``output`` is None for
      ``hook="pre"`` (read the inputs) and the module's output for ``hook="post"``.
    - ``n_experts(module, parent)``: routed experts of the layer (ids >= this are "no expert").
    - ``expert_modules(module, parent)``: modules holding the routed experts' weights, for
      :func:`moeprof.record.sizes.routed_expert_bytes` (default: the hooked module).
    - ``shared_modules(module, parent, layer)``: always-resident shared experts (default: children
      of the block or decoder layer named ``shared*``, see :mod:`moeprof.record.sizes`).
    """

    name: str
    matches: Callable[[str, nn.Module, nn.Module | None], bool]
    routing: RoutingFn
    n_experts: Callable[[nn.Module, nn.Module | None], int]
    hook: Literal["pre", "post"] = "pre"
    expert_modules: Callable[[nn.Module, nn.Module | None], Sequence[nn.Module]] | None = None
    shared_modules: (
        Callable[[nn.Module, nn.Module | None, nn.Module | None], Sequence[nn.Module]] | None
    ) = None
    description: str = ""


@dataclass(frozen=True)
class MoeLayer:
    """One MoE layer found in a model, with everything the recorder and the trace need."""

    index: int  # MoE layer number (0..L-1)
    name: str  # qualified name of the hooked module
    module: nn.Module
    model_layer: int  # layer index within its stack
    n_experts: int
    expert_bytes: int
    shared_expert_bytes: int
    expert_dtype: str | None
    adapter: Adapter = field(repr=False)
    # The layer list holding it (``model.layers``; ``encoder.block``/``decoder.block`` in
    # encoder-decoder models, where both stacks number their layers from 0).
    stack: str = ""


_USER_ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    """Add an adapter for your own model; user adapters are tried before the built-in ones.

    Registering a name again replaces the earlier adapter of that name.
    """
    if not isinstance(adapter, Adapter):
        raise MoeprofError("register_adapter() takes a moeprof.record.Adapter")
    if adapter.hook not in ("pre", "post"):
        raise MoeprofError(f"adapter {adapter.name!r}: hook must be 'pre' or 'post'")
    unregister_adapter(adapter.name)
    _USER_ADAPTERS.insert(0, adapter)
    return adapter


def unregister_adapter(name: str) -> None:
    _USER_ADAPTERS[:] = [a for a in _USER_ADAPTERS if a.name != name]


def adapters() -> list[Adapter]:
    """All adapters in the order they are tried."""
    return [*_USER_ADAPTERS, *_BUILTIN]


# ---------------------------------------------------------------------------- shared helpers
_EXPERT_COUNT_ATTRS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "num_routed_experts",
    "moe_num_experts",
)


def experts_count(module: nn.Module) -> int:
    """Routed experts of a module: a count attribute, else the leading dim of a 3-D weight."""
    for attr in _EXPERT_COUNT_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    for p in module.parameters(recurse=False):
        if p.dim() == 3:
            return int(p.shape[0])
    raise MoeprofError(f"cannot tell how many experts {type(module).__name__} has")


def _attr(module: nn.Module | None, name: str) -> Any:
    """A submodule or attribute, typed loosely (nn.Module's own typing says Tensor | Module)."""
    return getattr(module, name)


def _per_token_weights(weights: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor | None:
    """[N, k] gate weights; dense [N, E] score matrices are gathered at the chosen ids."""
    if weights is None or not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        return None
    if weights.dim() == 1:
        weights = weights.unsqueeze(-1)
    weights = weights.reshape(-1, weights.shape[-1])
    if weights.shape == ids.shape:
        return weights
    if weights.shape[0] == ids.shape[0] and weights.shape[1] > ids.shape[1]:
        return weights.gather(1, ids.clamp(0, weights.shape[1] - 1).long())
    return None


def _ids_2d(ids: torch.Tensor) -> torch.Tensor:
    if ids.dim() == 1:
        return ids.unsqueeze(-1)
    return ids.reshape(-1, ids.shape[-1])


# ---------------------------------------------------------------------------- fused experts
_INDEX_NAMES = ("top_k_index", "router_indices", "top_k_indices", "selected_experts")
_WEIGHT_NAMES = ("top_k_weights", "routing_weights", "router_scores", "top_k_gates")
_SIGNATURES: dict[type, tuple[str, str] | None] = {}


def _unwrapped_forward(cls: type) -> Callable[..., Any]:
    fn = cls.forward  # type: ignore[attr-defined]
    # transformers' @use_experts_implementation wraps forward with functools.wraps.
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn  # type: ignore[no-any-return]


def _routing_signature(cls: type) -> tuple[str, str] | None:
    """(index param, weight param) when forward is (self, hidden_states, <ids>, <weights>, ...)."""
    if cls in _SIGNATURES:
        return _SIGNATURES[cls]
    found: tuple[str, str] | None = None
    try:
        params = list(inspect.signature(_unwrapped_forward(cls)).parameters)
    except (TypeError, ValueError):
        params = []
    if len(params) >= 4 and params[2] in _INDEX_NAMES and params[3] in _WEIGHT_NAMES:
        found = (params[2], params[3])
    _SIGNATURES[cls] = found
    return found


def _fused_matches(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    if _routing_signature(type(module)) is None:
        return False
    try:
        experts_count(module)
    except MoeprofError:
        return False
    return True


def _fused_routing(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Routing:
    sig = _routing_signature(type(module))
    assert sig is not None
    ids = args[1] if len(args) > 1 else kwargs[sig[0]]
    weights = args[2] if len(args) > 2 else kwargs.get(sig[1])
    ids = _ids_2d(ids)
    return ids, _per_token_weights(weights, ids)


FUSED_EXPERTS = Adapter(
    name="fused-experts",
    matches=_fused_matches,
    routing=_fused_routing,
    n_experts=lambda module, parent: experts_count(module),
    hook="pre",
    description="experts module whose forward receives (hidden_states, top_k_index, top_k_weights)",
)


# ---------------------------------------------------------------------------- DBRX
def _dbrx_expert_modules(module: nn.Module, parent: nn.Module | None) -> Sequence[nn.Module]:
    return [_attr(module, "mlp")] if hasattr(module, "mlp") else [module]


DBRX = Adapter(
    name="dbrx",
    matches=lambda name, module, parent: type(module).__name__ == "DbrxExperts",
    routing=_fused_routing,
    n_experts=lambda module, parent: int(_attr(module, "num_experts")),
    hook="pre",
    expert_modules=_dbrx_expert_modules,
    description="DbrxExperts(hidden_states, top_k_index, top_k_weights); w1/v1/w2 are [E*ffn, hidden]",
)


# ---------------------------------------------------------------------------- Llama 4
def _llama4_routing(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Routing:
    router_scores, router_logits = output[0], output[1]
    # Llama4Router: topk(logits, k, dim=1), then sigmoid of the kept logits. The same topk call on
    # the same tensor gives the router's ids in its order; the weights are the scores it applied.
    ids = torch.topk(router_logits, int(_attr(module, "top_k")), dim=1).indices
    return ids, router_scores.gather(1, ids)


LLAMA4 = Adapter(
    name="llama4",
    matches=lambda name, module, parent: type(module).__name__ == "Llama4Router",
    routing=_llama4_routing,
    n_experts=lambda module, parent: int(_attr(module, "num_experts")),
    hook="post",
    expert_modules=lambda module, parent: [_attr(parent, "experts")] if parent is not None else [],
    description="Llama4Router output (scores, logits); experts in the sibling Llama4TextExperts",
)


# ---------------------------------------------------------------------------- JetMoe
def _jetmoe_routing(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Routing:
    logits = output[-1]  # [N, E] float router logits
    top_logits, ids = logits.topk(int(_attr(module, "top_k")), dim=1)
    return ids, torch.softmax(top_logits, dim=1)


def _jetmoe_matches(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    # Only the feed-forward MoE (JetMoeMoE); the attention experts (JetMoeMoA) are skipped.
    return type(module).__name__ == "JetMoeTopKGating" and type(parent).__name__ == "JetMoeMoE"


JETMOE = Adapter(
    name="jetmoe",
    matches=_jetmoe_matches,
    routing=_jetmoe_routing,
    n_experts=lambda module, parent: int(_attr(module, "num_experts")),
    hook="post",
    expert_modules=lambda module, parent: (
        [_attr(parent, "input_linear"), _attr(parent, "output_linear")]
        if parent is not None
        else []
    ),
    description="JetMoeTopKGating logits of the feed-forward MoE; experts in input/output_linear",
)

# ---------------------------------------------------------------------------- one-hot masks
_MASK_SIGNATURES = {
    ("selected_experts", "routing_weights"): "slots",  # Switch: [N, k, E] one-hot, [N, k]
    ("router_mask", "router_probs"): "top2",  # NLLB-MoE: [N, E] top-1 one-hot, [N, E] weights
}


def _mask_kind(cls: type) -> str | None:
    try:
        params = list(inspect.signature(_unwrapped_forward(cls)).parameters)
    except (TypeError, ValueError):
        return None
    return _MASK_SIGNATURES.get((params[2], params[3])) if len(params) >= 4 else None


def _one_hot_routing(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Routing:
    kind = _mask_kind(type(module))
    mask_name, weight_name = next(k for k, v in _MASK_SIGNATURES.items() if v == kind)
    mask = args[1] if len(args) > 1 else kwargs[mask_name]
    weights = args[2] if len(args) > 2 else kwargs[weight_name]
    n_experts = int(mask.shape[-1])
    if kind == "slots":
        chosen = mask.reshape(-1, mask.shape[-2] if mask.dim() >= 3 else 1, n_experts) != 0
        # argmax of the 0/1 mask is the chosen expert; a slot with none (dropped) is "no expert".
        ids = torch.where(chosen.any(-1), chosen.to(torch.int8).argmax(-1), n_experts)
        return ids, weights.reshape(ids.shape)
    top1 = mask.reshape(-1, n_experts) != 0
    probs = weights.reshape(-1, n_experts)
    first = torch.where(top1.any(-1), top1.to(torch.int8).argmax(-1), n_experts)
    # The second expert is the other one with a non-zero combine weight (capacity may drop it).
    rest = probs.masked_fill(top1, 0)
    second = torch.where(rest.gt(0).any(-1), rest.argmax(-1), n_experts)
    ids = torch.stack([first, second], dim=1)
    return ids, probs.gather(1, ids.clamp(max=n_experts - 1)).masked_fill(ids == n_experts, 0)


def _one_hot_matches(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    if _mask_kind(type(module)) is None:
        return False
    try:
        experts_count(module)
    except MoeprofError:
        return False
    return True


ONE_HOT = Adapter(
    name="one-hot",
    matches=_one_hot_matches,
    routing=_one_hot_routing,
    n_experts=lambda module, parent: experts_count(module),
    hook="pre",
    description="experts module given a dispatch mask: Switch (selected_experts, routing_weights), "
    "NLLB-MoE (router_mask, router_probs)",
)

_BUILTIN: list[Adapter] = [LLAMA4, JETMOE, DBRX, ONE_HOT, FUSED_EXPERTS]

# Modules whose experts are not chosen per token: a trace of per-token routing cannot describe
# them, so recording refuses them up front rather than writing a trace that misleads.
NOT_PER_TOKEN: dict[str, str] = {
    "DiffusionGemmaTextRouter": "it routes a fixed diffusion canvas of positions, not the input "
    "tokens",
    "DogeCDMoE": "its experts are product-key retrieval (keys looked up per token), not a routed "
    "top-k over a fixed set of expert weights",
    "VitPoseNaiveMoe": "its experts are chosen per dataset (dataset_index), not per token",
}


# ---------------------------------------------------------------------------- discovery
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _model_layer(name: str) -> int | None:
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def _stack(name: str) -> str:
    """The path of the layer list holding `name` (``encoder.block`` for ``encoder.block.1.x``)."""
    m = _LAYER_INDEX.search(name)
    return name[: m.start(1)].rstrip(".") if m else ""


def _decoder_layer(model: nn.Module, name: str) -> nn.Module | None:
    """The module at the first numbered path component (e.g. ``model.layers.3``)."""
    m = _LAYER_INDEX.search(name)
    if m is None:
        return None
    try:
        return model.get_submodule(name[: m.end(1)])
    except AttributeError:
        return None


def find_adapter(
    model: nn.Module, adapter: str | Adapter | None = None
) -> tuple[Adapter, list[tuple[str, nn.Module, nn.Module | None]]]:
    """The adapter used for `model` and the (name, module, parent) it matches, in model order."""
    modules = list(model.named_modules())
    parents: dict[str, nn.Module] = {}
    for name, module in modules:
        for child_name, _ in module.named_children():
            parents[f"{name}.{child_name}" if name else child_name] = module
    for name, module in modules:
        why = NOT_PER_TOKEN.get(type(module).__name__)
        if why is not None:
            raise MoeprofError(
                f"{type(model).__name__} is not recorded: {why} ({type(module).__name__} at {name})"
            )
    if isinstance(adapter, Adapter):
        candidates = [adapter]
    elif isinstance(adapter, str):
        candidates = [a for a in adapters() if a.name == adapter]
        if not candidates:
            known = ", ".join(a.name for a in adapters())
            raise MoeprofError(f"no adapter named {adapter!r} (known: {known})")
    else:
        candidates = adapters()
    for cand in candidates:
        hits = [
            (name, module, parents.get(name))
            for name, module in modules
            if cand.matches(name, module, parents.get(name))
        ]
        if hits:
            return cand, hits
    kind = type(model).__name__
    raise MoeprofError(
        f"{kind} has no MoE layer that moeprof recognises (adapters tried: "
        f"{', '.join(a.name for a in candidates)}); for a custom model, register an adapter "
        "with moeprof.record.register_adapter()"
    )


def find_moe_layers(model: nn.Module, adapter: str | Adapter | None = None) -> list[MoeLayer]:
    """The MoE layers of `model`, in model order, with expert counts and sizes."""
    chosen, hits = find_adapter(model, adapter)
    layers: list[MoeLayer] = []
    for order, (name, module, parent) in enumerate(hits):
        n_experts = int(chosen.n_experts(module, parent))
        if n_experts < 1:
            raise MoeprofError(f"{name}: adapter {chosen.name!r} reports {n_experts} experts")
        expert_mods = (
            list(chosen.expert_modules(module, parent)) if chosen.expert_modules else [module]
        )
        decoder_layer = _decoder_layer(model, name)
        if chosen.shared_modules is not None:
            shared = list(chosen.shared_modules(module, parent, decoder_layer))
        else:
            shared = sizes.shared_modules(parent, decoder_layer)
        model_layer = _model_layer(name)
        layers.append(
            MoeLayer(
                index=order,
                name=name,
                module=module,
                model_layer=order if model_layer is None else model_layer,
                n_experts=n_experts,
                expert_bytes=sizes.routed_expert_bytes(expert_mods, n_experts),
                shared_expert_bytes=sizes.module_bytes(shared),
                expert_dtype=sizes.expert_dtype(expert_mods),
                adapter=chosen,
                stack=_stack(name),
            )
        )
    return layers
