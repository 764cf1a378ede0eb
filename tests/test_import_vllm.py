"""Import of vLLM routed-expert arrays (moeprof/importers/vllm.py): .npz folders, .npy files,
and hostile arrays refused before anything large is allocated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from import_helpers import CONFIGS

from moeprof.errors import MoeprofError
from moeprof.importers import import_trace
from moeprof.trace import PHASE_DECODE, PHASE_PREFILL


def vllm_request(
    rng: np.random.Generator, prompt: int, generated: int, layers: int, k: int, e: int
):
    """Arrays as vLLM returns them: int16 [tokens, moe_layers, top_k]; the last generated token
    never runs, so routed_experts has generated - 1 rows."""

    def draw(n: int) -> np.ndarray:
        return np.argsort(rng.random((n, layers, e)), axis=2)[:, :, :k].astype(np.int16)

    return {
        "prompt_routed_experts": draw(prompt),
        "routed_experts": draw(generated - 1),
        "prompt_token_ids": rng.integers(0, 1000, prompt),
        "token_ids": rng.integers(0, 1000, generated),
    }


def test_vllm_npz_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    reqs = [vllm_request(rng, p, g, 26, 6, 64) for p, g in ((5, 4), (3, 7), (8, 2))]
    for i, r in enumerate(reqs):
        np.savez(tmp_path / f"req_{i:03d}.npz", **r)
    trace = import_trace(tmp_path, "vllm", model_config=CONFIGS / "deepseek-v2-lite.json")
    assert trace.moe_layer_indices == list(range(1, 27))
    assert trace.expert_bytes[0] == 17_301_504 and trace.n_experts[0] == 64
    assert trace.phase is not None and trace.token_ids is not None
    row = 0
    for i, r in enumerate(reqs):
        n_p, n_g = len(r["prompt_routed_experts"]), len(r["routed_experts"])
        rows = slice(row, row + n_p + n_g)
        assert (trace.request_ids[rows] == i).all()
        assert trace.positions[rows].tolist() == list(range(n_p + n_g))
        expected = np.concatenate([r["prompt_routed_experts"], r["routed_experts"]])
        assert (trace.expert_ids[rows] == expected).all()
        assert trace.phase[rows].tolist() == [PHASE_PREFILL] * n_p + [PHASE_DECODE] * n_g
        expected_tokens = np.concatenate([r["prompt_token_ids"], r["token_ids"][:n_g]])
        assert trace.token_ids[rows].tolist() == expected_tokens.tolist()
        row += n_p + n_g
    assert row == trace.n_tokens


def test_vllm_npy_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arr = vllm_request(rng, 6, 1 + 1, 4, 2, 8)["prompt_routed_experts"]
    arr[2, 1, 1] = -1  # no expert in that slot
    np.save(tmp_path / "a.npy", arr)
    trace = import_trace(tmp_path / "a.npy", experts=8)
    assert trace.phase is None and trace.n_tokens == 6
    assert trace.expert_ids[2, 1, 1] == 8  # the sentinel
    ok = np.where(arr < 0, 8, arr)
    assert (trace.expert_ids == ok).all()

    np.save(tmp_path / "b.npy", np.zeros((3, 5, 2), np.int16))
    with pytest.raises(
        MoeprofError, match=r"b\.npy: routing has 5 layers x top-2, but .*a\.npy has 4"
    ):
        import_trace([tmp_path / "a.npy", tmp_path / "b.npy"], "vllm")
    np.save(tmp_path / "c.npy", np.array([{"x": 1}], dtype=object))
    with pytest.raises(MoeprofError, match=r"c\.npy: cannot read it without unpickling"):
        import_trace(tmp_path / "c.npy", "vllm")
    np.save(tmp_path / "d.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(MoeprofError, match="must hold integer expert ids"):
        import_trace(tmp_path / "d.npy", "vllm")
    np.savez(tmp_path / "e.npz", x=np.zeros((3, 4, 2)), y=np.zeros((3, 4, 2)))
    with pytest.raises(MoeprofError, match="expected arrays 'prompt_routed_experts'"):
        import_trace(tmp_path / "e.npz", "vllm")
    with pytest.raises(
        MoeprofError,
        match=r"a\.npy: row \d+, MoE layer \d+: expert id \d+ is out of range for 2 experts",
    ):
        import_trace(tmp_path / "a.npy", "vllm", experts=2)
    with pytest.raises(MoeprofError, match="4 MoE layers but the model config has 32"):
        import_trace(tmp_path / "a.npy", "vllm", model_config=CONFIGS / "mixtral-8x7b.json")


def npy_header(shape: tuple[int, ...], descr: str = "<i2") -> bytes:
    """A version 1.0 .npy header declaring `shape`, with no data after it."""
    h = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    h += b" " * (63 - (10 + len(h)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h


def test_vllm_hostile_arrays(tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import re
    import zipfile

    from moeprof.importers import vllm

    g = np.tile(np.array([0, 1], np.int16), (3, 4, 1))

    def refused(name: str, match: str) -> None:
        with pytest.raises(MoeprofError, match=re.escape(name) + ": .*" + match):
            import_trace(tmp_path / name, "vllm")

    # A header declaring terabytes: refused before anything is allocated.
    (tmp_path / "huge.npy").write_bytes(npy_header((10**12, 4, 2)))
    refused("huge.npy", "declares shape \\[1000000000000, 4, 2\\].*truncated")
    (tmp_path / "trunc.npy").write_bytes(npy_header((100, 4, 2)) + b"\0" * 10)
    refused("trunc.npy", "only 10 bytes follow its header")
    (tmp_path / "negdim.npy").write_bytes(npy_header((-1, 4, 2)))
    refused("negdim.npy", "negative dimension")
    (tmp_path / "td.npy").write_bytes(npy_header((3, 4, 2), "<m8[s]") + b"\0" * 192)
    refused("td.npy", "must hold integer expert ids, got timedelta64")
    (tmp_path / "text.npy").write_text("hello")
    refused("text.npy", "not a numpy .npy/.npz file")
    # More values than one file may hold (the cap lowered here), though the bytes are there.
    monkeypatch.setattr(vllm, "MAX_DECISIONS", 1000)
    (tmp_path / "many.npy").write_bytes(npy_header((126, 4, 2), "|i1") + b"\0" * 1008)
    refused("many.npy", "holds 1008 values, more than the 1000 one file may hold")
    np.savez(
        tmp_path / "many.npz",
        prompt_routed_experts=g,
        routed_experts=np.zeros((125, 4, 2), np.int8),
    )
    refused("many.npz", "'routed_experts' holds 1000 values, more than the 1000")
    # .npz: zip bomb (declared size checked first), foreign and object members, bad token ids.
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("routed_experts.npy", npy_header((3, 4, 2)) + b"\0" * (2 << 20))
    assert (tmp_path / "bomb.npz").stat().st_size < 100_000
    refused("bomb.npz", "member 'routed_experts.npy' unpacks to 2097280 bytes, more than")
    monkeypatch.undo()
    with zipfile.ZipFile(tmp_path / "nonnpy.npz", "w") as z:
        z.writestr("routed_experts.npy", b"x")
    refused("nonnpy.npz", "'routed_experts' has no valid .npy header")
    with zipfile.ZipFile(tmp_path / "txt.npz", "w") as z:
        z.writestr("readme.txt", b"x")
    refused("txt.npz", "member 'readme.txt' is not a .npy array")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    refused("corrupt.npz", "not a readable numpy .npy/.npz file")
    np.savez(tmp_path / "obj.npz", routed_experts=np.array([None], dtype=object))
    refused("obj.npz", "cannot read it without unpickling")
    np.savez(
        tmp_path / "objtok.npz", prompt_routed_experts=g, prompt_token_ids=np.array([None] * 3)
    )
    refused("objtok.npz", "cannot read it without unpickling")
    np.savez(tmp_path / "strtok.npz", prompt_routed_experts=g, prompt_token_ids=np.array(["a"] * 3))
    refused("strtok.npz", "'prompt_token_ids' must hold integer token ids, got <U1")
    np.savez(tmp_path / "ftok.npz", prompt_routed_experts=g, prompt_token_ids=np.zeros(3))
    refused("ftok.npz", "'prompt_token_ids' must hold integer token ids, got float64")

    # The CLI: one line, exit 2, naming the file.
    result = run_cli("import", tmp_path / "huge.npy", "-F", "vllm", "-o", tmp_path / "o.moe")
    err = result.stderr
    assert result.exit_code == 2 and "huge.npy" in err and len(err.strip().splitlines()) == 1

    # Still reads what it should: Fortran order, big-endian, token ids alongside.
    np.save(tmp_path / "f.npy", np.asfortranarray(np.arange(24, dtype=">i4").reshape(3, 4, 2) % 8))
    trace = import_trace(tmp_path / "f.npy", "vllm")
    assert trace.expert_ids.tolist() == (np.arange(24).reshape(3, 4, 2) % 8).tolist()
    np.savez(tmp_path / "ok.npz", prompt_routed_experts=g, prompt_token_ids=np.arange(3))
    assert import_trace(tmp_path / "ok.npz", "vllm").token_ids.tolist() == [0, 1, 2]
