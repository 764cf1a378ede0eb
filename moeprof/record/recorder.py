"""Capture routing from a running PyTorch MoE model into a :class:`moeprof.Trace`.

Hooks: one on each MoE layer's routing point (see :mod:`moeprof.record.adapters`) and a pair on
the model itself that delimit forward passes. Each pass is one step. A layer hook only keeps
references to the routing tensors, on their device; when the pass ends, all layers' ids and
weights, the attention mask and the token ids are packed into one tensor and copied to the host
once. So recording adds no host-device synchronisation per layer, only one small copy per step;
which tokens count and their positions are worked out on the host, from that copy.

Encoder-decoder models (Switch, NLLB-MoE): the encoder and the decoder are hooked as separate
passes instead of the whole model, since their tokens differ; an encoder pass starts new requests
(its tokens are prefill), decoder passes continue them (decode), and each token has "no expert" in
the other stack's MoE layers.

Requests: each batch row is one request. A pass continues the previous pass's requests when it
runs inside the same ``generate`` call, or (outside ``generate``) when it extends a KV cache with
the same batch size; otherwise its rows are new requests. Padding (attention_mask 0) is not
recorded, nor are the tokens ``generate`` keeps feeding a row after it produced its end token
(that row has finished; a server would have dropped it).

Shards (``shard_tokens``/``on_shard``): held tokens are handed over as a trace of whole requests,
at a request boundary once there are enough of them, and freed, so memory stays bounded.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from moeprof.errors import MoeprofError
from moeprof.record.adapters import Adapter, MoeLayer, Routing, find_moe_layers
from moeprof.trace import PHASE_DECODE, PHASE_PREFILL, Trace

_TOP_K_ATTRS = ("num_experts_per_tok", "moe_k", "moe_topk", "moe_top_k", "top_k")


@dataclass
class _Pass:
    """One forward pass in flight: its token layout and, per MoE layer, what the hooks saw."""

    batch: int
    seq: int
    device: torch.device
    mask: torch.Tensor | None  # [B, >= S] attention mask; its last S columns are this pass's
    tokens: torch.Tensor | None  # [B, S] token ids
    phase: int
    group: int  # which _Requests the rows belong to
    request_base: int
    # A generate() decode step: that call's end tokens (rows past them are not real work).
    eos: np.ndarray | None
    captures: list[list[Routing]] = field(default_factory=list)


@dataclass
class _Requests:
    """The open requests (one per batch row) that the next pass may continue."""

    group: int
    base: int
    batch: int


@dataclass
class _RowState:
    """Host-side progress of one group of requests, advanced step by step from the host copies."""

    group: int
    row_len: np.ndarray  # [B] int64: tokens recorded so far per row
    done: np.ndarray  # [B] bool: row was fed its end token


class _RawStep(NamedTuple):
    """One forward pass on the host (numpy views of its own copies), not yet looked at."""

    ids: np.ndarray  # [L, N, K] integers
    weights: np.ndarray  # [L, N, K] float16 (NaN where the adapter gives none)
    mask: np.ndarray | None  # [B, S] attention mask (0 = padding)
    tokens: np.ndarray | None  # [B, S] token ids
    batch: int
    seq: int
    step: int
    phase: int
    group: int
    request_base: int
    eos: np.ndarray | None  # the end tokens of the generate() call this decode step is part of


# A step's host arrays: ids [L, N, K], weights [L, N, K] fp16, mask [B, S] | None, tokens | None.
_StepArrays = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


def _held_bytes(arrays: _StepArrays) -> int:
    """Host memory the arrays keep alive: views count their whole buffers, each buffer once."""
    buffers = {}
    for a in arrays:
        if a is not None:
            owner = a if a.base is None else a.base
            buffers[id(owner)] = owner.nbytes
    return sum(buffers.values())


class _Rows(NamedTuple):
    """A raw step with its recorded tokens known: ready to be unpacked into trace rows."""

    raw: _RawStep
    keep: np.ndarray  # indices (into the step's B x S tokens) of the recorded tokens
    positions: np.ndarray  # [n] int64: their positions in their requests
    tokens: np.ndarray | None  # [n] their token ids


@dataclass
class _Chunk:
    """Host copy of one pass's recorded tokens."""

    expert_ids: np.ndarray  # [n, L, K] uint16 (sentinel = layer's expert count)
    gate_weights: np.ndarray  # [n, L, K] float16 (NaN where the adapter gives none)
    request_ids: np.ndarray  # [n] int64
    positions: np.ndarray  # [n] int32
    token_ids: np.ndarray | None  # [n] int32
    step: int
    phase: int


_LITTLE_ENDIAN = sys.byteorder == "little"
# Unpack the steps held in raw form into compact rows once they hold this much host memory.
_PENDING_BYTES = 256 << 20


def _params(module: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []


def _config_top_k(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    seen = [config]
    for sub in ("text_config", "ffn_config"):
        seen.append(getattr(config, sub, None))
    for cfg in seen:
        if cfg is None:
            continue
        for attr in _TOP_K_ATTRS:
            value = getattr(cfg, attr, None)
            if isinstance(value, (list, tuple)) and value:
                value = max(int(v) for v in value)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _has_own_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


def _generating_sub_models(model: nn.Module, layers: list[MoeLayer]) -> list[tuple[str, nn.Module]]:
    """The children a forward-less wrapper generates with, in attribute order, that hold MoE layers.

    A model without a forward of its own cannot run a pass: its generate() must run a sub-model
    (Qwen3-Omni: the thinker generates the text, then the talker the speech codes from it).
    Empty for every model with a forward.
    """
    if _has_own_forward(model):
        return []
    found = []
    for name, child in model.named_children():
        if not _has_own_forward(child) or not callable(getattr(child, "generate", None)):
            continue
        if any(layer.name.startswith(name + ".") for layer in layers):
            found.append((name, child))
    return found


class Recorder:
    """Records routing while attached; build with :func:`record` and use as a context manager.

    ``on_step(recorder)`` is called after every recorded forward pass (e.g. to drive a progress
    bar from :attr:`n_tokens`). ``settings`` land in the trace's ``source`` metadata.

    ``shard_tokens=N`` with ``on_shard(trace)``: once N tokens are held, the recording is cut at
    the next request boundary (a ``generate`` call returns, or a pass starts new requests): the
    held tokens go to ``on_shard`` as one trace of whole requests and are then freed, so memory
    stays bounded by N plus one batch of requests. :meth:`to_trace` then gives what was not
    handed over yet (the last, partial shard).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        adapter: str | Adapter | None = None,
        model_id: str | None = None,
        revision: str | None = None,
        settings: dict[str, Any] | None = None,
        on_step: Callable[[Recorder], None] | None = None,
        shard_tokens: int | None = None,
        on_shard: Callable[[Trace], None] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise MoeprofError("record() takes a torch.nn.Module (a loaded model)")
        if shard_tokens is not None and (isinstance(shard_tokens, bool) or shard_tokens < 1):
            raise MoeprofError("shard_tokens must be at least 1")
        if shard_tokens is not None and on_shard is None:
            raise MoeprofError("shard_tokens needs on_shard, the function that stores each shard")
        self.model = model
        layers = find_moe_layers(model, adapter)
        # A wrapper with no forward of its own whose generate() runs a generating sub-model
        # (Qwen3-Omni: thinker, then talker): record that sub-model's passes, its layers only.
        self.sub_model: str | None = None
        self.sub_models_not_recorded: list[str] = []
        stepper: nn.Module = model
        delegates = _generating_sub_models(model, layers)
        if delegates:
            self.sub_model, stepper = delegates[0]
            self.sub_models_not_recorded = [name for name, _ in delegates[1:]]
            prefix = self.sub_model + "."
            mine = [layer for layer in layers if layer.name.startswith(prefix)]
            layers = [dataclasses.replace(layer, index=i) for i, layer in enumerate(mine)]
        self.layers: list[MoeLayer] = layers
        self.adapter = self.layers[0].adapter
        self.settings = dict(settings or {})
        self.model_id = model_id
        self.revision = revision
        self.on_step = on_step
        self.shard_tokens = shard_tokens
        # True: no cut until the caller ships the rest itself (its last batch, with its totals).
        self.hold_cuts = False
        self.on_shard = on_shard
        self._stepper = stepper
        self._n_experts = np.array([layer.n_experts for layer in self.layers], dtype=np.int64)
        self._default_k = _config_top_k(stepper) or _config_top_k(model)
        # Modules whose forward passes are steps, with their parameter names and role.
        self._boundaries: list[tuple[nn.Module, list[str], str | None]] = []
        config = getattr(stepper, "config", None)
        get_encoder = getattr(stepper, "get_encoder", None)
        get_decoder = getattr(stepper, "get_decoder", None)
        if getattr(config, "is_encoder_decoder", False) and callable(get_encoder):
            for role, part in (("encoder", get_encoder()), ("decoder", get_decoder())):  # type: ignore[misc]
                if isinstance(part, nn.Module):
                    self._boundaries.append((part, _params(part), role))
        if len(self._boundaries) != 2:
            self._boundaries = [(stepper, _params(stepper), None)]
        self._handles: list[Any] = []
        # (module, the instance attribute its generate had before patching, or None)
        self._generate_patched: list[tuple[nn.Module, Any]] = []
        # Recording state.
        self._active: _Pass | None = None
        self._open: _Requests | None = None
        self._rows: _RowState | None = None
        self._groups = 0
        self._generate_depth = 0
        self._last_role: str | None = None  # encoder/decoder role of the latest pass
        self._generate_passes = 0
        self._eos = np.zeros(0, np.int64)
        self._next_request = 0
        self._chunks: list[_Chunk] = []
        # Steps pass through two queues, both worked off only when their results are asked for
        # (to_trace, n_tokens) or they hold too much memory: the step path itself only copies.
        # Each queue loses an item only once its result is stored, so a Ctrl-C while they are
        # worked off (e.g. in a progress callback) loses nothing.
        self._raw: deque[_RawStep] = deque()  # copied to the host, tokens not yet counted
        self._pending: deque[_Rows] = deque()  # tokens counted, not yet unpacked into trace rows
        self._pending_bytes = 0
        self._n_counted = 0
        self._layer_passes = [0] * len(self.layers)  # passes in which each layer routed
        self._tokens_unknown = False
        self.n_passes = 0  # forward passes recorded (= steps)
        self.orphan_calls = 0  # MoE-layer calls seen outside a forward of `model`
        # Sharding: what earlier shards took (they fix the layer set and top-k of later ones).
        self.n_shards = 0  # shards handed to on_shard
        self._shipped_passes = 0
        self._shard_layout: tuple[list[MoeLayer], int] | None = None

    # ------------------------------------------------------------------ attach / detach
    def __enter__(self) -> Recorder:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        if self._handles:
            return
        try:
            for layer in self.layers:
                hook = self._layer_hook(layer.index, layer.adapter)
                if layer.adapter.hook == "pre":
                    h = layer.module.register_forward_pre_hook(hook, with_kwargs=True)
                else:
                    h = layer.module.register_forward_hook(hook, with_kwargs=True)
                self._handles.append(h)
            for module, params, role in self._boundaries:
                self._handles.append(
                    module.register_forward_pre_hook(
                        self._pass_starter(params, role), with_kwargs=True
                    )
                )
                self._handles.append(
                    module.register_forward_hook(self._end_pass, with_kwargs=True, always_call=True)
                )
            self._patch_generate()
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove every hook (safe to call twice); a pass in flight is dropped."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, prev in reversed(self._generate_patched):
            if prev is None:
                module.__dict__.pop("generate", None)
            else:
                module.__dict__["generate"] = prev
        self._generate_patched.clear()
        self._active = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _patch_generate(self) -> None:
        self._patch_one_generate(self.model)
        if self._stepper is not self.model:
            self._patch_one_generate(self._stepper)

    def _patch_one_generate(self, module: nn.Module) -> None:
        original = getattr(module, "generate", None)
        if original is None or not callable(original):
            return
        prev = module.__dict__.get("generate")
        # The generate() of the module whose passes are steps opens a request set and says which
        # end tokens it stops at (a wrapper passes its sub-model other ones, e.g. thinker_*).
        sub_model = module is self._stepper and module is not self.model

        def generate(*args: Any, **kwargs: Any) -> Any:
            self._generate_depth += 1
            if self._generate_depth == 1 or sub_model:
                self._generate_passes = 0
                self._open = None
                self._set_eos(kwargs, module)
            try:
                result = original(*args, **kwargs)
            finally:
                self._generate_depth -= 1
                if self._generate_depth == 0:
                    self._open = None  # the next call starts new requests
            if self._generate_depth == 0:
                self._maybe_cut()  # its requests are complete: a shard may end here
            return result

        module.__dict__["generate"] = generate
        self._generate_patched.append((module, prev))

    def _set_eos(self, kwargs: dict[str, Any], module: nn.Module) -> None:
        eos = kwargs.get("eos_token_id")
        if eos is None:
            gen_config = kwargs.get("generation_config") or getattr(
                module, "generation_config", None
            )
            eos = getattr(gen_config, "eos_token_id", None)
        if isinstance(eos, torch.Tensor):
            eos = eos.flatten().tolist()
        if isinstance(eos, int):
            eos = [eos]
        self._eos = np.array([int(e) for e in eos] if eos else [], np.int64)

    # ------------------------------------------------------------------ hooks
    def _layer_hook(self, index: int, adapter: Adapter) -> Callable[..., None]:
        routing = adapter.routing

        if adapter.hook == "pre":

            def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                p = self._active
                if p is None:
                    self.orphan_calls += 1
                    return None
                p.captures[index].append(routing(module, args, kwargs, None))
                return None

            return pre

        def post(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            p = self._active
            if p is None:
                self.orphan_calls += 1
                return None
            p.captures[index].append(routing(module, args, kwargs, output))
            return None

        return post

    def _pass_starter(self, params: list[str], role: str | None) -> Callable[..., None]:
        def begin(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._start_pass(params, role, args, kwargs)

        return begin

    def _begin_pass(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A forward pass of `module` (the whole model) starts."""
        self._start_pass(_params(module), None, args, kwargs)

    def _start_pass(
        self, params: list[str], role: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        # A pass still marked active here was aborted (an exception or Ctrl-C skipped its end).
        self._active = None
        named = dict(zip(params, args, strict=False))
        named.update(kwargs)
        input_ids = named.get("input_ids")
        embeds = named.get("inputs_embeds")
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
            batch, seq = int(input_ids.shape[0]), int(input_ids.shape[1])
            device = input_ids.device
            tokens: torch.Tensor | None = input_ids
        elif isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
            batch, seq = int(embeds.shape[0]), int(embeds.shape[1])
            device = embeds.device
            tokens = None
        else:
            raise MoeprofError(
                "moeprof.record: a forward pass without 2-D input_ids or 3-D inputs_embeds; "
                "cannot tell which tokens were routed"
            )
        mask = named.get("attention_mask")
        mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if mask2d is not None and (int(mask2d.shape[0]) != batch or int(mask2d.shape[1]) < seq):
            raise MoeprofError(
                f"moeprof.record: attention_mask of shape {tuple(mask2d.shape)} does not cover "
                f"the {batch} x {seq} input tokens"
            )

        if role is not None:  # encoder-decoder: the decoder continues the encoder's requests
            continuing = role == "decoder"
        elif self._generate_depth > 0:
            continuing = self._generate_passes > 0
        else:
            has_past = mask2d is not None and int(mask2d.shape[1]) > seq
            if not has_past:
                cache = named.get("cache", named.get("past_key_values"))
                get_len = getattr(cache, "get_seq_length", None)
                has_past = bool(get_len is not None and int(get_len()) > 0)
            continuing = has_past
        continuing = continuing and self._open is not None and self._open.batch == batch
        if not continuing:
            self._open = None
            self._maybe_cut()  # every earlier request is complete: a shard may end here
            self._open = _Requests(group=self._groups, base=self._next_request, batch=batch)
            self._groups += 1
            self._next_request += batch
        requests = self._open
        assert requests is not None
        last_role, self._last_role = self._last_role, role
        decode = continuing and (self._generate_depth > 0 or seq == 1 or role == "decoder")
        # No tensor work here: validity and positions are computed on the host from the step's copy.
        self._active = _Pass(
            batch=batch,
            seq=seq,
            device=device,
            mask=mask2d,
            tokens=tokens,
            phase=PHASE_DECODE if decode else PHASE_PREFILL,
            group=requests.group,
            request_base=requests.base,
            # Counting happens later, maybe after another generate() call set other end tokens.
            # A decoder's first input is its start token, which may be the end token (NLLB).
            eos=self._eos
            if decode and self._generate_depth > 0 and self._eos.size and last_role != "encoder"
            else None,
            captures=[[] for _ in self.layers],
        )
        return None

    def _end_pass(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        p, self._active = self._active, None
        if p is None or output is None:  # the forward raised: nothing to keep from it
            return None
        with torch.no_grad():
            self._finish(p)
        if self._generate_depth > 0:
            self._generate_passes += 1
        if self.on_step is not None:
            self.on_step(self)
        return None

    # ------------------------------------------------------------------ one copy per step
    def _finish(self, p: _Pass) -> None:
        n_rows = p.batch * p.seq
        ks = [int(c[0][0].shape[-1]) for c in p.captures if c]
        top_k = max(ks) if ks else (self._default_k or 1)
        for layer, caps in zip(self.layers, p.captures, strict=True):
            if len(caps) > 1:
                raise MoeprofError(
                    f"MoE layer {layer.name} was called {len(caps)} times in one forward pass; "
                    "register an adapter that hooks a module called once per layer"
                )
            if caps:
                self._layer_passes[layer.index] += 1
                if caps[0][0].shape[0] != n_rows:
                    raise MoeprofError(
                        f"MoE layer {layer.name} routed {int(caps[0][0].shape[0])} tokens in a "
                        f"forward pass of {p.batch} x {p.seq} tokens; this model drops or reorders "
                        "tokens before routing and needs its own adapter"
                    )
        ids_all = weights_all = None
        if all(len(c) == 1 and c[0][1] is not None for c in p.captures):
            # Common case: every layer routed all tokens with k slots on one device; stack checks
            # shapes and devices itself (and promotes mixed dtypes), so try it first.
            try:
                ids_all = torch.stack([c[0][0] for c in p.captures])
                weights_all = torch.stack([c[0][1] for c in p.captures])  # type: ignore[misc]
            except RuntimeError:
                ids_all = weights_all = None
        if ids_all is None or weights_all is None:
            ids_all, weights_all = self._stack_mixed(p, n_rows, top_k)
        mask = None
        if p.mask is not None:
            # This pass's columns are the last `seq` ([:, -0:] would be all of them).
            mask = p.mask[:, p.mask.shape[1] - p.seq :] if p.mask.shape[1] != p.seq else p.mask
            if mask.is_floating_point():
                mask = mask != 0
        if p.tokens is None:
            self._tokens_unknown = True
        if p.device.type == "cpu" and ids_all.device.type == "cpu":
            arrays = self._host_step(p, ids_all, weights_all, mask)
        else:
            arrays = self._copied_step(p, ids_all, weights_all, mask)
        raw = _RawStep(
            *arrays, p.batch, p.seq, self.n_passes, p.phase, p.group, p.request_base, p.eos
        )
        self._raw.append(raw)
        self.n_passes += 1
        self._pending_bytes += _held_bytes(arrays)
        if self._pending_bytes > _PENDING_BYTES:
            self._drain()

    def _host_step(
        self, p: _Pass, ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None
    ) -> _StepArrays:
        """A pass that ran on the CPU: no copy needed, only own copies of what the caller may reuse.

        The stacks already are fresh tensors; the mask and token ids are the caller's (a serving
        loop may refill them in place), so they are stacked into one fresh tensor too.
        """
        if mask is not None and p.tokens is not None:
            book = torch.stack([mask.to(device="cpu", dtype=p.tokens.dtype), p.tokens]).numpy()
            mask_np, tokens_np = book[0], book[1]
        else:
            mask_np = None if mask is None else mask.to("cpu", copy=True).numpy()
            tokens_np = None if p.tokens is None else p.tokens.clone().numpy()
        return ids.numpy(), weights.to(torch.float16).numpy(), mask_np, tokens_np

    def _copied_step(
        self, p: _Pass, ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None
    ) -> _StepArrays:
        """A pass on an accelerator: everything packed into one int32 tensor, copied to the host
        once (int32 halves the copy of a large prefill step; ids and token ids fit)."""
        parts = [
            ids.reshape(-1).to(device=p.device, dtype=torch.int32),
            weights.reshape(-1)
            .to(device=p.device, dtype=torch.float16)
            .view(torch.int16)
            .to(torch.int32),
        ]
        if mask is not None:
            parts.append(mask.reshape(-1).to(device=p.device, dtype=torch.int32))
        if p.tokens is not None:
            parts.append(p.tokens.reshape(-1).to(device=p.device, dtype=torch.int32))
        host = torch.cat(parts).cpu().numpy()  # the single device->host copy of this step
        shape = tuple(ids.shape)
        size = ids.numel()
        bits = host[size : 2 * size]
        if _LITTLE_ENDIAN:  # the low 16 bits of each int32 hold the fp16 pattern: a view
            weights_np = bits.view(np.uint16)[::2].view(np.float16)
        else:
            weights_np = (bits & 0xFFFF).astype(np.uint16).view(np.float16)
        offset = 2 * size
        n_rows = p.batch * p.seq
        mask_np = tokens_np = None
        if mask is not None:
            mask_np = host[offset : offset + n_rows].reshape(p.batch, p.seq)
            offset += n_rows
        if p.tokens is not None:
            tokens_np = host[offset : offset + n_rows].reshape(p.batch, p.seq)
        return host[:size].reshape(shape), weights_np.reshape(shape), mask_np, tokens_np

    @property
    def n_tokens(self) -> int:
        """Tokens recorded so far (with sharding: including the shards already handed over)."""
        self._count()
        return self._n_counted

    @property
    def held_tokens(self) -> int:
        """Tokens the recorder holds now, counted from its buffers (not handed to a shard yet)."""
        self._count()
        return sum(len(c.positions) for c in self._chunks) + sum(
            int(r.keep.size) for r in self._pending
        )

    def _count(self) -> None:
        """Find the recorded tokens of the raw steps, in step order: rows carry state across steps."""
        while self._raw:
            raw = self._raw[0]
            if raw.mask is not None:
                valid = raw.mask != 0
            else:
                valid = np.ones((raw.batch, raw.seq), bool)
            rows = self._rows
            if rows is None or rows.group != raw.group:
                rows = _RowState(
                    raw.group, np.zeros(raw.batch, np.int64), np.zeros(raw.batch, bool)
                )
            done = rows.done
            if raw.eos is not None and raw.tokens is not None:
                # generate() feeds a finished row its end token, then padding: not real work.
                valid &= ~done[:, None]
                fed_eos = np.isin(raw.tokens, raw.eos)
                done = done | fed_eos.any(axis=1)
                valid &= ~fed_eos
            positions = rows.row_len[:, None] + np.cumsum(valid, axis=1) - 1
            keep = np.flatnonzero(valid)
            tokens = None if raw.tokens is None else raw.tokens.reshape(-1)[keep]
            # Commit: the new row state, the counted step, and only then drop the raw one.
            self._rows = _RowState(raw.group, rows.row_len + valid.sum(axis=1), done)
            if keep.size:
                self._pending.append(_Rows(raw, keep, positions.reshape(-1)[keep], tokens))
                self._n_counted += int(keep.size)
            self._raw.popleft()

    def _stack_mixed(self, p: _Pass, n_rows: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[L, N, K] ids (int32) and weights (fp16) when layers differ: missing calls, k, devices."""
        ids_parts: list[torch.Tensor] = []
        weight_parts: list[torch.Tensor] = []
        for layer, caps in zip(self.layers, p.captures, strict=True):
            weights: torch.Tensor | None = None
            if caps:
                ids, weights = caps[0]
                ids = ids.detach().to(device=p.device, dtype=torch.int32)
            else:  # the layer did not run in this pass: "no expert"
                ids = torch.full(
                    (n_rows, top_k), layer.n_experts, dtype=torch.int32, device=p.device
                )
            if weights is None:
                weights = torch.full(ids.shape, math.nan, dtype=torch.float16, device=p.device)
            else:
                weights = weights.detach().to(device=p.device, dtype=torch.float16)
            if ids.shape[1] < top_k:  # a layer with fewer slots: pad with "no expert"
                pad = top_k - int(ids.shape[1])
                ids = torch.nn.functional.pad(ids, (0, pad), value=layer.n_experts)
                weights = torch.nn.functional.pad(weights, (0, pad), value=math.nan)
            ids_parts.append(ids)
            weight_parts.append(weights)
        return torch.stack(ids_parts), torch.stack(weight_parts)

    def _drain(self) -> None:
        """Unpack the steps recorded so far into trace rows."""
        self._count()
        while self._pending:
            self._chunks.append(self._unpack(self._pending[0]))
            self._pending.popleft()
        self._pending_bytes = 0

    def _unpack(self, step_rows: _Rows) -> _Chunk:
        raw, keep = step_rows.raw, step_rows.keep
        # Every row valid (most decode steps): a slice, not a gather.
        rows: slice | np.ndarray = slice(None) if keep.size == raw.batch * raw.seq else keep
        ids = raw.ids[:, rows].transpose(1, 0, 2)
        sentinel = self._n_experts[None, :, None]
        if int(ids.min()) < 0 or int(ids.max()) >= int(self._n_experts.min()):
            ids = np.where((ids < 0) | (ids >= sentinel), sentinel, ids)
        ids = ids.astype(np.uint16)
        weights = raw.weights[:, rows].transpose(1, 0, 2)
        return _Chunk(
            expert_ids=np.ascontiguousarray(ids),
            gate_weights=np.ascontiguousarray(weights),
            request_ids=raw.request_base + keep // raw.seq,
            positions=step_rows.positions.astype(np.int32),
            token_ids=None if step_rows.tokens is None else step_rows.tokens.astype(np.int32),
            step=raw.step,
            phase=raw.phase,
        )

    # ------------------------------------------------------------------ result
    @property
    def top_k(self) -> int:
        self._drain()
        ks = [c.expert_ids.shape[2] for c in self._chunks]
        return max(ks) if ks else (self._default_k or 1)

    def _kept_layers(self) -> list[MoeLayer]:
        """The layers that go into the trace: those whose hook fired, once any did.

        A layer that never ran while others did serves a modality the input lacked (the vision
        experts of a text-only run); it is left out and named in the metadata. No layer firing
        at all means a kernel bypassed the hooked modules: that is an error.
        """
        if not self.n_tokens:
            return list(self.layers)
        ran = [layer for layer in self.layers if self._layer_passes[layer.index] > 0]
        if not ran:
            raise MoeprofError(
                f"the routing hook of {self.layers[0].name} never fired although tokens went "
                "through the model; a fused kernel may bypass the module (e.g. use_kernels=True). "
                "Load the model without kernels to record it"
            )
        return ran

    def _shard_layers(self) -> list[MoeLayer]:
        """The layers of the next trace: after a shard, the first shard's (all shards alike)."""
        kept = self._kept_layers()
        if self._shard_layout is None:
            return kept
        fixed = self._shard_layout[0]
        late = [layer.name for layer in kept if layer not in fixed]
        if late:
            raise MoeprofError(
                f"MoE module {late[0]} first routed tokens after shard 0 was written without it; "
                "record this input without --shard-tokens (or start with an input that uses it)"
            )
        return fixed

    def metadata(self) -> dict[str, Any]:
        """Trace metadata: model, MoE layer placement, shared-expert bytes, how it was recorded."""
        return self._metadata(self._shard_layers())

    def _metadata(self, layers: list[MoeLayer]) -> dict[str, Any]:
        config = getattr(self.model, "config", None)
        model_id = self.model_id
        if model_id is None:
            model_id = getattr(self.model, "name_or_path", None) or getattr(
                config, "_name_or_path", None
            )
        archs = getattr(config, "architectures", None) or [type(self.model).__name__]
        revision = self.revision or getattr(config, "_commit_hash", None)
        shared = [layer.shared_expert_bytes for layer in layers]
        source: dict[str, Any] = {
            "kind": "record",
            "adapter": self.adapter.name,
            "moe_modules": [layer.name for layer in layers],
            "expert_dtype": self.layers[0].expert_dtype,
            "forward_passes": self.n_passes - self._shipped_passes,
        }
        if self.sub_model is not None:
            # Only this sub-model's passes are steps; the others (Qwen3-Omni's talker: speech
            # codes, not text tokens) are neither hooked nor recorded.
            source["recorded_sub_model"] = self.sub_model
            if self.sub_models_not_recorded:
                source["sub_models_not_recorded"] = self.sub_models_not_recorded
        if self.shard_tokens is not None:
            source["shard"] = self.n_shards
            source["shard_tokens"] = self.shard_tokens
        stacks = [layer.stack for layer in layers]
        if len(set(stacks)) > 1:  # encoder-decoder: say which stack each layer index counts in
            source["moe_layer_stacks"] = stacks
        left_out = [layer.name for layer in self.layers if layer not in layers]
        if left_out:
            source["moe_modules_not_run"] = left_out
        source.update(self.settings)
        return {
            "model": {"id": model_id or None, "architecture": str(archs[0]), "revision": revision},
            "moe_layer_indices": [layer.model_layer for layer in layers],
            "shared_expert_bytes": max(shared) if shared else 0,
            "shared_expert_bytes_per_layer": shared,
            "source": source,
        }

    def to_trace(self, *, settings: dict[str, Any] | None = None) -> Trace:
        """Everything recorded so far as a trace (rows request-major). Callable while attached.

        With sharding, everything not handed to ``on_shard`` yet (the last shard).
        """
        if self.n_passes == 0 and self.orphan_calls:
            # A wrapper whose generate() runs a sub-model (Qwen3-Omni's thinker): its own forward,
            # where passes begin, never ran, so no token can be placed. An empty trace would lie.
            kind = type(self.model).__name__
            raise MoeprofError(
                f"{kind}: its MoE layers ran {self.orphan_calls} times outside {kind}.forward "
                "(its generate() runs a sub-model); record that sub-model instead"
            )
        kept = self._shard_layers()
        top_k = self.top_k  # unpacks the pending steps too
        if self._shard_layout is not None:
            fixed_k = self._shard_layout[1]
            if top_k > fixed_k:
                raise MoeprofError(
                    f"a pass routed {top_k} experts per token after shard 0 was written with "
                    f"{fixed_k}; record this input without --shard-tokens"
                )
            top_k = fixed_k
        n_layers = len(self.layers)
        ids_parts, weight_parts = [], []
        for c in self._chunks:
            pad = top_k - c.expert_ids.shape[2]
            ids, weights = c.expert_ids, c.gate_weights
            if pad:
                ids = np.concatenate(
                    [
                        ids,
                        np.broadcast_to(self._n_experts[None, :, None], (len(ids), n_layers, pad)),
                    ],
                    axis=2,
                ).astype(np.uint16)
                weights = np.concatenate(
                    [weights, np.full((len(ids), n_layers, pad), np.nan, np.float16)], axis=2
                )
            ids_parts.append(ids)
            weight_parts.append(weights)
        if ids_parts:
            expert_ids = np.concatenate(ids_parts)
            gate_weights: np.ndarray | None = np.concatenate(weight_parts)
            requests = np.concatenate([c.request_ids for c in self._chunks])
            # Dense request numbers in order of first appearance (rows that held only padding vanish).
            _, requests = np.unique(requests, return_inverse=True)
            positions = np.concatenate([c.positions for c in self._chunks])
            steps = np.concatenate(
                [np.full(len(c.positions), c.step, np.int32) for c in self._chunks]
            )
            phase = np.concatenate(
                [np.full(len(c.positions), c.phase, np.uint8) for c in self._chunks]
            )
            if self._tokens_unknown:
                tokens = None
            else:
                tokens = np.concatenate(
                    [c.token_ids for c in self._chunks if c.token_ids is not None]
                )
        else:
            expert_ids = np.zeros((0, n_layers, top_k), np.uint16)
            gate_weights = None
            requests = positions = steps = np.zeros(0, np.int32)
            phase = np.zeros(0, np.uint8)
            tokens = None
        if gate_weights is not None and np.isnan(gate_weights).all():
            gate_weights = None  # the adapter exposes no weights
        if len(kept) < n_layers:
            cols = [layer.index for layer in kept]
            expert_ids = expert_ids[:, cols]
            if gate_weights is not None:
                gate_weights = gate_weights[:, cols]
        meta = self._metadata(kept)
        if settings:
            meta["source"].update(settings)
        return Trace.from_arrays(
            expert_ids,
            n_experts=self._n_experts[[layer.index for layer in kept]],
            request_ids=requests,
            positions=positions,
            gate_weights=gate_weights,
            steps=steps,
            phase=phase,
            token_ids=tokens,
            expert_bytes=[layer.expert_bytes for layer in kept],
            meta=meta,
        )

    def take_trace(self, *, settings: dict[str, Any] | None = None) -> Trace:
        """Everything held as a trace, then freed: a shard. Call it between requests (e.g.
        between ``generate`` calls); tokens of a request still running would become a request
        of their own in the next shard. Later shards keep this one's layers and top-k."""
        trace = self.to_trace(settings=settings)
        self._forget(trace)
        return trace

    def _forget(self, shard: Trace) -> None:
        """Free the held tokens once `shard`, built from them, is stored."""
        if self._shard_layout is None:
            self._shard_layout = (self._shard_layers(), shard.top_k)
        self._shipped_passes = self.n_passes
        self._chunks = []
        self._pending.clear()
        self._pending_bytes = 0
        self._tokens_unknown = False
        self.n_shards += 1

    def _maybe_cut(self) -> None:
        """At a request boundary: hand the held tokens to on_shard once they reach shard_tokens.

        The buffers are freed only after on_shard returns, so a Ctrl-C or error while it stores
        the shard loses nothing: the tokens stay held and go into the next (or last) shard.
        """
        if self.shard_tokens is None or self.on_shard is None or self.hold_cuts:
            return
        if self.held_tokens < self.shard_tokens:
            return
        self.ship()

    def ship(self, *, settings: dict[str, Any] | None = None) -> Trace:
        """Hand everything held to ``on_shard`` as a shard, then free it (in that order: a Ctrl-C
        or error while the shard is stored loses nothing). Returns the shard."""
        if self.on_shard is None:
            raise MoeprofError("ship() needs an on_shard callback; use take_trace()")
        shard = self.to_trace(settings=settings)
        self.on_shard(shard)
        self._forget(shard)
        return shard


def record(
    model: nn.Module,
    *,
    adapter: str | Adapter | None = None,
    model_id: str | None = None,
    revision: str | None = None,
    settings: dict[str, Any] | None = None,
    on_step: Callable[[Recorder], None] | None = None,
    shard_tokens: int | None = None,
    on_shard: Callable[[Trace], None] | None = None,
) -> Recorder:
    """Record the routing of every forward pass of `model` while the context is open.

    Also available as ``moeprof.record_routing``.

    >>> from moeprof.record import record           # doctest: +SKIP
    >>> with record(model) as rec:                  # doctest: +SKIP
    ...     model.generate(**inputs, max_new_tokens=16)
    >>> trace = rec.to_trace()                      # doctest: +SKIP

    Finds the MoE layers now (a model without any raises MoeprofError); hooks attach on
    entering the ``with`` block and always detach on leaving it, also on error.
    ``shard_tokens``/``on_shard``: bounded-memory recording in shards (see :class:`Recorder`).
    """
    return Recorder(
        model,
        adapter=adapter,
        model_id=model_id,
        revision=revision,
        settings=settings,
        on_step=on_step,
        shard_tokens=shard_tokens,
        on_shard=on_shard,
    )
