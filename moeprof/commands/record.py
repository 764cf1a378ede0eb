"""`moeprof record`: run a Hugging Face MoE model on prompts and write its routing as a trace."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from moeprof.commands._common import (
    console,
    err_console,
    force_option,
    note_written,
    progress_bar,
)


def _summary_table(trace: Any, run: Any, path: Path) -> Any:
    from rich.table import Table

    from moeprof.formatting import human_bytes

    meta = trace.meta
    model = meta.get("model") or {}
    source = meta.get("source") or {}
    n_exp = trace.n_experts.tolist()
    ebytes = trace.expert_bytes.tolist()
    layers = trace.moe_layer_indices
    decode = int((trace.phase == 1).sum()) if trace.phase is not None else 0
    if len(set(ebytes)) == 1:
        expert_size = human_bytes(ebytes[0]) if ebytes[0] > 0 else "unknown"
    else:
        expert_size = ", ".join(human_bytes(b) for b in ebytes)
    dtype = source.get("expert_dtype")
    rate = trace.n_tokens / run.seconds if run.seconds > 0 else 0.0
    rows = [
        ("model", f"{model.get('id') or 'unknown'} ({model.get('architecture') or '—'})"),
        ("MoE layers", f"{trace.n_layers} (model layers {_ranges(layers)})"),
        ("experts per layer", str(n_exp[0]) if len(set(n_exp)) == 1 else str(n_exp)),
        ("top-k", str(trace.top_k)),
        ("tokens", f"{trace.n_tokens:,} (prefill {trace.n_tokens - decode:,}, decode {decode:,})"),
        ("requests", f"{trace.n_requests:,}"),
        ("forward passes", f"{int(source.get('forward_passes', 0)):,}"),
        ("routed expert size", expert_size + (f" ({dtype})" if dtype else "")),
        ("shared experts / layer", human_bytes(int(meta.get("shared_expert_bytes") or 0))),
        ("time", f"{run.seconds:.1f} s ({rate:,.0f} tokens/s)"),
        ("trace file", f"{path} ({human_bytes(path.stat().st_size)})"),
    ]
    table = Table(title="recorded", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def _ranges(values: list[int]) -> str:
    """[0,1,2,3,5] -> '0-3, 5'."""
    out: list[str] = []
    start = prev = None
    for v in values:
        if start is None:
            start = prev = v
        elif prev is not None and v == prev + 1:
            prev = v
        else:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = v
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    return ", ".join(out)


def register(app: typer.Typer) -> None:
    @app.command("record")
    def record_cmd(
        model: str | None = typer.Argument(
            None,
            metavar="MODEL",
            help="Hub id (e.g. Qwen/Qwen3-30B-A3B) or local folder; default: the built-in demo model.",
        ),
        prompts: Path | None = typer.Option(
            None,
            "--prompts",
            "-p",
            help='Prompts: a text file (one per line) or .jsonl with a "prompt" field; '
            "default: the demo prompt set.",
        ),
        batch_size: int = typer.Option(8, "--batch-size", "-b", help="Prompts per batch."),
        max_new_tokens: int = typer.Option(
            32,
            "--max-new-tokens",
            "-n",
            help="Tokens generated per prompt (greedy); 0 = prefill only.",
        ),
        device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
        dtype: str = typer.Option(
            "auto", "--dtype", help="auto (the checkpoint's), float32, bfloat16 or float16."
        ),
        device_map: str | None = typer.Option(
            None,
            "--device-map",
            help="'auto': let accelerate place a model larger than one GPU (needs accelerate).",
        ),
        revision: str | None = typer.Option(
            None, "--revision", help="Hub revision (branch, tag, commit)."
        ),
        limit: int | None = typer.Option(None, "--limit", help="Record only the first N prompts."),
        trust_remote_code: bool = typer.Option(
            False, "--trust-remote-code", help="Allow the model's own Python code from the hub."
        ),
        output: Path = typer.Option(
            Path("trace.moe"), "--output", "-o", help="Trace file to write."
        ),
        force: bool = force_option,
    ) -> None:
        """Record which experts every token is routed to, per MoE layer, into a trace file.

        Example: moeprof record --max-new-tokens 32 -o demo.moe   (the built-in demo model)
        """
        from moeprof import _io
        from moeprof.errors import MoeprofError
        from moeprof.record.run import (
            count_prompt_tokens,
            load_model,
            read_prompts,
            record_prompts,
            resolve_dtype,
        )

        # Everything that can be checked before loading a model is checked first.
        _io.check_outputs([output], force=force)
        if batch_size < 1:
            raise MoeprofError("--batch-size must be at least 1")
        if max_new_tokens < 0:
            raise MoeprofError("--max-new-tokens must be 0 (prefill only) or more")
        if limit is not None and limit < 1:
            raise MoeprofError("--limit must be at least 1")
        if device_map is not None and device_map != "auto":
            raise MoeprofError(f"--device-map {device_map}: only 'auto' is supported")
        resolve_dtype(dtype)
        if prompts is not None:
            prompt_list = read_prompts(prompts)
            prompts_name = str(prompts)
        else:
            from moeprof import demo

            prompt_list = demo.prompts()
            prompts_name = "moeprof-demo prompts"
        if limit is not None:
            prompt_list = prompt_list[:limit]

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bar is the one to watch
        with err_console.status(f"loading {model or 'the demo model'}..."):
            loaded = load_model(
                model,
                device=device,
                dtype=dtype,
                device_map=device_map,
                revision=revision,
                trust_remote_code=trust_remote_code,
            )
        total = (
            count_prompt_tokens(loaded.tokenizer, prompt_list) + len(prompt_list) * max_new_tokens
        )

        # A model without MoE layers is refused before the progress bar appears (one clean line).
        from moeprof.record.adapters import find_moe_layers

        find_moe_layers(loaded.model)
        with progress_bar("recording", unit="tokens", rate=True, transient=False) as update:
            last = [0.0]

            def on_step(rec: Any) -> None:
                now = time.monotonic()
                if now - last[0] > 0.1:  # counting tokens costs; redraw at most 10x per second
                    last[0] = now
                    update(rec.n_tokens, total)

            run = record_prompts(
                loaded,
                prompt_list,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                settings={"prompts": prompts_name},
                on_step=on_step,
            )
            update(run.trace.n_tokens, max(run.trace.n_tokens, 1))
        run.trace.save(output)
        console.print(_summary_table(run.trace, run, output))
        note_written(output, f"trace ({run.trace.n_tokens:,} tokens)")
        if run.interrupted:
            err_console.print(
                f"[yellow]interrupted[/yellow]: saved the {run.trace.n_tokens:,} tokens recorded "
                f"before Ctrl-C ({run.prompts_done} of {len(prompt_list)} prompts complete) to {output}"
            )
            raise typer.Exit(130)
