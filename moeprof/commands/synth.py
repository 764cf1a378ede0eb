"""`moeprof synth`: a synthetic trace with controlled popularity skew and temporal locality."""

from __future__ import annotations

from pathlib import Path

import typer

from moeprof.commands._common import force_option, note_written
from moeprof.synth import DEFAULT_EXPERT_BYTES


def register(app: typer.Typer) -> None:
    @app.command("synth")
    def synth_cmd(
        output: Path = typer.Option(..., "--output", "-o", help="Trace file to write."),
        experts: int = typer.Option(8, "--experts", "-E", help="Routed experts per MoE layer."),
        top_k: int = typer.Option(2, "--top-k", "-k", help="Experts chosen per token."),
        layers: int = typer.Option(4, "--layers", "-L", help="MoE layers."),
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
            help="Bytes of one routed expert (default: one Mixtral-8x7B expert in bf16).",
        ),
        seed: int = typer.Option(
            0, "--seed", help="Random seed; the same seed gives the same trace."
        ),
        force: bool = force_option,
    ) -> None:
        """Write a synthetic routing trace (deterministic for a seed)."""
        from moeprof import _io
        from moeprof.synth import synthesize

        _io.check_outputs([output], force=force)
        trace = synthesize(
            n_experts=experts,
            top_k=top_k,
            n_layers=layers,
            n_requests=requests,
            tokens_per_request=tokens,
            length_spread=length_spread,
            zipf=zipf,
            locality=locality,
            expert_bytes=expert_bytes,
            seed=seed,
        )
        trace.save(output)
        note_written(output, f"synthetic trace ({trace.n_tokens:,} tokens)")
