"""`moeprof record`: run a Hugging Face MoE model on prompts and write its routing as a trace."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from moeprof.commands._common import (
    console,
    err_console,
    force_option,
    note_written,
    progress_bar,
)

if TYPE_CHECKING:
    from moeprof.record.run import LoadedModel, RecordRun, ShardFiles


def _check_arguments(
    *,
    output: Path,
    force: bool,
    batch_size: int,
    max_new_tokens: int,
    limit: int | None,
    device_map: str | None,
    dtype: str,
    shard_tokens: int | None = None,
) -> None:
    """Everything that can be checked before loading a model is checked first."""
    from moeprof import _io
    from moeprof.errors import MoeprofError
    from moeprof.record.run import existing_shards, resolve_dtype, shard_path

    if shard_tokens is not None:
        if shard_tokens < 1:
            raise MoeprofError("--shard-tokens must be at least 1")
        # Shards are OUT-00000.moe, OUT-00001.moe...; an older run's would join this recording
        # when the shards are read as one trace, so they count as outputs to overwrite.
        _io.check_outputs([shard_path(output, 0)], force=force)
        old = existing_shards(output)
        if old and not force:
            raise MoeprofError(
                f"{old[0]} exists ({len(old)} shard file(s) of {output}); use --force to replace"
            )
    else:
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


def _load_prompts(prompts: Path | None, limit: int | None) -> tuple[list[str], str]:
    """The prompts to record (the demo set without a file) and the name the trace records."""
    if prompts is not None:
        from moeprof.record.run import read_prompts

        prompt_list, prompts_name = read_prompts(prompts), str(prompts)
    else:
        from moeprof import demo

        prompt_list, prompts_name = demo.prompts(), "moeprof-demo prompts"
    return (prompt_list if limit is None else prompt_list[:limit]), prompts_name


def _load_model(
    model: str | None,
    *,
    device: str,
    dtype: str,
    device_map: str | None,
    revision: str | None,
    trust_remote_code: bool,
) -> LoadedModel:
    """The model and tokenizer, behind a spinner; a model without MoE layers is refused here,
    before any progress bar appears (one clean line)."""
    from transformers.utils import logging as hf_logging

    from moeprof.record.adapters import find_moe_layers
    from moeprof.record.run import load_model

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
    find_moe_layers(loaded.model)
    return loaded


def _record_with_progress(
    loaded: LoadedModel,
    prompt_list: list[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    prompts_name: str,
    shard_tokens: int | None = None,
    shards: ShardFiles | None = None,
) -> RecordRun:
    """Record every prompt, showing tokens done against the expected total."""
    from moeprof.record.run import count_prompt_tokens, record_prompts

    total = count_prompt_tokens(loaded.tokenizer, prompt_list) + len(prompt_list) * max_new_tokens
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
            shard_tokens=shard_tokens,
            on_shard=shards,
        )
        done = sum(s.tokens for s in shards.written) if shards else run.trace.n_tokens
        update(done, max(done, 1))
    return run


def _save_and_summarise(run: RecordRun, output: Path, n_prompts: int) -> None:
    """Write the trace, show what was recorded; exit 130 after a Ctrl-C (the trace is kept)."""
    from moeprof.report.rows import recorded_items
    from moeprof.report.terminal import kv_table

    run.trace.save(output)
    items = recorded_items(run.trace, run.seconds, str(output), output.stat().st_size)
    console.print(kv_table("recorded", items))
    note_written(output, f"trace ({run.trace.n_tokens:,} tokens)")
    if run.interrupted:
        err_console.print(
            f"[yellow]interrupted[/yellow]: saved the {run.trace.n_tokens:,} tokens recorded "
            f"before Ctrl-C ({run.prompts_done} of {n_prompts} prompts complete) to {output}"
        )
        raise typer.Exit(130)


def _summarise_shards(run: RecordRun, shards: ShardFiles, output: Path, n_prompts: int) -> None:
    """Show the totals over the shards written; exit 130 after a Ctrl-C (the shards are
    kept)."""
    from moeprof.formatting import human_bytes
    from moeprof.report.rows import recorded_items
    from moeprof.report.terminal import kv_table

    written = shards.written
    tokens = sum(s.tokens for s in written)
    decode = sum(s.decode_tokens for s in written)
    size = sum(s.file_bytes for s in written)
    files = f"{written[0].path}" + (f" .. {written[-1].path}" if len(written) > 1 else "")
    totals = {
        "tokens": f"{tokens:,} (prefill {tokens - decode:,}, decode {decode:,})",
        "requests": f"{sum(s.requests for s in written):,}",
        "forward passes": f"{sum(s.forward_passes for s in written):,}",
        "time": f"{run.seconds:.1f} s ({tokens / run.seconds if run.seconds > 0 else 0:,.0f} "
        "tokens/s)",
        "trace file": f"{len(written)} shard(s): {files} ({human_bytes(size)})",
    }
    items = [(k, totals.get(k, v)) for k, v in recorded_items(run.trace, run.seconds, "", 0)]
    console.print(kv_table("recorded", items))
    note_written(written[-1].path, f"{len(written)} shard(s), {tokens:,} tokens; the last")
    if run.interrupted:
        last = written[-1]
        if run.trace.n_tokens:  # the tokens held at Ctrl-C went into a last, partial shard
            what = (
                f"{len(written) - 1} finished shard(s) kept and the partial shard {last.path} "
                f"({last.tokens:,} tokens recorded before Ctrl-C) written"
            )
        else:
            what = f"{len(written)} finished shard(s) kept (up to {last.path}), no partial one"
        err_console.print(
            f"[yellow]interrupted[/yellow]: {what}; {tokens:,} tokens in all "
            f"({run.prompts_done} of {n_prompts} prompts complete)",
            soft_wrap=True,  # one line, however narrow the terminal
        )
        raise typer.Exit(130)


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
    output: Path = typer.Option(Path("trace.moe"), "--output", "-o", help="Trace file to write."),
    shard_tokens: int | None = typer.Option(
        None,
        "--shard-tokens",
        help="Bounded memory: write OUT-00000.moe, OUT-00001.moe... (from -o OUT.moe), one shard "
        "of whole requests each time N tokens are held, at the end of that batch.",
    ),
    force: bool = force_option,
) -> None:
    """Record which experts every token is routed to, per MoE layer, into a trace file.

    Example: moeprof record --max-new-tokens 32 -o demo.moe   (the built-in demo model)
    """
    _check_arguments(
        output=output,
        force=force,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        limit=limit,
        device_map=device_map,
        dtype=dtype,
        shard_tokens=shard_tokens,
    )
    prompt_list, prompts_name = _load_prompts(prompts, limit)
    loaded = _load_model(
        model,
        device=device,
        dtype=dtype,
        device_map=device_map,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )
    from moeprof.record.run import ShardFiles, existing_shards

    shards = ShardFiles(output) if shard_tokens is not None else None
    if shards is not None:
        # An older run's shards (allowed by --force) go before recording starts: left beside a
        # run that fails half-way they would be read as part of it.
        for stale in existing_shards(output):
            stale.unlink(missing_ok=True)
    run = _record_with_progress(
        loaded,
        prompt_list,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        prompts_name=prompts_name,
        shard_tokens=shard_tokens,
        shards=shards,
    )
    if shards is not None:
        _summarise_shards(run, shards, output, len(prompt_list))
    else:
        _save_and_summarise(run, output, len(prompt_list))


def register(app: typer.Typer) -> None:
    app.command("record")(record_cmd)
