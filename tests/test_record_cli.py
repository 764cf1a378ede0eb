"""`moeprof record` end to end (built-in demo model, local folders, errors) and the demo model itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from moeprof import demo  # noqa: E402
from moeprof.trace import load_trace  # noqa: E402

# ---------------------------------------------------------------------------- the demo model


def test_demo_files_tokenizer_and_size() -> None:
    weights = demo.DATA / "model.safetensors"
    assert weights.stat().st_size <= 10 * 1024 * 1024
    model, tokenizer = demo.load()
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert model.config.num_experts == 16 and model.config.num_experts_per_tok == 2
    assert model.dtype == torch.bfloat16
    text = "def f(x):\n    return 'héllo' + \"€\"\n"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # byte-level: token id == byte
    assert tokenizer.decode(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (256, 258)
    assert tokenizer.padding_side == "left"
    assert 32 <= len(demo.prompts()) <= 64
    info = demo.training_info()
    assert 0.5 < info["final_train_loss"] < 2.5 and info["steps"] > 0
    assert demo.revision().startswith("sha256:")


def test_demo_routing_is_learned_not_uniform() -> None:
    """Savings at batch 8 clearly above what uniform routing of the same batches would give."""
    from moeprof.analyze import analyze
    from moeprof.record.run import load_model, record_prompts

    loaded = load_model(None, device="cpu")
    run = record_prompts(loaded, demo.prompts()[:16], batch_size=8, max_new_tokens=8)
    result = analyze(run.trace, [8], policy="tokens").to_dict()["results"][0]
    assert result["memory_savings"] > result["uniform_memory_savings"] + 0.1


# ---------------------------------------------------------------------------- CLI
def test_record_demo_default(run_cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "demo.moe"
    res = run_cli("record", "--limit", "5", "-b", "2", "-n", "3", "--device", "cpu", "-o", out)
    assert res.exit_code == 0, res.stderr
    trace = load_trace(out)
    assert trace.n_requests == 5 and trace.n_layers == 4 and trace.top_k == 2
    assert trace.meta["model"]["id"] == "moeprof-demo"
    assert trace.meta["model"]["revision"] == demo.revision()
    source = trace.meta["source"]
    assert (
        source["batch_size"] == 2
        and source["max_new_tokens"] == 3
        and source["prompts_completed"] == 5
    )
    # Shipped bf16 weights: one expert is gate+up [256, 128] and down [128, 128] at 2 bytes.
    assert trace.expert_bytes.tolist() == [3 * 128 * 128 * 2] * 4
    # 5 prompts: every prompt byte, plus 2 fed-back decode tokens each (the 3rd is never fed).
    prompt_bytes = sum(len(p.encode()) for p in demo.prompts()[:5])
    assert trace.phase is not None
    assert int((trace.phase == 0).sum()) == prompt_bytes
    assert int((trace.phase == 1).sum()) == 5 * 2
    assert trace.token_ids is not None
    assert trace.token_ids[trace.phase == 0].tobytes() == b"".join(
        np.frombuffer(p.encode(), np.uint8).astype(np.int32).tobytes() for p in demo.prompts()[:5]
    )
    assert "tokens/s" in res.stderr and "recorded" in res.stdout and "moeprof-demo" in res.stdout
    assert "96.00 KiB" in res.stdout  # expert size in the summary table


def test_record_prefill_only_jsonl(run_cli: Any, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "import os"}\n\n{"prompt": "class A:", "id": 2}\n{"prompt": "x = 1"}\n'
    )
    out = tmp_path / "p.moe"
    res = run_cli(
        "record", "--prompts", prompts, "-n", "0", "-b", "2", "--dtype", "float32", "-o", out
    )
    assert res.exit_code == 0, res.stderr
    trace = load_trace(out)
    assert trace.n_tokens == len("import os") + len("class A:") + len("x = 1")
    assert trace.phase is not None and not trace.phase.any()
    assert trace.steps is not None and sorted(set(trace.steps.tolist())) == [0, 1]  # 2 batches
    assert trace.expert_bytes.tolist() == [3 * 128 * 128 * 4] * 4  # float32 as asked
    assert trace.meta["source"]["generation"] == "prefill only"


def test_record_local_folder_offline(
    run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, MixtralConfig

    folder = tmp_path / "tiny-mixtral"
    config = MixtralConfig(
        vocab_size=264,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        pad_token_id=256,
        eos_token_id=258,
        bos_token_id=257,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    _, tokenizer = demo.load()
    tokenizer.save_pretrained(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "m.moe"
    res = run_cli("record", folder, "--limit", "3", "-n", "2", "-o", out)
    assert res.exit_code == 0, res.stderr
    trace = load_trace(out)
    assert trace.meta["model"]["architecture"] == "MixtralForCausalLM"
    assert trace.n_experts.tolist() == [4, 4] and trace.n_requests == 3
    assert trace.expert_bytes.tolist() == [3 * 32 * 32 * 4] * 2


def test_record_interrupt_saves_what_was_recorded(
    run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moeprof.record.recorder import Recorder

    original = Recorder._finish
    calls = {"n": 0}

    def finish_then_interrupt(self: Recorder, p: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 4:  # Ctrl-C arrives during the 4th forward pass
            raise KeyboardInterrupt
        original(self, p)

    monkeypatch.setattr(Recorder, "_finish", finish_then_interrupt)
    out = tmp_path / "cut.moe"
    res = run_cli("record", "--limit", "4", "-b", "2", "-n", "8", "-o", out)
    assert res.exit_code == 130
    assert "interrupted" in res.stderr and str(out) in res.stderr
    trace = load_trace(out)
    assert trace.meta["source"]["interrupted"] is True
    assert trace.steps is not None and sorted(set(trace.steps.tolist())) == [0, 1, 2]
    assert trace.n_requests == 2  # only the first batch had started


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompts", "missing.txt"], "prompts file missing.txt not found"),
        (["--dtype", "int8"], "dtype int8: use one of auto"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--device-map", "balanced"], "only 'auto'"),
        (["./no/such/model"], "model folder ./no/such/model not found"),
        (["--device", "tpu"], "device tpu: use cpu, cuda"),
    ],
)
def test_record_errors_are_one_line(
    run_cli: Any, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "x.moe"
    res = run_cli("record", *args, "-o", out)
    assert res.exit_code == 2
    assert message in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert not out.exists()


def test_record_bad_prompt_files(run_cli: Any, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    res = run_cli("record", "--prompts", empty, "-o", tmp_path / "a.moe")
    assert res.exit_code == 2 and "no prompts" in res.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    res = run_cli("record", "--prompts", bad, "-o", tmp_path / "b.moe")
    assert res.exit_code == 2 and "bad.jsonl:2" in res.stderr


def test_record_refuses_to_overwrite(run_cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "exists.moe"
    out.write_bytes(b"keep")
    res = run_cli("record", "-o", out)
    assert res.exit_code == 2 and "--force" in res.stderr
    assert out.read_bytes() == b"keep"


def test_unknown_hub_id_offline_is_one_line(
    run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run_cli("record", "no-such-org/no-such-model", "-o", tmp_path / "x.moe")
    assert res.exit_code == 2
    assert (
        "cannot load model no-such-org/no-such-model" in res.stderr
        and "HF_HUB_OFFLINE" in res.stderr
    )
    assert res.stderr.count("\n") == 1


def test_device_map_needs_accelerate(
    run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def no_accelerate(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "accelerate" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_accelerate)
    res = run_cli("record", "--device-map", "auto", "-o", tmp_path / "x.moe")
    assert res.exit_code == 2 and "accelerate" in res.stderr


def test_device_map_auto_records_the_same_routing(run_cli: Any, tmp_path: Path) -> None:
    """A local model placed by accelerate (device_map='auto') routes exactly as one placed by us."""
    pytest.importorskip("accelerate")
    folder = tmp_path / "local-demo"
    model, tokenizer = demo.load(dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    traces = {}
    for name, extra in {"plain": ["--device", "cpu"], "auto": ["--device-map", "auto"]}.items():
        out = tmp_path / f"{name}.moe"
        res = run_cli("record", folder, "--limit", "4", "-n", "2", *extra, "-o", out)
        assert res.exit_code == 0, res.stderr
        traces[name] = load_trace(out)
    assert np.array_equal(traces["plain"].expert_ids, traces["auto"].expert_ids)
    assert traces["auto"].n_requests == 4


def test_cuda_requested_without_cuda(run_cli: Any, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    res = run_cli("record", "--device", "cuda", "-o", tmp_path / "x.moe")
    assert res.exit_code == 2 and "no CUDA device" in res.stderr


def test_local_non_moe_model_is_a_clear_error(run_cli: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path / "dense"
    AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=264,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).save_pretrained(folder)
    demo.load()[1].save_pretrained(folder)
    res = run_cli("record", folder, "-o", tmp_path / "x.moe")
    assert res.exit_code == 2 and "no MoE layer" in res.stderr
    assert res.stderr.count("\n") == 1  # refused before the progress bar starts
    assert not (tmp_path / "x.moe").exists()


@pytest.mark.parametrize("defect", ["truncated weights", "config type", "shape mismatch"])
def test_broken_local_model_is_one_line(
    run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, defect: str
) -> None:
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(Path(demo.__file__).parent / "data", folder)
    config = json.loads((folder / "config.json").read_text())
    if defect == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif defect == "config type":
        config["hidden_size"] = "big"
    else:
        config["hidden_size"] = 2 * int(config["hidden_size"])
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run_cli("record", folder, "-n", "1", "--limit", "1", "-o", tmp_path / "x.moe")
    assert res.exit_code == 2, res.stderr
    assert res.stderr.startswith("moeprof: error: cannot load model")
    assert "\x1b[" not in res.stderr and "HF_HUB_OFFLINE" not in res.stderr
    assert not (tmp_path / "x.moe").exists()


@pytest.mark.gpu
def test_record_demo_on_cuda_matches_cpu_ids(run_cli: Any, tmp_path: Path) -> None:
    for device in ("cpu", "cuda"):
        res = run_cli(
            "record",
            "--limit",
            "8",
            "-n",
            "0",
            "--dtype",
            "float32",
            "--device",
            device,
            "-o",
            tmp_path / f"{device}.moe",
        )
        assert res.exit_code == 0, res.stderr
    cpu, gpu = load_trace(tmp_path / "cpu.moe"), load_trace(tmp_path / "cuda.moe")
    assert cpu.n_tokens == gpu.n_tokens
    # Float rounding may flip near-ties; nearly all choices must agree.
    assert (cpu.expert_ids == gpu.expert_ids).mean() > 0.98
    assert json.loads(json.dumps(gpu.meta))["source"]["device"].startswith("cuda")
