"""`moeprof synth`: a synthetic trace with controlled popularity skew and temporal locality."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from moeprof.commands._common import MoeprofError, force_option, note_written
from moeprof.synth import DEFAULT_EXPERT_BYTES


def read_popularity(path: Path) -> list[list[float]]:
    """Per-layer expert counts [layers][experts] from a JSON file.

    Either ``{"expert_popularity": [[...], ...]}`` (the Fiddler Mixtral count files) or the bare
    nested list.
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoeprofError(f"popularity file {path} not found") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MoeprofError(f"{path}: not a readable JSON file ({exc})") from None
    counts = doc.get("expert_popularity") if isinstance(doc, dict) else doc
    if not isinstance(counts, list) or not counts or not all(isinstance(r, list) for r in counts):
        raise MoeprofError(
            f'{path}: expected {{"expert_popularity": [[count per expert] per layer]}}'
        )
    width = len(counts[0])
    for layer, row in enumerate(counts):
        if len(row) != width or width == 0:
            raise MoeprofError(f"{path}: layer {layer} has {len(row)} experts, layer 0 has {width}")
        for value in row:
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value >= 0)
            ):
                raise MoeprofError(f"{path}: layer {layer}: count {value!r} is not a number >= 0")
    return [[float(v) for v in row] for row in counts]


def synth_cmd(
    output: Path = typer.Option(..., "--output", "-o", help="Trace file to write."),
    experts: int | None = typer.Option(
        None, "--experts", "-E", help="Routed experts per MoE layer (default: 8)."
    ),
    top_k: int = typer.Option(2, "--top-k", "-k", help="Experts chosen per token."),
    layers: int | None = typer.Option(None, "--layers", "-L", help="MoE layers (default: 4)."),
    requests: int = typer.Option(16, "--requests", "-R", help="Requests (sequences)."),
    tokens: int = typer.Option(64, "--tokens", "-T", help="Tokens per request."),
    length_spread: float = typer.Option(
        0.0, "--length-spread", help="Request lengths vary uniformly by ± this fraction."
    ),
    zipf: float = typer.Option(
        0.0, "--zipf", help="Popularity skew: Zipf exponent over experts (0 = uniform)."
    ),
    locality: float = typer.Option(
        0.0,
        "--locality",
        help="Probability that a token keeps the previous token's expert in a slot.",
    ),
    expert_bytes: int = typer.Option(
        DEFAULT_EXPERT_BYTES,
        "--expert-bytes",
        help="Bytes of one routed expert, 0 to 2**40 (default: one Mixtral-8x7B expert in bf16).",
    ),
    popularity: Path | None = typer.Option(
        None,
        "--popularity",
        help="JSON of per-layer expert counts [layers][experts] (e.g. the Fiddler Mixtral "
        "files); layers and experts come from it and each layer draws in proportion.",
    ),
    seed: int = typer.Option(
        0, "--seed", help="Random seed (>= 0); the same seed gives the same trace."
    ),
    force: bool = force_option,
) -> None:
    """Write a synthetic routing trace (deterministic for a seed)."""
    from moeprof import _io
    from moeprof.synth import synthesize

    _io.check_outputs([output], force=force)
    counts = None
    if popularity is not None:
        counts = read_popularity(popularity)
        for flag, given, found in (
            ("--layers", layers, len(counts)),
            ("--experts", experts, len(counts[0])),
        ):
            if given is not None and given != found:
                raise MoeprofError(f"{flag} {given} disagrees with {popularity} ({found})")
        layers, experts = len(counts), len(counts[0])
    trace = synthesize(
        n_experts=8 if experts is None else experts,
        top_k=top_k,
        n_layers=4 if layers is None else layers,
        n_requests=requests,
        tokens_per_request=tokens,
        length_spread=length_spread,
        zipf=zipf,
        locality=locality,
        expert_bytes=expert_bytes,
        popularity=counts,
        seed=seed,
        meta={"popularity_file": str(popularity)} if popularity is not None else None,
    )
    trace.save(output)
    note_written(output, f"synthetic trace ({trace.n_tokens:,} tokens)")


def register(app: typer.Typer) -> None:
    app.command("synth")(synth_cmd)
