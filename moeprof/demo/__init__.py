"""The built-in demo model: a small byte-level Qwen3-MoE causal LM shipped inside the package.

Trained by ``scripts/train_demo_model.py`` (CPU, fixed seed) on the Python standard library's
sources and help text, so its routing is learned, not random: 4 MoE layers, 16 experts each,
top-2, hidden size 128, about 3.4 M parameters stored in bfloat16. Token ids are bytes (0-255)
plus ``<pad>`` 256, ``<bos>`` 257, ``<eos>`` 258.

    model, tokenizer = moeprof.demo.load()
    prompts = moeprof.demo.prompts()
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from moeprof.errors import MoeprofError

DATA = Path(__file__).resolve().parent / "data"
MODEL_ID = "moeprof-demo"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "prompts.txt")


def _check() -> None:
    missing = [name for name in _REQUIRED if not (DATA / name).is_file()]
    if missing:
        raise MoeprofError(
            f"the demo model's files are missing from {DATA} ({', '.join(missing)}); "
            "reinstall moeprof or run scripts/train_demo_model.py"
        )


def prompts() -> list[str]:
    """The bundled prompt set (one prompt per line of data/prompts.txt)."""
    _check()
    lines = (DATA / "prompts.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]


def training_info() -> dict[str, Any]:
    """What training.json says about how the shipped weights were trained (loss, steps, corpus)."""
    path = DATA / "training.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@lru_cache(maxsize=1)
def revision() -> str:
    """Content hash of the shipped weights: identifies the exact demo model in a trace."""
    _check()
    digest = hashlib.sha256((DATA / "model.safetensors").read_bytes()).hexdigest()
    return f"sha256:{digest[:16]}"


def load(dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)``: the demo model in eval mode and its byte-level tokenizer.

    ``dtype`` defaults to the stored dtype (bfloat16), so the trace's expert sizes are those of the
    shipped weights; pass ``torch.float32`` for faster CPU inference.
    """
    _check()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(str(DATA), dtype=dtype or "auto")
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(DATA))
    tokenizer.padding_side = "left"
    return model, tokenizer
