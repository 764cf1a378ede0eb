"""Atomic output files: write to a temporary file beside the target, then rename.

A crash, Ctrl-C or a failed computation never leaves a half-written output behind. A command
that writes several outputs writes them all to temporary files first and renames them only once
every one is complete (`atomic_paths`, `write_all`), so a failure leaves none of them written.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeAlias

from moeprof.errors import MoeprofError

PathLike: TypeAlias = "str | os.PathLike[str]"


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
    tmps: list[Path] = []
    try:
        for target in targets:
            try:
                fd, tmp_name = tempfile.mkstemp(
                    prefix=f".{target.name}.", suffix=".tmp", dir=_parent(target)
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
        for i, (target, tmp) in enumerate(zip(targets, tmps)):
            existed = os.path.lexists(target)
            try:
                os.replace(tmp, target)
            except OSError as exc:
                _remove(created)
                _remove(tmps[i:])
                raise _write_error(target, exc) from None
            if not existed:
                created.append(target)
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


def check_outputs(paths: Sequence[PathLike | None], *, force: bool) -> None:
    """Check output paths up front, before any work: folder exists, no overwrite without --force,
    and no file named twice (compared after resolving, so ./out.json and out.json clash)."""
    targets = [Path(p) for p in paths if p is not None]
    _check_distinct(targets)
    for target in targets:
        parent = _parent(target)
        if not parent.is_dir():
            raise MoeprofError(f"cannot write {target}: folder {parent} does not exist")
        if target.is_dir():
            raise MoeprofError(f"cannot write {target}: it is a folder")
        if target.exists() and not force:
            raise MoeprofError(f"{target} exists; pass --force to overwrite it")
