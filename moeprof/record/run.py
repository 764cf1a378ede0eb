"""Record a prompt set end to end: load a model, batch prompts, generate greedily, build the trace.

The library behind ``moeprof record``; the command only parses options and renders.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeprof.errors import MoeprofError
from moeprof.record.recorder import Recorder, record
from moeprof.trace import Trace

DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any
    model_id: str
    revision: str | None
    device: torch.device  # where inputs go


@dataclass
class RecordRun:
    # The whole recording; with shards, the last one (empty if the run ended on a boundary).
    trace: Trace
    interrupted: bool
    seconds: float
    prompts_done: int
    shards: int = 0  # shards handed to on_shard (0: not sharded)


_SHARD_DIGITS = 5


def shard_path(output: str | os.PathLike[str], index: int) -> Path:
    """Shard `index` of a recording written to `output`: ``OUT.moe`` -> ``OUT-00000.moe``.

    Zero-padded so that file-name order is recording order (``moeprof analyze 'OUT-*.moe'``).
    """
    if index >= 10**_SHARD_DIGITS:  # a sixth digit would sort out of recording order
        raise MoeprofError(
            f"a recording writes at most {10**_SHARD_DIGITS:,} shards; use a larger --shard-tokens"
        )
    out = Path(output)
    return out.with_name(f"{out.stem}-{index:0{_SHARD_DIGITS}d}{out.suffix or '.moe'}")


def existing_shards(output: str | os.PathLike[str]) -> list[Path]:
    """Files already named as shards of `output` (``OUT-NNNNN.moe``), in index order."""
    first = shard_path(output, 0)
    parent = first.parent if str(first.parent) else Path(".")
    if not parent.is_dir():
        return []
    stem = Path(output).stem
    pattern = re.compile(re.escape(stem) + r"-\d{5}" + re.escape(first.suffix))
    return sorted(
        p for p in parent.glob(f"{glob.escape(stem)}-*{first.suffix}") if pattern.fullmatch(p.name)
    )


@dataclass
class ShardInfo:
    path: Path
    tokens: int
    decode_tokens: int
    requests: int
    forward_passes: int
    file_bytes: int


class ShardFiles:
    """An ``on_shard`` that saves each shard (atomically) as the next ``OUT-NNNNN.moe``."""

    def __init__(self, output: str | os.PathLike[str]) -> None:
        self.output = Path(output)
        self.written: list[ShardInfo] = []

    def __call__(self, trace: Trace) -> None:
        path = shard_path(self.output, len(self.written))
        trace.save(path)
        decode = int((trace.phase == 1).sum()) if trace.phase is not None else 0
        passes = int((trace.meta.get("source") or {}).get("forward_passes", 0))
        info = ShardInfo(
            path, trace.n_tokens, decode, trace.n_requests, passes, path.stat().st_size
        )
        self.written.append(info)


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a text file (one per line) or JSONL (``.jsonl``: objects with a "prompt")."""
    p = Path(path)
    if not p.is_file():
        raise MoeprofError(f"prompts file {p} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MoeprofError(f"{p}: prompts file is not UTF-8 text") from None
    prompts: list[str] = []
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as exc:  # bad JSON, huge ints, deep nesting
                why = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
                raise MoeprofError(f"{p}:{lineno}: not JSON ({why})") from None
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            if not isinstance(prompt, str):
                raise MoeprofError(f'{p}:{lineno}: expected an object with a string "prompt" field')
            if prompt:
                prompts.append(prompt)
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise MoeprofError(f"{p}: no prompts (empty file)")
    return prompts


def resolve_device(device: str) -> torch.device:
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MoeprofError(
                f"device {device}: no CUDA device is available (torch {torch.__version__})"
            )
        try:
            return torch.device(name)
        except RuntimeError:
            raise MoeprofError(f"device {device}: not a CUDA device name") from None
    raise MoeprofError(f"device {device}: use cpu, cuda, cuda:N or auto")


def resolve_dtype(name: str) -> torch.dtype | str:
    key = name.strip().lower()
    if key not in DTYPES:
        raise MoeprofError(f"dtype {name}: use one of auto, float32, bfloat16, float16")
    return DTYPES[key]


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~", ".\\")) or ref.count("/") > 1 or ref.endswith("/")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _one_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def load_model(
    ref: str | None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer: the demo (``ref=None``), a local folder or a hub id.

    ``dtype="auto"`` keeps the checkpoint's dtype, so expert sizes in the trace are those of the
    real weights. HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) reads only local files.
    """
    torch_dtype = resolve_dtype(dtype)
    if device_map is not None:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise MoeprofError(
                f"device_map {device_map} needs the accelerate package (pip install accelerate)"
            )
        target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        target = resolve_device(device)

    if ref is None:
        from moeprof import demo

        demo_model, demo_tokenizer = demo.load(
            dtype=None if torch_dtype == "auto" else torch_dtype, device=str(target)
        )
        return LoadedModel(demo_model, demo_tokenizer, demo.MODEL_ID, demo.revision(), target)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = Path(ref).expanduser()
    if local.exists():
        if not local.is_dir():
            raise MoeprofError(f"model {ref}: expected a folder holding config.json, got a file")
        source = str(local)
    elif _looks_like_path(ref):
        raise MoeprofError(f"model folder {ref} not found")
    else:
        source = ref
    offline = _offline()
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if offline:
        common["local_files_only"] = True
    hint = (
        " (HF_HUB_OFFLINE is set: only models already in the local cache load)"
        if offline and source == ref and not local.exists()
        else ""
    )
    try:
        AutoConfig.from_pretrained(source, **common)
    except Exception as exc:  # any library's error type: the files cannot be loaded
        raise MoeprofError(f"cannot load model {ref}: {_one_line(exc)}{hint}") from None
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, device_map=device_map, **common
        )
    except Exception as exc:  # e.g. SafetensorError, size mismatches, hub validation errors
        raise MoeprofError(
            f"cannot load model {ref} as a causal LM: {_one_line(exc)}{hint}"
        ) from None
    if device_map is None:
        model = model.to(target)
    else:
        target = model.device
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except Exception as exc:  # any library's error type: the files cannot be loaded
        raise MoeprofError(f"cannot load the tokenizer of {ref}: {_one_line(exc)}{hint}") from None
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise MoeprofError(f"the tokenizer of {ref} has neither a pad nor an end token")
        tokenizer.pad_token = tokenizer.eos_token
    config_rev = getattr(model.config, "_commit_hash", None)
    return LoadedModel(model, tokenizer, ref, revision or config_rev, target)


def _generation_config(model: Any, tokenizer: Any, max_new_tokens: int) -> Any:
    import copy

    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    # Greedy, one sequence per prompt, every decode step through the KV cache.
    config.do_sample = False
    config.num_beams = 1
    config.num_return_sequences = 1
    config.temperature = None
    config.top_p = None
    config.top_k = None
    config.max_new_tokens = max_new_tokens
    config.min_new_tokens = None
    config.max_length = None
    config.use_cache = True
    config.pad_token_id = tokenizer.pad_token_id
    if config.eos_token_id is None and tokenizer.eos_token_id is not None:
        config.eos_token_id = tokenizer.eos_token_id
    return config


def encode(tokenizer: Any, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt"}
    max_len = getattr(tokenizer, "model_max_length", None)
    if isinstance(max_len, int) and 0 < max_len < 1_000_000:
        kwargs.update(truncation=True, max_length=max_len)
    enc = tokenizer(list(prompts), **kwargs)
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def count_prompt_tokens(tokenizer: Any, prompts: Sequence[str]) -> int:
    """Tokens the prefill will record (no padding), for progress totals."""
    kwargs: dict[str, Any] = {}
    max_len = getattr(tokenizer, "model_max_length", None)
    if isinstance(max_len, int) and 0 < max_len < 1_000_000:
        kwargs.update(truncation=True, max_length=max_len)
    return sum(len(ids) for ids in tokenizer(list(prompts), **kwargs)["input_ids"])


def record_prompts(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    settings: dict[str, Any] | None = None,
    on_step: Callable[[Recorder], None] | None = None,
    shard_tokens: int | None = None,
    on_shard: Callable[[Trace], None] | None = None,
) -> RecordRun:
    """Run `prompts` through the model in batches, recording every forward pass.

    ``max_new_tokens=0`` records the prefill only (one forward pass per batch); otherwise greedy
    ``generate`` with the KV cache, every decode step recorded. Ctrl-C stops after what was
    recorded so far; the returned run says so and its trace is valid.

    ``shard_tokens=N`` and ``on_shard`` (e.g. :class:`ShardFiles`): a shard is cut after the
    batch during which the held tokens reach N (shards hold whole requests) and handed to
    ``on_shard``; the tokens left at the end (or at Ctrl-C) are the last shard, handed over too.
    """
    if batch_size < 1:
        raise MoeprofError("batch_size must be at least 1")
    if max_new_tokens < 0:
        raise MoeprofError("max_new_tokens must be 0 (prefill only) or more")
    if not prompts:
        raise MoeprofError("no prompts to record")
    model, tokenizer = loaded.model, loaded.tokenizer
    gen_config = _generation_config(model, tokenizer, max_new_tokens) if max_new_tokens else None
    run_settings = {
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "generation": "greedy, KV cache" if max_new_tokens else "prefill only",
        "n_prompts": len(prompts),
        "device": str(loaded.device),
        "dtype": str(getattr(model, "dtype", "")).removeprefix("torch."),
    }
    run_settings.update(settings or {})
    recorder = record(
        model,
        model_id=loaded.model_id,
        revision=loaded.revision,
        settings=run_settings,
        on_step=on_step,
        shard_tokens=shard_tokens,
        on_shard=on_shard,
    )
    interrupted = False
    done = 0
    start = time.perf_counter()
    with recorder, torch.inference_mode():
        try:
            for first in range(0, len(prompts), batch_size):
                batch = prompts[first : first + batch_size]
                if first + batch_size >= len(prompts):
                    # The last batch's cut happens below, as the last shard, so that the run's
                    # totals (prompts completed, seconds) land in a file even when the run
                    # ends exactly on a shard boundary. The shards' boundaries are the same.
                    recorder.hold_cuts = True
                inputs = encode(tokenizer, batch, loaded.device)
                if gen_config is None:
                    model(**inputs, use_cache=False)
                else:
                    model.generate(**inputs, generation_config=gen_config)
                done += len(batch)
        except KeyboardInterrupt:
            interrupted = True
    seconds = time.perf_counter() - start
    extra: dict[str, Any] = {"prompts_completed": done, "seconds": round(seconds, 3)}
    if interrupted:
        extra["interrupted"] = True
    if on_shard is None or shard_tokens is None:
        return RecordRun(recorder.to_trace(settings=extra), interrupted, seconds, done)
    if recorder.held_tokens or recorder.n_shards == 0:  # no empty shard after full ones
        last = recorder.ship(settings=extra)
    else:
        last = recorder.to_trace(settings=extra)  # empty: the run ended on a shard boundary
    return RecordRun(last, interrupted, seconds, done, shards=recorder.n_shards)
