"""Atomic output files: write to a temporary file beside the target, then rename.

A crash, Ctrl-C or a failed computation never leaves a half-written output behind. A command
that writes several outputs writes them all to temporary files first and renames them only once
every one is complete (`atomic_paths`, `write_all`), so a failure leaves none of them written.

Only regular files are written. An output that exists as something else (a device such as
/dev/null, a FIFO, a socket) is refused: renaming onto it would replace it with a regular file.
An output that is a symbolic link is written through the link: the temporary file goes beside the
file the link points to and is renamed onto that file, so the link stays and points to the new
content (a dangling link creates the file it names).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeAlias

from moeprof.errors import MoeprofError

PathLike: TypeAlias = "str | os.PathLike[str]"


_TEMP_SUFFIX = ".tmp"


def _temp_prefix(name: str) -> str:
    """Temporary files are hidden siblings: ".NAME.XXXXXXXX.tmp"."""
    return f".{name}."


def _parent(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


def _write_error(target: Path, exc: OSError) -> MoeprofError:
    """A failed write as one line naming the output and the reason, e.g. 'Permission denied'."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return MoeprofError(f"cannot write {target}: {reason}")


def _remove(paths: Sequence[Path]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):  # cleanup must never hide the original error
            p.unlink()


def _same_file(a: Path, b: Path) -> bool:
    """Whether two output paths name one file: same resolved path, or the same existing file."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return os.path.abspath(a) == os.path.abspath(b)


def _destination(target: Path) -> Path:
    """The file to replace for output `target`: the target, or the file a symlink points to.

    Raises MoeprofError when the target exists but is not a regular file (after following
    symlinks): a folder, a device such as /dev/null, a FIFO or a socket; or when it cannot be
    examined (a symlink loop, a folder on the way that cannot be searched).
    """
    try:
        st = os.stat(target)  # follows symlinks
    except FileNotFoundError:
        st = None  # nothing there yet, or a dangling symlink
    except OSError as exc:  # e.g. a symlink loop, or permission denied on a folder on the way
        raise _write_error(target, exc) from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise MoeprofError(f"cannot write {target}: it is a folder")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise MoeprofError(f"cannot write {target}: it is not a regular file")
    dest = Path(os.path.realpath(target)) if os.path.islink(target) else target
    if not _parent(dest).is_dir():
        raise MoeprofError(f"cannot write {target}: folder {_parent(dest)} does not exist")
    return dest


def _check_distinct(targets: Sequence[Path]) -> None:
    for i, b in enumerate(targets):
        for a in targets[:i]:
            if _same_file(a, b):
                same = f"{a} is" if str(a) == str(b) else f"{a} and {b} are the same file,"
                raise MoeprofError(f"{same} given as two outputs; each output needs its own file")


@contextlib.contextmanager
def atomic_paths(paths: Sequence[PathLike]) -> Iterator[list[Path]]:
    """Yield one temporary path per target, each in its target's folder; when the block ends
    without an exception, rename every one onto its target. On any exception (Ctrl-C included)
    all temporary files are removed and no target is touched.

    An OSError creating, chmod-ing or renaming a temporary file becomes a MoeprofError naming the
    output and the reason. Renames are individually atomic; should one fail after others succeeded
    (rare: the temporary files already sit beside their targets), outputs that did not exist
    before are removed again, but a target already overwritten keeps its new content.
    """
    targets = [Path(p) for p in paths]
    _check_distinct(targets)
    for target in targets:
        if not _parent(target).is_dir():
            raise MoeprofError(f"cannot write {target}: folder {_parent(target)} does not exist")
    # What each rename replaces: the target itself, or the file a symlinked target points to.
    dests = [_destination(target) for target in targets]
    tmps: list[Path] = []
    try:
        for target, dest in zip(targets, dests):
            try:
                fd, tmp_name = tempfile.mkstemp(
                    prefix=_temp_prefix(dest.name), suffix=_TEMP_SUFFIX, dir=_parent(dest)
                )
            except OSError as exc:
                raise _write_error(target, exc) from None
            tmps.append(Path(tmp_name))
            os.close(fd)
        yield list(tmps)
        mode = 0o666 & ~_umask()
        for target, tmp in zip(targets, tmps):
            try:
                # mkstemp makes the file private (0600); give it the mode a plain open() would.
                os.chmod(tmp, mode)
            except OSError as exc:
                raise _write_error(target, exc) from None
        created: list[Path] = []
        for i, (target, dest, tmp) in enumerate(zip(targets, dests, tmps)):
            existed = os.path.lexists(dest)
            try:
                os.replace(tmp, dest)
            except OSError as exc:
                _remove(created)
                _remove(tmps[i:])
                raise _write_error(target, exc) from None
            if not existed:
                created.append(dest)
    except BaseException:
        _remove(tmps)
        raise


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` on success."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_all(outputs: Sequence[tuple[PathLike, bytes]]) -> None:
    """Write several files all or nothing: every one to a temporary file, then rename them all."""
    targets = [Path(p) for p, _ in outputs]
    with atomic_paths(targets) as tmps:
        for target, tmp, (_, data) in zip(targets, tmps, outputs):
            try:
                tmp.write_bytes(data)
            except OSError as exc:  # e.g. the disk is full
                raise _write_error(target, exc) from None


def write_text(path: PathLike, text: str) -> None:
    write_all([(path, text.encode("utf-8"))])


def write_bytes(path: PathLike, data: bytes) -> None:
    write_all([(path, data)])


_NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows file systems
# mkstemp's temporary name: prefix, 8 random characters, suffix.
_TEMP_NAME_EXTRA = len(_temp_prefix("")) + 8 + len(_TEMP_SUFFIX)


def check_outputs(paths: Sequence[PathLike | None], *, force: bool) -> None:
    """Check output paths up front, before any work: folder exists, the output is a regular file
    or not there yet (through a symlink, the file it points to), no overwrite without --force,
    and no file named twice (compared after resolving, so ./out.json and out.json clash)."""
    targets = [Path(p) for p in paths if p is not None]
    _check_distinct(targets)
    for target in targets:
        parent = _parent(target)
        # The temporary file is named ".NAME.XXXXXXXX.tmp": refuse now a name that cannot be
        # written, not after the work is done.
        if len(os.fsencode(target.name)) + _TEMP_NAME_EXTRA > _NAME_MAX:
            raise MoeprofError(f"cannot write {target}: file name too long")
        if not parent.is_dir():
            raise MoeprofError(f"cannot write {target}: folder {parent} does not exist")
        _destination(target)
        if target.exists() and not force:
            raise MoeprofError(f"{target} exists; pass --force to overwrite it")
