"""Sweep files: read, validate (one-line errors naming the key and its line) and expand into
experiments (docs/sweep.md, "The sweep file")."""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeprof._version import __version__
from moeprof.batching import check_batch_size
from moeprof.errors import MoeprofError
from moeprof.sweep.analyses import REGISTRY
from moeprof.synth import GENERATOR_VERSION

TOP_KEYS = ("name", "traces", "analyses", "repeats")
# Sweep-file names of `synthesize` settings -> (keyword, kind, lowest value).
SYNTH_SETTINGS: dict[str, tuple[str, type, float]] = {
    "experts": ("n_experts", int, 1),
    "top_k": ("top_k", int, 1),
    "layers": ("n_layers", int, 1),
    "requests": ("n_requests", int, 1),
    "tokens": ("tokens_per_request", int, 1),
    "length_spread": ("length_spread", float, 0),
    "zipf": ("zipf", float, 0),
    "locality": ("locality", float, 0),
    "expert_bytes": ("expert_bytes", int, 0),
    "seed": ("seed", int, 0),
}
_UPPER = {"locality": 1.0, "length_spread": 1.0}  # locality <= 1; length_spread < 1


@dataclass(frozen=True)
class TraceSource:
    """One trace configuration: synthetic settings (sweep-file names) or one file."""

    kind: str  # "synth" or "path"
    params: tuple[tuple[str, Any], ...]  # synth: sorted settings; path: (("path", str),)
    file_hash: str | None = None  # path: sha256 of the file's bytes
    repeat: int = 0

    @property
    def label(self) -> str:
        return json.dumps(dict(self.params), sort_keys=True)

    def columns(self) -> dict[str, Any]:
        return {"trace.kind": self.kind, "repeat": self.repeat} | {
            f"trace.{k}": v for k, v in self.params
        }


@dataclass(frozen=True)
class Experiment:
    """One trace configuration x one analysis setting x one batch size."""

    source: TraceSource
    analysis: str
    settings: tuple[tuple[str, Any], ...]
    batch_size: int
    key: str = field(default="", compare=False)

    def columns(self) -> dict[str, Any]:
        return (
            {"key": self.key}
            | self.source.columns()
            | {"analysis": self.analysis}
            | dict(self.settings)
            | {"batch_size": self.batch_size}
        )


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    experiments: tuple[Experiment, ...]


def experiment_key(source: TraceSource, analysis: str, settings: Any, batch_size: int) -> str:
    """Stable across runs and machines: the parameters, the trace's identity (a file's content
    hash; a synthetic trace is determined by its settings and the generator's version) and the
    moeprof version."""
    # A file counts by its name and content, not by the folder it was reached from.
    params = [[k, os.path.basename(v) if k == "path" else v] for k, v in source.params]
    # A synthetic trace also depends on the generator's version (a new generator, new draws).
    generator = {"generator_version": GENERATOR_VERSION} if source.kind == "synth" else {}
    identity = {
        "trace": [source.kind, params, source.file_hash, source.repeat],
        **generator,
        "analysis": analysis,
        "settings": [list(s) for s in settings],
        "batch_size": batch_size,
        "moeprof_version": __version__,
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# ---------------------------------------------------------------------- reading with lines


class _Doc:
    """The parsed file plus the line of every key, for errors that point at it."""

    def __init__(self, path: Path, text: str) -> None:
        import yaml

        self.path = path
        self.lines: dict[tuple[Any, ...], int] = {}
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            self.data = loader.construct_document(node) if node is not None else None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(exc, "problem", None) or "not valid YAML"
            raise MoeprofError(f"{where}: {problem}") from None
        finally:
            loader.dispose()
        if node is not None:
            self._index(node, ())

    def _index(self, node: Any, at: tuple[Any, ...]) -> None:
        import yaml

        self.lines[at] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                here = (*at, key_node.value)
                self.lines[here] = key_node.start_mark.line + 1
                self._index(value_node, here)
                self.lines[here] = key_node.start_mark.line + 1  # errors point at the key
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._index(item, (*at, i))

    def fail(self, at: tuple[Any, ...], message: str) -> MoeprofError:
        line = next(self.lines[at[:n]] for n in range(len(at), -1, -1) if at[:n] in self.lines)
        name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in at).lstrip(".")
        return MoeprofError(f"{self.path}:{line}: {name or 'the file'}: {message}")


def _mapping(doc: _Doc, value: Any, at: tuple[Any, ...], allowed: Sequence[str]) -> dict:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise doc.fail(at, "must be a mapping (key: value)")
    for key in value:
        if key not in allowed:
            raise doc.fail((*at, key), f"unknown key; expected one of {', '.join(allowed)}")
    return value


def _single_key(doc: _Doc, value: Any, at: tuple[Any, ...], allowed: Sequence[str]) -> str:
    if not isinstance(value, dict) or len(value) != 1:
        raise doc.fail(at, f"must be one key ({' or '.join(allowed)}) with its settings")
    (key,) = value
    if key not in allowed:
        raise doc.fail((*at, key), f"unknown key; expected one of {', '.join(allowed)}")
    return str(key)


def _axis(doc: _Doc, value: Any, at: tuple[Any, ...]) -> list[Any]:
    """A list is a grid axis; a scalar is one fixed value."""
    if isinstance(value, dict):
        raise doc.fail(at, "must be a value or a list of values, not a mapping")
    values = value if isinstance(value, list) else [value]
    if not values:
        raise doc.fail(at, "is an empty list (an axis needs at least one value)")
    for v in values:
        if isinstance(v, (list, dict)) or v is None:
            raise doc.fail(at, f"values must be plain numbers or words, got {v!r}")
    return values


def _grid(
    doc: _Doc, axes: dict[str, list[Any]], link: Any, at: tuple[Any, ...]
) -> list[dict[str, Any]]:
    """Every combination of the axes; axes in one `link` group vary together (zipped)."""
    groups: list[list[str]] = []
    if link is not None:
        if not isinstance(link, list) or not all(isinstance(g, list) for g in link):
            raise doc.fail((*at, "link"), "must be a list of lists of setting names")
        seen: set[str] = set()
        for i, group in enumerate(link):
            for name in group:
                if name not in axes:
                    raise doc.fail((*at, "link", i), f"{name!r} is not a setting here")
                if name in seen:
                    raise doc.fail((*at, "link", i), f"{name!r} is in two link groups")
                seen.add(name)
            lengths = {len(axes[n]) for n in group}
            if len(lengths) > 1:
                raise doc.fail(
                    (*at, "link", i), "linked settings must have lists of the same length"
                )
            groups.append([str(n) for n in group])
    linked = {n for g in groups for n in g}
    groups += [[n] for n in axes if n not in linked]
    rows: list[dict[str, Any]] = []
    for combo in itertools.product(*(range(len(axes[g[0]])) for g in groups)):
        row: dict[str, Any] = {}
        for group, i in zip(groups, combo):
            for name in group:
                row[name] = axes[name][i]
        rows.append({n: row[n] for n in axes})  # the file's order, whatever the grouping
    return rows


def _check_synth_value(doc: _Doc, name: str, value: Any, at: tuple[Any, ...]) -> Any:
    _, kind, lowest = SYNTH_SETTINGS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise doc.fail(at, f"must be a number, got {value!r}")
    if kind is int and not isinstance(value, int):
        raise doc.fail(at, f"must be a whole number, got {value!r}")
    if value < lowest or (name in _UPPER and value > _UPPER[name]):
        upper = _UPPER.get(name)
        span = f"between {lowest:g} and {upper:g}" if upper is not None else f"at least {lowest:g}"
        raise doc.fail(at, f"must be {span}, got {value!r}")
    if name == "length_spread" and value >= 1:
        raise doc.fail(at, f"must be below 1, got {value!r}")
    return float(value) if kind is float else value


def _sources(doc: _Doc, traces: Any, repeats: int) -> list[TraceSource]:
    if not isinstance(traces, list) or not traces:
        raise doc.fail(("traces",), "must be a non-empty list of trace sources")
    out: list[TraceSource] = []
    for i, item in enumerate(traces):
        at: tuple[Any, ...] = ("traces", i)
        kind = _single_key(doc, item, at, ("synth", "path"))
        at = (*at, kind)
        if kind == "path":
            for pattern in _axis(doc, item["path"], at):
                if not isinstance(pattern, str):
                    raise doc.fail(at, f"must be a file name or glob, got {pattern!r}")
                full = pattern if Path(pattern).is_absolute() else str(doc.path.parent / pattern)
                files = sorted(glob.glob(full))
                if not files:
                    raise doc.fail(at, f"{pattern!r} matches no file (relative to the sweep file)")
                for f in files:
                    digest = hashlib.sha256(Path(f).read_bytes()).hexdigest()
                    name = os.path.normpath(f)
                    out.append(TraceSource("path", (("path", name),), file_hash=digest))
            continue
        settings = _mapping(doc, item[kind], at, (*SYNTH_SETTINGS, "link"))
        axes = {
            name: [
                _check_synth_value(doc, name, v, (*at, name)) for v in _axis(doc, val, (*at, name))
            ]
            for name, val in settings.items()
            if name != "link"
        }
        for combo in _grid(doc, axes, settings.get("link"), at):
            for r in range(repeats):
                params = dict(combo)
                if r:  # a repeat is the same configuration drawn with the next seeds
                    params["seed"] = int(params.get("seed", 0)) + r
                out.append(TraceSource("synth", tuple(sorted(params.items())), repeat=r))
    return out


def _settings(doc: _Doc, analyses: Any) -> list[tuple[str, tuple[tuple[str, Any], ...], list[int]]]:
    if not isinstance(analyses, list) or not analyses:
        raise doc.fail(("analyses",), "must be a non-empty list of analyses")
    out = []
    for i, item in enumerate(analyses):
        at: tuple[Any, ...] = ("analyses", i)
        name = _single_key(doc, item, at, tuple(REGISTRY))
        entry = REGISTRY[name]
        at = (*at, name)
        given = _mapping(doc, item[name], at, (*entry.settings, "batch_sizes", "link"))
        sizes_at = (*at, "batch_sizes")
        sizes = _axis(doc, given.get("batch_sizes", [1, 2, 4, 8, 16, 32, 64]), sizes_at)
        for b in sizes:
            try:
                check_batch_size(b)
            except MoeprofError as exc:
                raise doc.fail(sizes_at, str(exc)) from None
        if len(set(sizes)) != len(sizes):
            raise doc.fail(sizes_at, "lists a batch size twice")
        axes: dict[str, list[Any]] = {}
        for key, checker in entry.settings.items():
            values = _axis(doc, given[key], (*at, key)) if key in given else None
            if values is None:
                if key not in entry.defaults:
                    raise doc.fail(at, f"needs {key}")
                values = [entry.defaults[key]]
            for v in values:
                if (problem := checker(v)) is not None:
                    raise doc.fail((*at, key), f"{problem}, got {v!r}")
            axes[key] = values
        for combo in _grid(doc, axes, given.get("link"), at):
            out.append((name, tuple(combo.items()), [int(b) for b in sizes]))
    return out


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file and expand it into experiments (in a stable order)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MoeprofError(f"cannot read sweep file {path}: {exc}") from None
    return parse_sweep(text, path)


def parse_sweep(text: str, path: Path) -> Sweep:
    doc = _Doc(path, text)
    top = _mapping(doc, doc.data, (), TOP_KEYS)
    for required in ("name", "traces", "analyses"):
        if required not in top:
            raise doc.fail((), f"needs a {required!r} key")
    name = top["name"]
    if not isinstance(name, str) or not name.strip():
        raise doc.fail(("name",), "must be a non-empty text")
    repeats = top.get("repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise doc.fail(("repeats",), f"must be a whole number, 1 or more, got {repeats!r}")
    settings = _settings(doc, top["analyses"])
    sources = _sources(doc, top["traces"], repeats)
    experiments: dict[str, Experiment] = {}  # the same experiment named twice runs once
    for source in sources:
        for analysis, chosen, sizes in settings:
            for b in sizes:
                key = experiment_key(source, analysis, chosen, b)
                experiments.setdefault(key, Experiment(source, analysis, chosen, b, key))
    return Sweep(name=name, path=path, experiments=tuple(experiments.values()))


def synth_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    """Sweep-file synth settings -> `synthesize` keywords."""
    return {SYNTH_SETTINGS[k][0]: v for k, v in params.items()}
