"""The import formats by name: adding one is a class (an ImportFormat in its own module) plus a
line here."""

from __future__ import annotations

from moeprof.errors import MoeprofError
from moeprof.importers.common import ImportFormat
from moeprof.importers.long_table import LongCsvFormat, LongJsonlFormat
from moeprof.importers.npz_idx import NpzIdxFormat
from moeprof.importers.rtrace import RtraceFormat
from moeprof.importers.sglang import SglangFormat
from moeprof.importers.vllm import VllmFormat

REGISTRY: dict[str, ImportFormat] = {
    f.name: f
    for f in (
        LongCsvFormat(),
        LongJsonlFormat(),
        VllmFormat(),
        SglangFormat(),
        RtraceFormat(),
        NpzIdxFormat(),
    )
}
FORMATS = tuple(REGISTRY)
# File name endings each format reads when given a folder (and uses to guess the format).
SUFFIXES: dict[str, tuple[str, ...]] = {name: f.suffixes for name, f in REGISTRY.items()}


def get_format(name: str) -> ImportFormat:
    found = REGISTRY.get(name)
    if found is None:
        raise MoeprofError(f"unknown import format {name!r}; choose one of {', '.join(FORMATS)}")
    return found


def format_help() -> str:
    """`--format` help: every registered format with its few words."""
    listed = ", ".join(f"{f.name} ({f.help})" for f in REGISTRY.values())
    return f"Source format (default: guessed from file endings): {listed}."
