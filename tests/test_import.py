"""Import, the common front: format detection, sources and options, progress, warnings, the
`moeprof import` command. Each importer has its own file: test_import_long_table.py,
test_import_vllm.py, test_import_sglang.py, test_import_model_config.py."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from import_helpers import BAD_CASES, CONFIGS, DATA

import moeprof
from moeprof.errors import MoeprofError
from moeprof.importers import import_trace
from moeprof.trace import PHASE_DECODE, load_trace


@pytest.mark.parametrize(("name", "message"), [*BAD_CASES[:3], *BAD_CASES[-4:]])
def test_cli_malformed_exit_2_one_line_no_output(
    tmp_path: Path, run_cli, name: str, message: str
) -> None:
    out_path = tmp_path / "t.moe"
    result = run_cli("import", DATA / "bad" / name, "-o", out_path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeprof: error: ")
    assert "Traceback" not in result.stderr
    assert re.search(message, lines[0])
    assert not out_path.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left either


def test_bad_sources_and_options(tmp_path: Path) -> None:
    with pytest.raises(MoeprofError, match="not found"):
        import_trace(tmp_path / "missing.csv", "long-csv")
    with pytest.raises(MoeprofError, match="holds no long-csv files"):
        import_trace(tmp_path, "long-csv")
    with pytest.raises(MoeprofError, match="unknown import format"):
        import_trace(DATA / "routing.jsonl", "parquet")
    with pytest.raises(MoeprofError, match="cannot tell the format"):
        import_trace(DATA / "configs" / "README.md")
    with pytest.raises(MoeprofError, match="request_col apply to long-csv and long-jsonl only"):
        import_trace(DATA / "routing.jsonl", "vllm", request_col="x")
    with pytest.raises(MoeprofError, match="not both"):
        import_trace(
            DATA / "routing.jsonl", expert_bytes=1, model_config=CONFIGS / "mixtral-8x7b.json"
        )


def test_cli_import_writes_trace_and_warns(tmp_path: Path, run_cli) -> None:
    out_path = tmp_path / "r.moe"
    routing = DATA / "routing.jsonl"
    result = run_cli(
        "import", routing, "-o", out_path, "--expert-bytes", "1000", "--phase", "decode"
    )
    assert result.exit_code == 0
    assert "warning: dropped 1 of 4 tokens" in " ".join(result.stderr.split())
    trace = load_trace(out_path)
    assert trace.n_tokens == 3 and trace.expert_bytes.tolist() == [1000, 1000]
    assert trace.phase is not None and (trace.phase == PHASE_DECODE).all()
    result = run_cli("import", routing, "-o", out_path)
    assert result.exit_code == 2 and "exists; pass --force" in result.stderr


def test_progress_is_reported_per_file() -> None:
    calls: list[tuple[int, int]] = []
    import_trace(DATA / "long_csv", "long-csv", progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 2), (2, 2)]


def test_lazy_package_attribute() -> None:
    assert moeprof.import_trace is import_trace


def test_no_warnings_on_clean_import() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import_trace(DATA / "long_csv", "long-csv")


def test_every_registered_format_is_in_the_import_help(run_cli) -> None:
    from moeprof.importers.registry import REGISTRY

    res = run_cli("import", "--help")
    assert res.exit_code == 0
    for name, reader in REGISTRY.items():
        assert name in res.stdout, name
        assert all(s.startswith(".") for s in reader.suffixes), name


def test_library_refusals_name_the_options_on_the_command_line(run_cli, tmp_path) -> None:
    """import_trace names its parameters (request_col); the CLI words them as options."""
    src = DATA / "import" / "routing.jsonl"
    res = run_cli("import", src, "--format", "vllm", "--request-col", "a", "-o", tmp_path / "x.moe")
    assert res.exit_code == 2
    assert "--request-col apply to long-csv and long-jsonl only" in res.stderr
    config = DATA / "import" / "configs" / "mixtral-8x7b.json"
    res = run_cli(
        "import", src, "--expert-bytes", "5", "--model-config", config, "-o", tmp_path / "x.moe"
    )
    assert res.exit_code == 2 and "give --expert-bytes or --model-config, not both" in res.stderr
    assert not (tmp_path / "x.moe").exists()
