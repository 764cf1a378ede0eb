"""Synthetic routing traces with controlled popularity skew and temporal locality.

Each token draws top_k distinct experts per layer from a per-layer popularity distribution
(Zipf with exponent ``zipf`` over a random ranking of the experts, or given counts) with the
Gumbel-top-k trick, which samples without replacement in proportion to popularity. With
probability ``locality`` a slot instead keeps the expert that the request's previous token had
in that slot; a kept expert that collides with one drawn fresh in another slot is replaced by the
token's next-ranked fresh draw, so a token's experts stay distinct. Deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moeprof.errors import MoeprofError
from moeprof.trace import Trace

# One Mixtral-8x7B expert in bf16: gate, up and down projections of 4096 x 14336, 2 bytes each.
DEFAULT_EXPERT_BYTES = 3 * 4096 * 14336 * 2
_CHUNK = 1 << 15  # tokens per Gumbel draw, bounds memory at chunk x experts floats


def _popularity(
    rng: np.random.Generator,
    n_layers: int,
    n_experts: int,
    zipf: float,
    popularity: np.ndarray | None,
) -> np.ndarray:
    """Per-layer expert probabilities, float64 [L, E]."""
    if popularity is not None:
        pop = np.asarray(popularity, dtype=np.float64)
        if pop.shape != (n_layers, n_experts):
            raise MoeprofError(
                f"popularity must have shape [layers={n_layers}][experts={n_experts}], got "
                f"{list(pop.shape)}"
            )
        if (pop < 0).any() or (pop.sum(axis=1) <= 0).any():
            raise MoeprofError(
                "popularity counts must be non-negative with a positive sum per layer"
            )
        return pop / pop.sum(axis=1, keepdims=True)
    ranks = np.arange(1, n_experts + 1, dtype=np.float64)
    base = ranks ** (-zipf)
    probs = np.empty((n_layers, n_experts))
    for layer in range(n_layers):
        probs[layer] = base[rng.permutation(n_experts)]
    return probs / probs.sum(axis=1, keepdims=True)


def _ranked_draws(
    rng: np.random.Generator, log_p: np.ndarray, n_tokens: int, n_cand: int
) -> np.ndarray:
    """For each token, `n_cand` distinct experts in Gumbel-top-k order: int64 [T, n_cand]."""
    out = np.empty((n_tokens, n_cand), dtype=np.int64)
    n_exp = log_p.shape[0]
    for lo in range(0, n_tokens, _CHUNK):
        hi = min(n_tokens, lo + _CHUNK)
        keys = log_p[None, :] + rng.gumbel(size=(hi - lo, n_exp))
        if n_cand < n_exp:
            top = np.argpartition(-keys, n_cand - 1, axis=1)[:, :n_cand]
        else:
            top = np.broadcast_to(np.arange(n_exp), (hi - lo, n_exp)).copy()
        top_keys = np.take_along_axis(keys, top, axis=1)
        out[lo:hi] = np.take_along_axis(top, np.argsort(-top_keys, axis=1), axis=1)
    return out


def _apply_locality(cand: np.ndarray, fresh: np.ndarray, top_k: int) -> np.ndarray:
    """Slots not drawn fresh repeat the slot's last fresh draw; collisions take the next candidate."""
    n_tokens = cand.shape[0]
    rows = np.arange(n_tokens)[:, None]
    src = np.maximum.accumulate(np.where(fresh, rows, 0), axis=0)  # last fresh row per slot
    value = cand[src, np.arange(top_k)[None, :]]
    for k in range(1, top_k):
        clash = (value[:, k : k + 1] == value[:, :k]).any(axis=1)
        if not clash.any():
            continue
        idx = np.flatnonzero(clash)
        taken = value[idx, :k]
        chosen = np.full(idx.shape[0], -1, dtype=np.int64)
        for c in range(cand.shape[1]):
            option = cand[idx, c]
            free = (chosen < 0) & ~(option[:, None] == taken).any(axis=1)
            chosen[free] = option[free]
        value[idx, k] = chosen
    return value


def synthesize(
    *,
    n_experts: int = 8,
    top_k: int = 2,
    n_layers: int = 4,
    n_requests: int = 16,
    tokens_per_request: int | Sequence[int] = 64,
    length_spread: float = 0.0,
    zipf: float = 0.0,
    locality: float = 0.0,
    expert_bytes: int | Sequence[int] | None = DEFAULT_EXPERT_BYTES,
    popularity: np.ndarray | Sequence[Sequence[float]] | None = None,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
) -> Trace:
    """A synthetic trace. Lengths: ``tokens_per_request`` (one int, or one per request), each
    scaled by a uniform draw in [1 − length_spread, 1 + length_spread]."""
    if n_experts < 1 or n_experts > 65535:
        raise MoeprofError("experts must be between 1 and 65535")
    if not 1 <= top_k <= n_experts:
        raise MoeprofError(f"top-k must be between 1 and the number of experts ({n_experts})")
    if n_layers < 1 or n_requests < 1:
        raise MoeprofError("layers and requests must be at least 1")
    if not 0.0 <= locality <= 1.0:
        raise MoeprofError("locality is a probability: between 0 and 1")
    if zipf < 0:
        raise MoeprofError("the Zipf exponent must be >= 0 (0 = uniform popularity)")
    if not 0.0 <= length_spread < 1.0:
        raise MoeprofError("length spread must be in [0, 1)")
    rng = np.random.default_rng(seed)
    base_len = np.broadcast_to(np.asarray(tokens_per_request, dtype=np.int64), (n_requests,))
    if (base_len < 1).any():
        raise MoeprofError("tokens per request must be at least 1")
    scale = rng.uniform(1.0 - length_spread, 1.0 + length_spread, size=n_requests)
    lengths = np.maximum(1, np.rint(base_len * scale)).astype(np.int64)
    n_tokens = int(lengths.sum())
    request_ids = np.repeat(np.arange(n_requests, dtype=np.int32), lengths)
    first_row = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    positions = (np.arange(n_tokens) - np.repeat(first_row, lengths)).astype(np.int32)
    is_first = positions == 0

    pop = None if popularity is None else np.asarray(popularity, dtype=np.float64)
    probs = _popularity(rng, n_layers, n_experts, zipf, pop)
    with np.errstate(divide="ignore"):
        log_p = np.log(probs)  # experts never chosen get -inf and are never drawn
    n_nonzero = (probs > 0).sum(axis=1)
    if (n_nonzero < top_k).any():
        raise MoeprofError(
            f"popularity gives some layer fewer than top-k={top_k} experts to choose"
        )
    n_cand = min(n_experts, 2 * top_k, int(n_nonzero.min()))
    ids = np.empty((n_tokens, n_layers, top_k), dtype=np.int64)
    for layer in range(n_layers):
        cand = _ranked_draws(rng, log_p[layer], n_tokens, n_cand)
        if locality > 0.0:
            fresh = (rng.random((n_tokens, top_k)) >= locality) | is_first[:, None]
            ids[:, layer] = _apply_locality(cand, fresh, top_k)
        else:
            ids[:, layer] = cand[:, :top_k]
    settings = {
        "kind": "synth",
        "n_experts": n_experts,
        "top_k": top_k,
        "n_layers": n_layers,
        "n_requests": n_requests,
        "tokens_per_request": base_len.tolist()
        if np.ndim(tokens_per_request)
        else int(base_len[0]),
        "length_spread": length_spread,
        "zipf": zipf,
        "locality": locality,
        "popularity": "given" if popularity is not None else None,
        "seed": seed,
    }
    full_meta: dict[str, Any] = {
        "model": {"id": "synthetic", "architecture": None, "revision": None}
    }
    full_meta["source"] = settings
    full_meta.update(meta or {})
    return Trace.from_arrays(
        ids,
        n_experts=n_experts,
        request_ids=request_ids,
        positions=positions,
        expert_bytes=expert_bytes,
        meta=full_meta,
    )
