"""Bytes of one routed expert and of the shared experts, from a model's real tensors and dtypes.

What an offloading runtime moves over PCIe for one expert is exactly that expert's slice of the
parameter tensors, at the dtype they are stored in (quantized blocks and scales included). So
sizes are read from the tensors themselves, never from the config.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

# Children of an MoE block (or of its decoder layer) that hold always-resident shared experts:
# shared_expert (Qwen2-MoE, Llama 4), shared_experts (DeepSeek, GLM-4.5, Ernie 4.5, dots1),
# shared_mlp (Granite-MoE-shared, Hunyuan). Their gates (shared_expert_gate) are not experts.
_SHARED_NAME = re.compile(r"shared")
_NOT_SHARED = re.compile(r"gate")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor at its dtype (works for meta tensors: shape and dtype only)."""
    return int(t.numel()) * int(t.element_size())


def _tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    # Parameters and buffers: quantized experts (e.g. MXFP4) keep their packed weights in buffers.
    seen: set[int] = set()
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def routed_expert_bytes(modules: Sequence[nn.Module], n_experts: int) -> int:
    """Bytes of ONE routed expert held in `modules` (fused [E, ...] tensors or one module per expert).

    Fused layout: every tensor whose leading dimension is E (or a multiple of E, as DBRX stacks
    [E * ffn, hidden]) holds E equal slices; one expert owns 1/E of it. Tensors of another shape
    are not per-expert and are not counted. Per-expert layout (an ``nn.ModuleList`` or
    ``nn.ModuleDict`` of E modules, as older or custom models and Switch/NLLB-MoE use): the largest
    member's bytes.
    """
    total = 0
    for module in modules:
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)) and len(module) == n_experts:
            members = module.values() if isinstance(module, nn.ModuleDict) else module
            total += max(sum(tensor_bytes(t) for t in _tensors(m)) for m in members)
            continue
        lists = [
            child
            for child in module.children()
            if isinstance(child, nn.ModuleList) and len(child) == n_experts
        ]
        if lists:
            total += routed_expert_bytes(lists, n_experts)
            continue
        for t in _tensors(module):
            if t.dim() >= 1 and t.shape[0] >= n_experts and t.shape[0] % n_experts == 0:
                total += tensor_bytes(t) // n_experts
    return total


def shared_modules(block: nn.Module | None, layer: nn.Module | None) -> list[nn.Module]:
    """Shared-expert modules next to an MoE layer: children of its block or of its decoder layer."""
    found: list[nn.Module] = []
    for owner in (block, layer):
        if owner is None:
            continue
        for name, child in owner.named_children():
            if _SHARED_NAME.search(name) and not _NOT_SHARED.search(name):
                if all(child is not f for f in found):
                    found.append(child)
    return found


def module_bytes(modules: Iterable[nn.Module]) -> int:
    """All tensor bytes of `modules` (shared experts are resident whole)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for t in _tensors(module):
            if id(t) not in seen:
                seen.add(id(t))
                total += tensor_bytes(t)
    return total


def expert_dtype(modules: Sequence[nn.Module]) -> str | None:
    """The dtype of the largest expert tensor, e.g. "bfloat16" (for the trace's metadata)."""
    best: torch.Tensor | None = None
    for module in modules:
        for t in _tensors(module):
            if best is None or t.numel() > best.numel():
                best = t
    return None if best is None else str(best.dtype).removeprefix("torch.")
