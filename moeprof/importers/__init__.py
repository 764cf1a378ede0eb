"""Import routing captured by other tools into a moeprof trace.

One module per source format turns files into :class:`TokenRouting` (token-major arrays, ``-1`` =
no expert); :func:`build_trace` here resolves expert counts and sizes and makes the
:class:`~moeprof.trace.Trace`. Formats:

- ``long-csv`` / ``long-jsonl`` (:mod:`.long_table`): one row per (request, token, layer).
- ``vllm`` (:mod:`.vllm`): ``routed_experts`` / ``prompt_routed_experts`` arrays, one request per file.
- ``sglang`` (:mod:`.sglang`): expert-distribution recorder dumps in ``per_token`` mode.

Expert sizes come from ``expert_bytes`` or from a Hugging Face config (:mod:`.model_config`).
Problems the user can fix raise :class:`~moeprof.errors.MoeprofError` naming the file and line;
dropped tokens are reported with :class:`MoeprofImportWarning`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moeprof.errors import MoeprofError
from moeprof.importers.common import (
    PHASES,
    MoeprofImportWarning,
    PathLike,
    Progress,
    TokenRouting,
    warn,
)
from moeprof.importers.model_config import ModelExperts, load_model_config
from moeprof.importers.registry import FORMATS, SUFFIXES, get_format
from moeprof.trace import Trace, describe_warmup, warmup_tokens

__all__ = [
    "FORMATS",
    "MoeprofImportWarning",
    "TokenRouting",
    "build_trace",
    "detect_format",
    "import_trace",
    "list_sources",
]

_LONG_OPTIONS = (
    "request_col",
    "position_col",
    "layer_col",
    "experts_col",
    "weights_col",
    "where",
    "request_scope",
    "step_from_resets",
)
_FORMAT_OPTIONS = ("top_k",)  # options a format takes when it lists them in its `options`


def detect_format(paths: Sequence[Path]) -> str:
    """The format implied by the files' endings (a folder: by the files it holds)."""
    found: set[str] = set()
    for p in paths:
        files = [c for c in p.iterdir() if c.is_file()] if p.is_dir() else [p]
        for f in files:
            matched = [fmt for fmt, ends in SUFFIXES.items() if f.name.lower().endswith(ends)]
            if len(matched) > 1:
                # A shared ending (.npz): a format that recognises the contents wins.
                verdict = {fmt: get_format(fmt).claims(f) for fmt in matched}
                matched = [m for m, v in verdict.items() if v] or [
                    m for m, v in verdict.items() if v is None
                ]
            found.update(matched)
    if len(found) == 1:
        return found.pop()
    if not found:
        raise MoeprofError(
            f"cannot tell the format from the file names; name it (one of {', '.join(FORMATS)})"
        )
    raise MoeprofError(
        f"the sources mix formats ({', '.join(sorted(found))}); name the format to read"
    )


def list_sources(src: PathLike | Sequence[PathLike], fmt: str) -> list[Path]:
    """Files to read, in order: each file as given; each folder's files of the format, by name."""
    items = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    if not items:
        raise MoeprofError("no source given")
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            inside = sorted(
                (c for c in p.iterdir() if c.is_file() and c.name.lower().endswith(SUFFIXES[fmt])),
                key=lambda c: c.name,
            )
            if not inside:
                raise MoeprofError(
                    f"folder {p} holds no {fmt} files (ending in {', '.join(SUFFIXES[fmt])})"
                )
            files.extend(inside)
        elif p.is_file():
            files.append(p)
        else:
            raise MoeprofError(f"source {p} not found")
    return files


def _resolve_n_experts(routing: TokenRouting, n_experts: int | None) -> int:
    ids = routing.expert_ids
    valid = ids >= 0
    if not valid.any():
        raise MoeprofError("the source holds no routed expert ids")
    top = int(ids.max())
    if n_experts is None:
        return max(top + 1, routing.n_experts_hint or 0)
    if top >= n_experts:
        t, layer = (int(x) for x in np.argwhere(ids == top)[0][:2])
        where = routing.locate(t, layer) if routing.locate else f"token {t}, layer {layer}"
        raise MoeprofError(f"{where}: expert id {top} is out of range for {n_experts} experts")
    return n_experts


def _layer_indices(routing: TokenRouting, model: ModelExperts | None) -> list[int]:
    n_layers = routing.expert_ids.shape[1]
    config_layers = list(model.moe_layer_indices) if model is not None else None
    if routing.layer_numbers is not None:
        layers = [int(x) for x in routing.layer_numbers]
        if config_layers is not None and not set(layers) <= set(config_layers):
            warn(
                f"layer numbers {layers[0]}..{layers[-1]} are not all MoE layers of the model "
                f"config (MoE layers {config_layers[0]}..{config_layers[-1]}); kept as given"
            )
        return layers
    if config_layers is not None:
        if len(config_layers) != n_layers:
            raise MoeprofError(
                f"the source has {n_layers} MoE layers but the model config has "
                f"{len(config_layers)}; is it the right config?"
            )
        return config_layers
    return list(range(n_layers))


def build_trace(
    routing: TokenRouting,
    *,
    fmt: str,
    sources: Sequence[Path],
    n_experts: int | None = None,
    expert_bytes: int | None = None,
    model: ModelExperts | None = None,
    phase: str | None = None,
) -> Trace:
    """Settle expert counts, sizes and layer numbers; the sentinel replaces ``-1``."""
    ids = routing.expert_ids
    n_tokens, n_layers, top_k = ids.shape
    if n_tokens == 0:
        raise MoeprofError("the source holds no complete tokens")
    if n_experts is None and model is not None:
        n_experts = model.n_experts
    n_exp = _resolve_n_experts(routing, n_experts)
    if model is not None and model.top_k is not None and model.top_k != top_k:
        warn(f"the source routes {top_k} experts per token; the model config says {model.top_k}")
    layers = _layer_indices(routing, model)
    if expert_bytes is None:
        expert_bytes = model.expert_bytes if model is not None else 0
    phases = routing.phase
    if phase is not None:
        if phase not in PHASES:
            raise MoeprofError(f"phase must be prefill or decode, got {phase!r}")
        phases = np.full(n_tokens, PHASES[phase], dtype=np.uint8)
    expert_ids = np.where(ids < 0, n_exp, ids)
    weights = routing.gate_weights
    if weights is not None:
        weights = np.where(ids < 0, 0.0, np.nan_to_num(weights, nan=0.0))
    source: dict[str, Any] = {
        "kind": "import",
        "format": fmt,
        "paths": [str(p) for p in sources],
        "n_files": len(sources),
    }
    source.update(routing.details)
    meta: dict[str, Any] = {
        "model": model.model_meta()
        if model is not None
        else {"id": routing.model_id, "architecture": None, "revision": None},
        "source": source,
        "moe_layer_indices": layers,
        "shared_expert_bytes": model.shared_expert_bytes if model is not None else 0,
        "request_labels": routing.request_labels,
    }
    if int(routing.positions.max()) >= 2**31 or int(routing.positions.min()) < 0:
        raise MoeprofError("token positions must be between 0 and 2^31 - 1")
    return Trace.from_arrays(
        expert_ids,
        n_experts=n_exp,
        request_ids=routing.request_ids,
        positions=routing.positions,
        gate_weights=weights,
        steps=routing.steps,
        phase=phases,
        token_ids=routing.token_ids,
        expert_bytes=int(expert_bytes),
        meta=meta,
    )


def import_trace(
    src: PathLike | Sequence[PathLike],
    format: str | None = None,
    *,
    experts: int | None = None,
    expert_bytes: int | None = None,
    model_config: PathLike | ModelExperts | None = None,
    phase: str | None = None,
    progress: Progress | None = None,
    drop_warmup: bool = False,
    **options: Any,
) -> Trace:
    """Read routing captured by another tool into a :class:`~moeprof.trace.Trace`.

    ``src`` is a file, a folder (its files of the format, in lexicographic order of names) or a
    list of them. ``format`` is one of :data:`FORMATS` (guessed from file endings when None).
    ``experts`` sets the routed experts per layer (default: the model config's, else the largest
    id + 1); ``expert_bytes`` or ``model_config`` (a ``config.json``) sets one expert's size;
    ``phase`` ("prefill" / "decode") labels every token. Long tables take the column options
    ``request_col``, ``position_col``, ``layer_col``, ``experts_col``, ``weights_col`` ("none"
    for an optional one: the source has no such column), ``where`` (``(column, value)`` pairs a
    row must match), ``request_scope`` ("file" or "global") and ``step_from_resets``
    (docs/import.md). ``top_k`` routes each token to its top_k highest router scores (rtrace,
    npz-idx ``logits``). ``drop_warmup`` removes runs of rows that repeat one route
    (:func:`~moeprof.trace.warmup_tokens`).
    """
    given = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    fmt = format if format is not None else detect_format([Path(p) for p in given])
    reader = get_format(fmt)
    unknown = sorted(set(options) - set(_LONG_OPTIONS) - set(_FORMAT_OPTIONS))
    if unknown:
        raise MoeprofError(f"unknown import option(s): {', '.join(unknown)}")
    format_options = {k: v for k, v in options.items() if k in _FORMAT_OPTIONS and v is not None}
    col_options = {
        k: v for k, v in options.items() if k in _LONG_OPTIONS and v not in (None, False, (), [])
    }
    if col_options and not reader.column_options:
        flags = ", ".join(sorted(col_options))
        raise MoeprofError(f"{flags} apply to long-csv and long-jsonl only, not {fmt}")
    refused = sorted(set(format_options) - set(reader.options))
    if refused:
        takers = " and ".join(f for f in FORMATS if refused[0] in get_format(f).options)
        raise MoeprofError(f"{refused[0]} applies to {takers} only, not {fmt}")
    if experts is not None and not 1 <= int(experts) <= 65535:
        raise MoeprofError("experts must be between 1 and 65535")
    if expert_bytes is not None and model_config is not None:
        raise MoeprofError("give expert_bytes or model_config, not both")
    if expert_bytes is not None and int(expert_bytes) < 0:
        raise MoeprofError("expert_bytes must not be negative")
    if phase is not None and phase not in PHASES:
        raise MoeprofError(f"phase must be prefill or decode, got {phase!r}")
    model = (
        load_model_config(model_config)
        if isinstance(model_config, (str, os.PathLike))
        else model_config
    )
    n_experts = experts if experts is not None else (model.n_experts if model is not None else None)
    files = list_sources(given, fmt)

    routing = reader.read(
        files, n_experts=n_experts, progress=progress, **col_options, **format_options
    )
    trace = build_trace(
        routing,
        fmt=fmt,
        sources=files,
        n_experts=n_experts,
        expert_bytes=expert_bytes,
        model=model,
        phase=phase,
    )
    warmup = warmup_tokens(trace.expert_ids)
    if not warmup.any():
        return trace
    if not drop_warmup:
        warn(f"{describe_warmup(warmup)}; drop_warmup removes them")
        return trace
    kept = trace.without_tokens(warmup)
    kept.meta["source"]["dropped_warmup_tokens"] = int(warmup.sum())
    return kept
