"""Atomic outputs: OS errors become one-line MoeprofErrors with no temporary file left behind,
several outputs are written all or nothing, no file may be named as two outputs, only regular
files are replaced, and a symlinked output is written through its link."""

from __future__ import annotations

import errno
import os
import socket
import stat
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
    # A non-empty folder appears where the file should go after the checks: os.replace fails on
    # any OS, even as root.
    target = tmp_path / "out.md"
    with pytest.raises(MoeprofError, match="cannot write .*out.md: "):
        with _io.atomic_path(target) as tmp:
            tmp.write_bytes(b"data")
            target.mkdir()
            (target / "keep").write_text("x")
    assert files(tmp_path) == ["out.md"] and files(target) == ["keep"]


def test_folder_target_refused_up_front(tmp_path: Path) -> None:
    target = tmp_path / "out.md"
    target.mkdir()
    (tmp_path / "link.md").symlink_to(target)
    for path in (target, tmp_path / "link.md"):
        with pytest.raises(MoeprofError, match=f"cannot write {path}: it is a folder"):
            _io.check_outputs([path], force=True)
        with pytest.raises(MoeprofError, match=f"cannot write {path}: it is a folder"):
            _io.write_bytes(path, b"data")
    assert files(tmp_path) == ["link.md", "out.md"] and files(target) == []


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


def fail_second_rename(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the second os.replace fail (EXDEV); returns the destinations renamed onto, in order."""
    real = os.replace
    calls: list[str] = []

    def second_fails(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    return calls


def test_failed_rename_removes_outputs_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.md"
    fail_second_rename(monkeypatch)
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


def refused(path: Path, *, force: bool = True) -> None:
    """`path` is refused as not a regular file, by check_outputs and by every writer."""
    message = f"cannot write {path}: it is not a regular file"
    with pytest.raises(MoeprofError, match=message):
        _io.check_outputs([path], force=force)
    with pytest.raises(MoeprofError, match=message):
        _io.write_text(path, "new")
    with pytest.raises(MoeprofError, match=message):
        _io.write_all([(path.parent / "other.json", b"1"), (path, b"2")])
    with pytest.raises(MoeprofError, match=message):
        with _io.atomic_path(path):
            raise AssertionError("no temporary file for a target that is not a regular file")


@pytest.mark.parametrize("force", [True, False])
def test_fifo_target_refused(tmp_path: Path, force: bool) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "to_pipe").symlink_to("pipe")
    refused(fifo, force=force)
    refused(tmp_path / "to_pipe", force=force)
    # Nothing replaced, no temporary file, no other output of the same command written.
    assert files(tmp_path) == ["pipe", "to_pipe"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert (tmp_path / "to_pipe").is_symlink()


def test_socket_target_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a short relative name: socket paths are limited to ~100 bytes
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind("s.sock")
        refused(Path("s.sock"))
        assert stat.S_ISSOCK(os.lstat("s.sock").st_mode) and files(tmp_path) == ["s.sock"]


def test_symlink_output_is_written_through(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out.mkdir()
    real = data / "real.json"
    real.write_text("old")
    link = out / "link.json"
    link.symlink_to(Path("..") / "data" / "real.json")  # relative, as `ln -s` makes them
    with pytest.raises(MoeprofError, match="exists; pass --force"):
        _io.check_outputs([link], force=False)
    _io.check_outputs([link], force=True)
    _io.write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == os.path.join("..", "data", "real.json")
    assert real.read_text() == "new" and link.read_text() == "new"
    assert files(out) == ["link.json"] and files(data) == ["real.json"]  # no temporary file
    mask = os.umask(0)
    os.umask(mask)
    assert (real.stat().st_mode & 0o777) == 0o666 & ~mask
    # A chain of links ends at the same file.
    chain = out / "chain.json"
    chain.symlink_to(link)
    _io.write_bytes(chain, b"again")
    assert chain.is_symlink() and link.is_symlink() and real.read_text() == "again"
    # The link and its file count as one output.
    with pytest.raises(MoeprofError, match="two outputs"):
        _io.write_all([(link, b"1"), (real, b"2")])
    assert real.read_text() == "again"


def test_dangling_symlink_creates_its_file(tmp_path: Path) -> None:
    link = tmp_path / "link.json"
    link.symlink_to("sub/new.json")
    (tmp_path / "sub").mkdir()
    _io.check_outputs([link], force=False)  # nothing there yet: no --force needed
    _io.write_text(link, "{}")
    assert link.is_symlink() and (tmp_path / "sub" / "new.json").read_text() == "{}"
    assert files(tmp_path / "sub") == ["new.json"]


def test_dangling_symlink_into_a_missing_folder(tmp_path: Path) -> None:
    link = tmp_path / "link.json"
    link.symlink_to("nowhere/new.json")
    for check in (lambda: _io.check_outputs([link], force=True), lambda: _io.write_text(link, "")):
        with pytest.raises(MoeprofError, match=f"cannot write {link}: folder .*nowhere does not"):
            check()
    assert files(tmp_path) == ["link.json"] and link.is_symlink()


def test_symlink_loop_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to("b")
    b.symlink_to("a")
    for check in (lambda: _io.check_outputs([a], force=True), lambda: _io.write_text(a, "x")):
        with pytest.raises(MoeprofError, match=f"cannot write {a}: .*symbolic links"):
            check()
    assert files(tmp_path) == ["a", "b"] and a.is_symlink() and b.is_symlink()


def test_failed_rename_removes_file_created_through_a_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    link, b = tmp_path / "link.json", tmp_path / "b.md"
    link.symlink_to("new.json")
    calls = fail_second_rename(monkeypatch)
    with pytest.raises(MoeprofError, match="b.md: Invalid cross-device link"):
        _io.write_all([(link, b"A"), (b, b"B")])
    assert Path(calls[0]) == (tmp_path / "new.json").resolve()
    assert files(tmp_path) == ["link.json"] and link.is_symlink()


def test_regular_file_overwritten_with_force(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(MoeprofError, match="exists; pass --force"):
        _io.check_outputs([target], force=False)
    _io.check_outputs([target], force=True)
    _io.write_text(target, "new")
    assert target.read_text() == "new" and not target.is_symlink()
    assert files(tmp_path) == ["out.json"]
