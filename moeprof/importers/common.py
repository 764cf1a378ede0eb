"""What every import format shares: the token-major routing a reader returns, the reader
interface, and the warning for what an import leaves out. Importers depend on this module, never
on the package front (`moeprof.importers`), which depends on them."""

from __future__ import annotations

import os
import struct
import tokenize
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from moeprof.trace import PHASE_DECODE, PHASE_PREFILL

PHASES = {"prefill": PHASE_PREFILL, "decode": PHASE_DECODE}

PathLike = str | os.PathLike[str]
Progress = Callable[[int, int], None]  # (files done, files in all)


# What reading a damaged, hostile or foreign .npy/.npz file can raise (numpy, zipfile, its
# header parser); the readers turn each into a MoeprofError naming the file.
READ_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    OSError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    RuntimeError,
    NotImplementedError,
    SyntaxError,
    RecursionError,
    OverflowError,
    KeyError,
    IndexError,
    struct.error,
    MemoryError,
    tokenize.TokenError,  # numpy parses a .npy header as a Python literal
)


class MoeprofImportWarning(UserWarning):
    """Something was left out of an import (tokens missing a layer, unaligned token ids)."""


def warn(message: str) -> None:
    warnings.warn(message, MoeprofImportWarning, stacklevel=3)


@dataclass
class TokenRouting:
    """Routing read from a source, token-major, before expert counts and sizes are settled."""

    expert_ids: np.ndarray  # int64 [T, L, K]; -1 = no expert in that slot
    request_ids: np.ndarray  # int64 [T], dense from 0 in order of first appearance
    positions: np.ndarray  # int64 [T]
    request_labels: list[str]  # one per request: where it came from
    layer_numbers: list[int] | None = (
        None  # model layer index of each MoE layer, if the source says
    )
    gate_weights: np.ndarray | None = None  # float [T, L, K]
    steps: np.ndarray | None = None
    phase: np.ndarray | None = None
    token_ids: np.ndarray | None = None
    n_experts_hint: int | None = None  # expert count the source itself states (e.g. a map's size)
    model_id: str | None = None  # the model the source names (e.g. in a metadata record)
    locate: Callable[[int, int], str] | None = None  # (token, layer) -> "file:line" for errors
    details: dict[str, Any] = field(default_factory=dict)  # format-specific provenance


class ImportFormat:
    """One source format: the file endings it reads and how it reads them into routing."""

    name: ClassVar[str]  # the `--format` value
    suffixes: ClassVar[tuple[str, ...]]  # file endings read from a folder and used to guess
    help: ClassVar[str]  # a few words for `--format` help
    column_options: ClassVar[bool] = False  # takes request_col, position_col, ... options
    options: ClassVar[tuple[str, ...]] = ()  # other keyword options read() takes (top_k)

    def claims(self, path: Path) -> bool | None:
        """Whether `path`, ending in one of `suffixes`, is this format's, for endings that several
        formats share (.npz: vllm, npz-idx); None: no opinion (taken when no format claims it)."""
        return None

    def read(
        self,
        files: Sequence[Path],
        *,
        n_experts: int | None,
        progress: Progress | None,
        **columns: Any,
    ) -> TokenRouting:
        """The routing in `files`, read in the order given."""
        raise NotImplementedError
