"""Commands with several outputs write all of them or none, refuse a file named twice, and turn
OS errors into one error line (exit 2) with no temporary file left behind."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

import moeprof


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "t.moe"
    moeprof.synthesize(
        n_layers=2, n_requests=3, tokens_per_request=20, zipf=1.0, seed=2, expert_bytes=8192
    ).save(path)
    return path


def fail_temp_write(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Writing the temporary file of output `name` fails as on a full disk."""
    real = Path.write_bytes

    def write_bytes(self: Path, data: bytes) -> int:
        if self.name.startswith(f".{name}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def one_error_line(r) -> str:
    assert r.exit_code == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("moeprof: error: ")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "wrote" not in r.stderr, r.stderr
    return lines[0]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("failing", ["r.json", "r.md", "r.png"])
def test_analyze_writes_all_outputs_or_none(
    run_cli, tmp_path: Path, trace_file: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    j, md, png = out / "r.json", out / "r.md", out / "r.png"
    md.write_text("old report")  # --force would overwrite it, but only once all are done
    fail_temp_write(monkeypatch, failing)
    r = run_cli("analyze", trace_file, "--json", j, "--markdown", md, "--plot", png, "--force")
    line = one_error_line(r)
    assert failing in line and "No space left on device" in line
    assert names(out) == ["r.md"] and md.read_text() == "old report"
    monkeypatch.undo()
    r = run_cli("analyze", trace_file, "--json", j, "--markdown", md, "--plot", png, "--force")
    assert r.exit_code == 0, r.stderr
    assert names(out) == ["r.json", "r.md", "r.png"] and json.loads(j.read_text())["results"]


def test_analyze_rename_refused(
    run_cli, tmp_path: Path, trace_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(src: str, dst: str) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", dst)

    monkeypatch.setattr(os, "replace", denied)
    j, md = tmp_path / "r.json", tmp_path / "r.md"
    line = one_error_line(run_cli("analyze", trace_file, "--json", j, "--markdown", md))
    assert f"cannot write {j}: Permission denied" in line
    assert names(tmp_path) == ["t.moe"]


@pytest.mark.parametrize(
    "command", [["analyze"], ["replay", "--device", "cpu", "-b", "4", "--strategies", "naive"]]
)
def test_same_file_twice_is_refused(
    run_cli, tmp_path: Path, trace_file: Path, monkeypatch: pytest.MonkeyPatch, command: list
) -> None:
    monkeypatch.chdir(tmp_path)
    for a, b in (("out.x", "out.x"), ("./out.x", "out.x"), (str(tmp_path / "out.x"), "out.x")):
        r = run_cli(command[0], trace_file, *command[1:], "--json", a, "--markdown", b)
        assert "two outputs" in one_error_line(r)
        assert names(tmp_path) == ["t.moe"]


def test_report_writes_both_outputs_or_none(
    run_cli, tmp_path: Path, trace_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "r.json"
    assert run_cli("analyze", trace_file, "--json", results).exit_code == 0
    md, png = tmp_path / "rep.md", tmp_path / "rep.png"
    fail_temp_write(monkeypatch, "rep.png")
    one_error_line(run_cli("report", results, "--markdown", md, "--plot", png))
    assert names(tmp_path) == ["r.json", "t.moe"]
    r = run_cli("report", results, "--markdown", md, "--plot", md)
    assert "two outputs" in one_error_line(r)


def test_replay_writes_both_outputs_or_none(
    run_cli, tmp_path: Path, trace_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j, md = tmp_path / "rp.json", tmp_path / "rp.md"
    fail_temp_write(monkeypatch, "rp.md")
    args = ("replay", trace_file, "--device", "cpu", "-b", "4", "--strategies", "naive,dedup")
    r = run_cli(*args, "--json", j, "--markdown", md)
    assert "rp.md: No space left on device" in one_error_line(r)
    assert names(tmp_path) == ["t.moe"]
    monkeypatch.undo()
    r = run_cli(*args, "--json", j, "--markdown", md)
    assert r.exit_code == 0, r.stderr
    assert names(tmp_path) == ["rp.json", "rp.md", "t.moe"]


@pytest.mark.parametrize(
    "command",
    [
        ["analyze", "{trace}", "--json", "{out}", "--markdown", "{other}"],
        ["report", "{results}", "--markdown", "{other}", "--plot", "{out}"],
        ["export", "{trace}", "--format", "csv", "-o", "{out}"],
        ["synth", "--layers", "2", "--requests", "2", "--tokens", "5", "-o", "{out}"],
    ],
)
def test_output_that_is_not_a_regular_file_is_refused(
    run_cli, tmp_path: Path, trace_file: Path, command: list[str]
) -> None:
    # A FIFO stands in for /dev/null: renaming onto it would replace it with a regular file.
    results = tmp_path / "r.json"
    assert run_cli("analyze", trace_file, "--json", results).exit_code == 0
    out = tmp_path / "out"
    out.mkdir()
    fifo, other = out / "pipe", out / "other.md"
    os.mkfifo(fifo)
    (out / "link").symlink_to("pipe")
    for target in (fifo, out / "link"):
        args = [
            a.format(trace=trace_file, results=results, out=target, other=other) for a in command
        ]
        for force in ([], ["--force"]):
            line = one_error_line(run_cli(*args, *force))
            assert f"cannot write {target}: it is not a regular file" in line
            assert names(out) == ["link", "pipe"]  # nothing written, no temporary file
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and (out / "link").is_symlink()


def test_outputs_are_written_through_symlinks(run_cli, tmp_path: Path, trace_file: Path) -> None:
    files, links = tmp_path / "files", tmp_path / "links"
    files.mkdir()
    links.mkdir()
    (files / "r.json").write_text("old")
    (links / "r.json").symlink_to(files / "r.json")
    (links / "r.md").symlink_to(Path("..") / "files" / "r.md")  # dangling: creates r.md
    j, md = links / "r.json", links / "r.md"
    r = run_cli("analyze", trace_file, "--json", j, "--markdown", md)
    assert "exists; pass --force" in one_error_line(r)
    r = run_cli("analyze", trace_file, "--json", j, "--markdown", md, "--force")
    assert r.exit_code == 0, r.stderr
    assert j.is_symlink() and md.is_symlink() and names(links) == ["r.json", "r.md"]
    assert names(files) == ["r.json", "r.md"]
    assert json.loads((files / "r.json").read_text())["results"]
    assert (files / "r.md").read_text().startswith("#")
    copy = links / "t.moe"
    copy.symlink_to(files / "t.moe")
    r = run_cli("synth", "--layers", "2", "--requests", "2", "--tokens", "5", "-o", copy)
    assert r.exit_code == 0, r.stderr
    assert copy.is_symlink() and moeprof.load_trace(files / "t.moe").n_layers == 2
