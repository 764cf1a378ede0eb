"""Atomic outputs: OS errors become one-line MoeprofErrors with no temporary file left behind,
several outputs are written all or nothing, and no file may be named as two outputs."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest

from moeprof import _io
from moeprof.errors import MoeprofError


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def fail_with(err: int, reason: str):
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(err, reason)

    return fail


@pytest.mark.parametrize(
    "where, err, reason",
    [
        ("mkstemp", errno.EACCES, "Permission denied"),
        ("mkstemp", errno.EROFS, "Read-only file system"),
        ("chmod", errno.EPERM, "Operation not permitted"),
        ("replace", errno.EXDEV, "Invalid cross-device link"),
    ],
)
def test_os_errors_become_moeprof_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, err: int, reason: str
) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    owner = tempfile if where == "mkstemp" else os
    monkeypatch.setattr(owner, where, fail_with(err, reason))
    with pytest.raises(MoeprofError) as info:
        _io.write_text(target, "new")
    assert str(target) in info.value.message and reason in info.value.message
    assert "\n" not in info.value.message
    assert files(tmp_path) == ["out.json"] and target.read_text() == "old"


def test_real_rename_failure(tmp_path: Path) -> None:
    # A non-empty folder where the file should go: os.replace fails on any OS, even as root.
    target = tmp_path / "out.md"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(MoeprofError, match="cannot write .*out.md: "):
        _io.write_bytes(target, b"data")
    assert files(tmp_path) == ["out.md"] and files(target) == ["keep"]


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(MoeprofError, match="does not exist"):
        _io.write_text(tmp_path / "no" / "x.json", "{}")


@pytest.mark.parametrize("exc", [KeyboardInterrupt, ValueError])
def test_other_exceptions_propagate_and_clean_up(tmp_path: Path, exc: type) -> None:
    target = tmp_path / "t.moe"
    with pytest.raises(exc):
        with _io.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise exc()
    assert files(tmp_path) == []


def test_write_error_inside_block_propagates_unchanged(tmp_path: Path) -> None:
    # atomic_path leaves errors of the caller's own writing alone (only cleans up).
    with pytest.raises(OSError):
        with _io.atomic_path(tmp_path / "t.moe"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert files(tmp_path) == []


def test_write_all_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, c = tmp_path / "a.json", tmp_path / "b.md", tmp_path / "c.png"
    b.write_text("old b")
    real = Path.write_bytes

    def full_disk(self: Path, data: bytes) -> int:
        if self.name.startswith(".c.png."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(MoeprofError, match=r"c\.png: No space left on device"):
        _io.write_all([(a, b"A"), (b, b"B"), (c, b"C")])
    assert files(tmp_path) == ["b.md"] and b.read_text() == "old b"
    monkeypatch.undo()
    _io.write_all([(a, b"A"), (b, b"B"), (c, b"C")])
    assert [p.read_bytes() for p in (a, b, c)] == [b"A", b"B", b"C"]
    assert files(tmp_path) == ["a.json", "b.md", "c.png"]
    mask = os.umask(0)
    os.umask(mask)
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~mask for p in (a, b, c))


def test_atomic_paths_interrupted_leaves_nothing(tmp_path: Path) -> None:
    targets = [tmp_path / "x.json", tmp_path / "y.md"]
    with pytest.raises(KeyboardInterrupt):
        with _io.atomic_paths(targets) as tmps:
            assert len(tmps) == 2 and all(t.parent == tmp_path for t in tmps)
            tmps[0].write_text("done")
            raise KeyboardInterrupt
    assert files(tmp_path) == []


def test_failed_rename_removes_outputs_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.md"
    real = os.replace
    calls = []

    def second_fails(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(MoeprofError, match="b.md: Invalid cross-device link"):
        _io.write_all([(a, b"A"), (b, b"B")])
    assert files(tmp_path) == []


def test_second_temp_file_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tempfile.mkstemp
    made = []

    def second_fails(*args: object, **kwargs: object) -> tuple[int, str]:
        if made:
            raise PermissionError(errno.EACCES, "Permission denied")
        made.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tempfile, "mkstemp", second_fails)
    with pytest.raises(MoeprofError, match="Permission denied"):
        _io.write_all([(tmp_path / "a", b"A"), (tmp_path / "b", b"B")])
    assert files(tmp_path) == []


def test_check_outputs_refuses_a_path_given_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    for pair in (
        ("out.x", "out.x"),
        ("./out.x", "out.x"),
        ("sub/../out.x", str(tmp_path / "out.x")),
        ("link.json", "real.json"),
    ):
        with pytest.raises(MoeprofError, match="two outputs") as info:
            _io.check_outputs([pair[0], None, pair[1]], force=True)
        assert str(Path(pair[0])) in info.value.message
        with pytest.raises(MoeprofError, match="two outputs"):
            _io.write_all([(pair[0], b"1"), (pair[1], b"2")])
    _io.check_outputs(["out.x", "sub/out.x", None, "out.y"], force=False)
    assert files(tmp_path) == ["link.json", "real.json", "sub"]
