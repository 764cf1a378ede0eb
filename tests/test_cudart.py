"""The CUDA runtime helpers: finding this process's libcudart, and torch's cudart binding."""

from __future__ import annotations

import types
from typing import Any

import pytest

from moeprof.replay import cudart


def test_loaded_cudart_is_found_in_the_process_maps() -> None:
    maps = (
        "7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/libc.so.6\n"
        "7f10-7f20 r-xp 00000000 08:01 2 /venv/nvidia/cuda_runtime/lib/libcudart.so.12\n"
        "7f20-7f30 r--p 00100000 08:01 2 /venv/nvidia/cuda_runtime/lib/libcudart.so.12\n"
        "7f30-7f40 rw-p 00000000 00:00 0 \n"
        "7f40-7f50 r-xp 00000000 08:01 3 /opt/lib/libcudart_static_helper.so\n"
        "7f50-7f60 r-xp 00000000 08:01 4 /venv/torch/lib/libtorch_cuda.so\n"
        "7f60-7f70 r-xp 00000000 08:01 5 /venv/torch/lib/libcudart-d0da41ae.so.11.0\n"
    )
    assert cudart.loaded_cudart_paths(maps) == [
        "/venv/nvidia/cuda_runtime/lib/libcudart.so.12",
        "/venv/torch/lib/libcudart-d0da41ae.so.11.0",  # a wheel's renamed copy
        "/venv/torch/lib/libtorch_cuda.so",  # last: a statically linked runtime
    ]
    torch = pytest.importorskip("torch")
    if torch.version.cuda is None:  # a CPU-only torch never loads libcudart: nothing to clear
        assert cudart.find_loaded_cudart() is None
        assert cudart.cuda_clear_last_error() is None


def _torch_with(binding: Any) -> Any:
    """A stand-in for torch whose ``torch.cuda.cudart()`` returns `binding` (or raises it)."""

    def get() -> Any:
        if isinstance(binding, BaseException):
            raise binding
        return binding

    return types.SimpleNamespace(cuda=types.SimpleNamespace(cudart=get))


def test_host_register_returns_the_cuda_error() -> None:
    calls: list[tuple[Any, ...]] = []

    class Binding:
        def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:  # noqa: N802
            calls.append(("register", ptr, nbytes, flags))
            return 712  # cudaErrorHostMemoryAlreadyRegistered

        def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
            calls.append(("unregister", ptr))
            return 0

    torch = _torch_with(Binding())
    assert cudart.host_register(torch, 4096, 8192) == 712
    assert cudart.host_unregister(torch, 4096) == 0
    assert calls == [("register", 4096, 8192, 0), ("unregister", 4096)]


@pytest.mark.parametrize(
    "missing", [AttributeError("no cudart"), RuntimeError("CPU-only build"), AssertionError()]
)
def test_host_register_without_a_binding_asks_nothing(missing: BaseException) -> None:
    torch = _torch_with(missing)
    assert cudart.host_register(torch, 4096, 8192) is None
    assert cudart.host_unregister(torch, 4096) is None


def test_cuda_pci_bus_id() -> None:
    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0)
    assert cudart.cuda_pci_bus_id(props) == "0000:3b:00.0"
    assert cudart.cuda_pci_bus_id(types.SimpleNamespace(name="old torch")) is None
