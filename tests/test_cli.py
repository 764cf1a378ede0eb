"""The CLI: happy paths, and every bad input gets one line on stderr, exit 2, no output file."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import moeprof
from moeprof.trace import FORMAT_VERSION, Trace


def _rewrite_metadata(
    path: Path, update_doc: dict | None = None, update_meta: dict | None = None
) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    if update_doc:
        doc = json.loads(header["__metadata__"]["moeprof"])
        doc.update(update_doc)
        header["__metadata__"]["moeprof"] = json.dumps(doc)
    header["__metadata__"].update(update_meta or {})
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "t.moe"
    moeprof.synthesize(n_layers=3, n_requests=4, tokens_per_request=40, zipf=1.0, seed=2).save(path)
    return path


def test_synth_info_analyze_report(run_cli, tmp_path: Path, trace_file: Path) -> None:
    out = tmp_path / "s.moe"
    r = run_cli(
        "synth", "-o", out, "--experts", "16", "--top-k", "4", "--layers", "2", "--seed", "3"
    )
    assert r.exit_code == 0, r.stderr
    assert moeprof.load_trace(out).n_experts.tolist() == [16, 16]

    r = run_cli("info", out)
    assert r.exit_code == 0 and "top-k" in r.stdout
    r = run_cli("info", out, "--json")
    assert json.loads(r.stdout)["n_experts"] == [16, 16]

    j, md, png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    r = run_cli("analyze", trace_file, "-b", "1,4,16", "--json", j, "--markdown", md, "--plot", png)
    assert r.exit_code == 0, r.stderr
    assert "Savings by Batch Size" in r.stdout and "Executive Summary" in r.stdout
    doc = json.loads(j.read_text())
    expected = moeprof.analyze(moeprof.load_trace(trace_file), [1, 4, 16]).to_dict()
    assert [x["unique"] for x in doc["results"]] == [x["unique"] for x in expected["results"]]
    assert md.read_text().startswith("# moeprof report")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md2, png2 = tmp_path / "r2.md", tmp_path / "r2.png"
    r = run_cli("report", j, "--markdown", md2, "--plot", png2, "--layers")
    assert r.exit_code == 0, r.stderr
    assert md2.read_text() == md.read_text()
    assert "Savings per Layer" in r.stdout


def test_no_overwrite_without_force(run_cli, tmp_path: Path, trace_file: Path) -> None:
    j = tmp_path / "r.json"
    j.write_text("keep")
    r = run_cli("analyze", trace_file, "--json", j)
    assert r.exit_code == 2 and "--force" in r.stderr and j.read_text() == "keep"
    r = run_cli("analyze", trace_file, "--json", j, "--force")
    assert r.exit_code == 0 and json.loads(j.read_text())["results"]


def _bad_trace_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    raw = good.read_bytes()
    files = {"missing": tmp_path / "missing.moe"}
    files["random"] = tmp_path / "random.moe"
    files["random"].write_bytes(np.random.default_rng(0).bytes(2000))
    files["truncated"] = tmp_path / "truncated.moe"
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    files["newer"] = tmp_path / "newer.moe"
    files["newer"].write_bytes(raw)
    _rewrite_metadata(files["newer"], update_meta={"format_version": str(FORMAT_VERSION + 1)})
    files["out_of_range"] = tmp_path / "oor.moe"
    files["out_of_range"].write_bytes(raw)
    # Claim fewer experts than the ids use: ids above the sentinel.
    _rewrite_metadata(files["out_of_range"], update_doc={"n_experts": [2, 2, 2]})
    files["empty"] = tmp_path / "empty.moe"
    Trace.from_arrays(np.zeros((0, 3, 2), dtype=np.int64), n_experts=8).save(files["empty"])
    files["folder"] = tmp_path
    return files


@pytest.mark.parametrize(
    "case", ["missing", "random", "truncated", "newer", "out_of_range", "empty", "folder"]
)
def test_bad_trace_files(run_cli, tmp_path: Path, trace_file: Path, case: str) -> None:
    bad = _bad_trace_files(tmp_path, trace_file)[case]
    outs = [tmp_path / "o.json", tmp_path / "o.md", tmp_path / "o.png"]
    r = run_cli("analyze", bad, "--json", outs[0], "--markdown", outs[1], "--plot", outs[2])
    assert r.exit_code == 2
    assert r.stderr.startswith("moeprof: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert not any(p.exists() for p in outs)
    if case == "newer":
        assert "newer" in r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["-b", "0"],
        ["-b", "-4"],
        ["-b", "eight"],
        ["-b", "2.5"],
        ["-b", ""],
        ["--policy", "fastest"],
        ["--policy", "recorded"],  # this trace has no steps
        ["--bogus-flag"],
    ],
)
def test_bad_arguments(run_cli, tmp_path: Path, trace_file: Path, args: list[str]) -> None:
    out = tmp_path / "o.json"
    r = run_cli("analyze", trace_file, *args, "--json", out)
    assert r.exit_code == 2, r
    assert r.stderr.startswith("moeprof: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists()


def test_bad_results_file(run_cli, tmp_path: Path) -> None:
    for name, text in {"a.json": "{not json", "b.json": "[]", "c.json": '{"results": []}'}.items():
        p = tmp_path / name
        p.write_text(text)
        r = run_cli("report", p, "--markdown", tmp_path / "o.md")
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
        assert not (tmp_path / "o.md").exists()
    r = run_cli("report", tmp_path / "none.json")
    assert r.exit_code == 2 and "not found" in r.stderr


def test_missing_output_folder(run_cli, trace_file: Path, tmp_path: Path) -> None:
    r = run_cli("analyze", trace_file, "--json", tmp_path / "no" / "such" / "r.json")
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_synth_bad_arguments(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "s.moe"
    for args in (["--top-k", "9"], ["--locality", "1.5"], ["--zipf", "-1"], ["--experts", "x"]):
        r = run_cli("synth", "-o", out, *args)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, (args, r.stderr)
        assert not out.exists()


def test_help_and_version(run_cli) -> None:
    r = run_cli("--help")
    assert r.exit_code == 0 and "analyze" in r.stdout
    r = run_cli("analyze", "--help")
    assert r.exit_code == 0 and "--batch-sizes" in r.stdout
    r = run_cli("--version")
    assert r.exit_code == 0 and moeprof.__version__ in r.stdout
    r = run_cli()
    assert r.exit_code == 0 and "Usage" in r.stdout


def test_console_script_and_module_entry(tmp_path: Path, trace_file: Path) -> None:
    """End to end in a fresh interpreter: `python -m moeprof`, exit code and one-line error."""
    ok = subprocess.run(
        [sys.executable, "-m", "moeprof", "analyze", str(trace_file), "-b", "8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "moeprof", "analyze", str(tmp_path / "nope.moe")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "not found" in bad.stderr


@pytest.mark.parametrize("kind", ["synth-popularity", "import-model-config", "record-prompts"])
def test_hostile_json_inputs_are_one_line_errors(tmp_path: Path, run_cli, kind: str) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": ' + "9" * 5000 + "}\n")
    csv = tmp_path / "r.csv"
    csv.write_text('request_id,token_idx,layer,experts\n0,0,0,"1 2"\n')
    out = tmp_path / "out.moe"
    argv = {
        "synth-popularity": ["synth", "-o", out, "--popularity", deep],
        "import-model-config": ["import", csv, "--model-config", deep, "-o", out],
        "record-prompts": ["record", "--prompts", prompts, "-o", out],
    }[kind]
    result = run_cli(*argv)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("moeprof: error:") and result.stderr.count("\n") == 1
    assert not out.exists()


def test_system_path_errors_are_one_line(tmp_path: Path, run_cli) -> None:
    long_input = tmp_path / ("a" * 300 + ".moe")
    result = run_cli("info", long_input)
    assert result.exit_code == 2 and "File name too long" in result.stderr
    assert result.stderr.count("\n") == 1
    # An output name too long for its temporary file is refused before any work.
    long_output = tmp_path / ("b" * 250 + ".json")
    result = run_cli("analyze", "traces/mixtral-like.moe", "--json", long_output)
    assert result.exit_code == 2 and "file name too long" in result.stderr
    assert result.stdout == ""


def test_ctrl_c_inside_a_command_says_interrupted(
    run_cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import moeprof.shards

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(moeprof.shards, "load_trace", interrupt)
    result = run_cli("info", "traces/mixtral-like.moe")
    assert result.exit_code == 130 and result.stderr == "moeprof: error: interrupted\n"
