"""Train moeprof's built-in demo model: a small Qwen3-MoE causal LM over bytes, on CPU.

The model learns from text every Python installation has offline: the standard library's own
sources plus the English help text in ``pydoc_data/topics.py``. Its routing is therefore learned
(experts specialise on code vs prose, indentation, identifiers...), not random, which is what the
demo needs: dedup savings on its traces mean something.

Deterministic for a seed on one machine (fixed seed, fixed thread count, fixed step count).
The corpus is whatever the running Python's stdlib holds, so another Python version trains a
slightly different model; the version and corpus size are written to training.json.

    nice -n 10 .venv/bin/python scripts/train_demo_model.py > /tmp/train-demo.log 2>&1 &

Writes into moeprof/demo/data/ (or --out): config.json, generation_config.json,
model.safetensors (bfloat16), tokenizer.json, tokenizer_config.json, training.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 264  # 256 bytes + 3 specials, rounded up to a multiple of 8
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "moeprof" / "demo" / "data"


def build_tokenizer():  # -> transformers tokenizer
    """Byte-level tokenizer: token id == byte value (0-255), then <pad>, <bos>, <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    assert tok.token_to_id("<pad>") == PAD_ID and tok.token_to_id("<eos>") == EOS_ID
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=1024,
    )


def build_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,  # dense MLP size; unused, every layer is MoE
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        router_aux_loss_coef=0.01,  # load balancing, as real MoE models are trained
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def load_corpus(max_bytes: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train / validation byte arrays from the stdlib (every 20th file is validation)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in stdlib.rglob("*.py")
        if not ({"test", "tests", "site-packages", "idle_test", "__pycache__"} & set(p.parts))
    )
    topics = stdlib / "pydoc_data" / "topics.py"  # the language reference as English text
    train: list[bytes] = []
    val: list[bytes] = []
    total = 0
    for i, path in enumerate(files):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if path == topics:
            # A Python file holding one big dict of help strings: evaluate it to get plain prose.
            ns: dict = {}
            exec(compile(data, str(path), "exec"), ns)  # stdlib file, trusted
            data = "\n\n".join(ns.get("topics", {}).values()).encode()
        (val if i % 20 == 0 else train).append(data + bytes([0x0A]))
        total += len(data)
        if total >= max_bytes:
            break
    sep = np.array([EOS_ID], dtype=np.int64)

    def join(chunks: list[bytes]) -> np.ndarray:
        parts: list[np.ndarray] = []
        for c in chunks:
            parts.append(np.frombuffer(c, dtype=np.uint8).astype(np.int64))
            parts.append(sep)
        return np.concatenate(parts)

    info = {
        "stdlib": str(stdlib),
        "python": platform.python_version(),
        "files": len(train) + len(val),
        "train_bytes": int(sum(len(c) for c in train)),
        "val_bytes": int(sum(len(c) for c in val)),
    }
    return join(train), join(val), info


def batches(data: np.ndarray, rng: np.random.Generator, batch: int, seq: int) -> torch.Tensor:
    starts = rng.integers(0, len(data) - seq - 1, size=batch)
    return torch.from_numpy(np.stack([data[s : s + seq] for s in starts]))


@torch.no_grad()
def evaluate(model, data: np.ndarray, seq: int, n_windows: int) -> float:
    """Mean next-byte cross-entropy (nats) over fixed, evenly spaced windows."""
    model.eval()
    starts = np.linspace(0, len(data) - seq - 1, n_windows).astype(np.int64)
    x = torch.from_numpy(np.stack([data[s : s + seq] for s in starts]))
    losses = []
    for chunk in x.split(16):
        out = model(input_ids=chunk, labels=chunk, output_router_logits=False)
        losses.append(float(out.loss))  # language-model loss only: no load-balancing term
    model.train()
    return float(np.mean(losses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=1300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-corpus-bytes", type=int, default=24_000_000)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    train, val, corpus = load_corpus(args.max_corpus_bytes)
    print(f"corpus: {corpus}", flush=True)

    config = build_config()
    config.output_router_logits = True  # training only: adds the load-balancing loss
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 50

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    t0 = time.perf_counter()
    lm_losses: list[float] = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x = batches(train, rng, args.batch, args.seq)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm_losses.append(float((out.loss - config.router_aux_loss_coef * out.aux_loss).detach()))
        if step % 25 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - t0
            print(
                f"step {step:5d}  lm loss {np.mean(lm_losses[-25:]):.4f}  "
                f"aux {float(out.aux_loss):.3f}  lr {lr_at(step):.2e}  {elapsed:7.1f} s",
                flush=True,
            )
    train_seconds = time.perf_counter() - t0

    config.output_router_logits = False
    model.config.output_router_logits = False
    val_fp32 = evaluate(model, val, args.seq, 64)
    model = model.to(torch.bfloat16)  # shipped dtype: halves the file
    model_check = model.to(torch.float32)
    val_shipped = evaluate(model_check, val, args.seq, 64)
    print(
        f"validation loss: fp32 {val_fp32:.4f}, after bf16 rounding {val_shipped:.4f}", flush=True
    )

    args.out.mkdir(parents=True, exist_ok=True)
    model_check.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    GenerationConfig(
        do_sample=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
    ).save_pretrained(args.out)
    build_tokenizer().save_pretrained(args.out)
    summary = {
        "architecture": "Qwen3MoeForCausalLM",
        "parameters": n_params,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_seen": args.steps * args.batch * args.seq,
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": round(float(np.mean(lm_losses[-50:])), 4),
        "val_loss_fp32": round(val_fp32, 4),
        "val_loss_bf16": round(val_shipped, 4),
        "loss_unit": "nats per byte (next-byte cross-entropy, load-balancing loss excluded)",
        "corpus": corpus,
        "torch": torch.__version__,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    main()
