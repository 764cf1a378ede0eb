"""`moeprof doctor`: findings with a fake NVML, and exit 0 with a list of what is missing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from nvml_fakes import ERROR_INVALID_ARGUMENT, ERROR_LIBRARY_NOT_FOUND, FakeGpu, loader_for

from moeprof import nvml
from moeprof.nvml import binding
from moeprof.replay.doctor import gather


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install a fake pynvml at the gateway; returns a function taking a FakeGpu (or None)."""

    def install(gpu: FakeGpu | None) -> None:
        monkeypatch.setattr(binding, "_import_pynvml", loader_for(gpu))
        nvml.reset()

    yield install
    nvml.reset()


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def test_gather_with_a_healthy_fake_gpu(fake_nvml: Any) -> None:
    fake_nvml(FakeGpu(counter_bits=32, value_type=1))
    report = gather(measure_bandwidth=False)
    doc = report.to_dict()
    json.dumps(doc)
    dev = doc["nvml"]["devices"][0]
    assert doc["nvml"]["driver_version"] == "560.35.03"
    assert doc["nvml"]["cuda_driver_version"] == "12.6"
    assert dev["pcie_gen_max"] == 5 and dev["pcie_width_max"] == 16
    assert dev["pcie_counters"] == {
        "supported": True,
        "counter_bits": 32,
        "value_type": 1,
        "rx_bytes": 0,
        "tx_bytes": 0,
    }
    assert not any("NVML" in m for m in report.missing)
    if not _cuda():
        assert report.ready is False
        assert any("CUDA" in m or "CPU-only" in m for m in report.missing)


def test_gather_names_what_is_missing(fake_nvml: Any) -> None:
    fake_nvml(None)
    report = gather(measure_bandwidth=False)
    assert any("nvidia-ml-py" in m for m in report.missing)
    fake_nvml(FakeGpu(init_error=ERROR_LIBRARY_NOT_FOUND))
    report = gather(measure_bandwidth=False)
    assert any("no NVIDIA driver" in m for m in report.missing)
    fake_nvml(FakeGpu(counters_supported=False))
    report = gather(measure_bandwidth=False)
    assert any("byte counters unavailable" in m and "throughput" in m for m in report.missing)


def test_cli_doctor_without_gpu_exits_0(run_cli: Any, fake_nvml: Any, tmp_path: Path) -> None:
    fake_nvml(None)
    out = tmp_path / "doctor.json"
    res = run_cli("doctor", "--no-bandwidth", "--json", out)
    assert res.exit_code == 0, res.stderr
    assert "Missing" in res.stdout and "nvidia-ml-py" in res.stdout
    doc = json.loads(out.read_text())
    assert doc["nvml"]["nvml"]["kind"] == nvml.LIBRARY_MISSING
    if not _cuda():
        assert doc["ready_for_cuda_replay"] is False and "no GPU replay here" in res.stdout


def test_cli_doctor_shows_link_and_counters(run_cli: Any, fake_nvml: Any) -> None:
    fake_nvml(FakeGpu())
    res = run_cli("doctor", "--no-bandwidth")
    assert res.exit_code == 0, res.stderr
    out = res.stdout
    assert "NVIDIA H200" in out and "560.35.03" in out and "12.6" in out
    assert "1 / 5 / 5" in out  # current / max / GPU max generation
    assert "supported (64-bit)" in out
    assert "63.0 GB/s" in out  # Gen5 x16, theoretical


def test_cli_doctor_old_driver_counters_read_not_supported(
    run_cli: Any, fake_nvml: Any, tmp_path: Path
) -> None:
    """A driver older than the counter fields answers INVALID_ARGUMENT per field: doctor says
    'not supported' (not 'no such device') and names the fallback."""
    fake_nvml(FakeGpu(field_return=ERROR_INVALID_ARGUMENT))
    out = tmp_path / "doctor.json"
    res = run_cli("doctor", "--no-bandwidth", "--json", out)
    assert res.exit_code == 0, res.stderr
    assert "not supported" in res.stdout and "no such device" not in res.stdout
    counters = json.loads(out.read_text())["nvml"]["devices"][0]["pcie_counters"]
    assert counters["kind"] == nvml.NOT_SUPPORTED
    report = gather(measure_bandwidth=False)
    assert any("throughput sampling will be used" in m for m in report.missing)


def test_cli_doctor_refuses_to_overwrite(run_cli: Any, fake_nvml: Any, tmp_path: Path) -> None:
    fake_nvml(None)
    out = tmp_path / "d.json"
    out.write_text("keep")
    res = run_cli("doctor", "--no-bandwidth", "--json", out)
    assert res.exit_code == 2 and out.read_text() == "keep"


@pytest.mark.gpu
def test_doctor_measures_pinned_peak() -> None:
    report = gather(measure_bandwidth=True, calibration_bytes=256 << 20)
    assert report.ready
    dev = report.cuda_devices[0]
    assert dev.h2d_peak_gbps is not None and dev.h2d_peak_gbps > 1.0
