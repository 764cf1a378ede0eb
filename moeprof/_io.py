"""Atomic output files: write to a temporary file beside the target, then rename.

A crash, Ctrl-C or a failed computation never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from moeprof.errors import MoeprofError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` on success."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise MoeprofError(f"cannot write {target}: folder {parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def check_outputs(paths: Sequence[str | os.PathLike[str] | None], *, force: bool) -> None:
    """Check output paths up front, before any work: folder exists, no overwrite without --force."""
    for p in paths:
        if p is None:
            continue
        target = Path(p)
        parent = target.parent if str(target.parent) else Path(".")
        if not parent.is_dir():
            raise MoeprofError(f"cannot write {target}: folder {parent} does not exist")
        if target.is_dir():
            raise MoeprofError(f"cannot write {target}: it is a folder")
        if target.exists() and not force:
            raise MoeprofError(f"{target} exists; pass --force to overwrite it")
