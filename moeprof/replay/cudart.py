"""The CUDA runtime beyond torch's API: page-locking host memory, and the runtime's last error.

The CUDA runtime keeps a per-thread "last error"; a failed cudaHostRegister leaves it set, and
torch checks it after every kernel launch, so the next unrelated kernel would raise it. Clearing
it takes the runtime this process already loaded (torch's), reached through ctypes.
"""

from __future__ import annotations

import ctypes
import os
import re
from typing import Any

__all__ = [
    "CUDART_NAMES",
    "cuda_clear_last_error",
    "cuda_pci_bus_id",
    "find_loaded_cudart",
    "host_register",
    "host_unregister",
    "loaded_cudart_paths",
]

CUDART_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")

_CUDART_FILE = re.compile(r"^libcudart(-[0-9a-f]+)?\.so(\.|$)")  # also wheels' hashed copies
_TORCH_CUDA_FILE = re.compile(r"^libtorch_cuda\.so")  # where a static cudart would live

# What calling torch's cudart binding raises when there is none to call (a CPU-only torch, an
# older torch, a fake in tests).
_NO_BINDING = (AttributeError, RuntimeError, AssertionError, TypeError)


def host_register(torch: Any, ptr: int, nbytes: int) -> int | None:
    """cudaHostRegister(`ptr`, `nbytes`, default flags) through torch's runtime binding: the
    cudaError it returned (0: page-locked), or None when there is no binding to call."""
    try:
        return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
    except _NO_BINDING:
        return None


def host_unregister(torch: Any, ptr: int) -> int | None:
    """cudaHostUnregister(`ptr`): the cudaError it returned, or None without a binding."""
    try:
        return int(torch.cuda.cudart().cudaHostUnregister(ptr))
    except _NO_BINDING:
        return None


def loaded_cudart_paths(maps_text: str) -> list[str]:
    """Libraries mapped into a process that may hold its CUDA runtime, from its /proc/PID/maps
    text, once each: every libcudart first, then libtorch_cuda (a statically linked cudart)."""
    cudart: list[str] = []
    torch_cuda: list[str] = []
    for line in maps_text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        path = parts[5].strip()
        name = os.path.basename(path)
        if _CUDART_FILE.match(name) and path not in cudart:
            cudart.append(path)
        elif _TORCH_CUDA_FILE.match(name) and path not in torch_cuda:
            torch_cuda.append(path)
    return cudart + torch_cuda


def find_loaded_cudart() -> Any | None:
    """The CUDA runtime this process already loaded (torch's), through ctypes, or None.

    Only a library already loaded will do (RTLD_NOLOAD), and only one exporting
    cudaGetLastError: a second copy of the runtime would have its own error state, and clearing
    that one would leave torch's set.
    """
    candidates: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            candidates += loaded_cudart_paths(fh.read())
    except OSError:
        pass
    noload = getattr(os, "RTLD_NOLOAD", None)
    if noload is None:
        return None
    candidates += [n for n in CUDART_NAMES if n not in candidates]
    for name in candidates:
        try:
            lib = ctypes.CDLL(name, mode=noload | getattr(os, "RTLD_NOW", 2))
        except OSError:
            continue
        if hasattr(lib, "cudaGetLastError"):
            return lib
    return None


def cuda_clear_last_error() -> int | None:
    """Reset the CUDA runtime's last error (cudaGetLastError); returns the error it held, or
    None when this process's libcudart cannot be reached."""
    lib = find_loaded_cudart()
    if lib is None:
        return None
    try:
        fn = lib.cudaGetLastError
    except AttributeError:
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = []
    return int(fn())


def cuda_pci_bus_id(props: Any) -> str | None:
    """'0000:3b:00.0' from torch device properties (for NVML), when torch exposes it."""
    try:
        return f"{int(props.pci_domain_id):04x}:{int(props.pci_bus_id):02x}:{int(props.pci_device_id):02x}.0"
    except (AttributeError, TypeError, ValueError):
        return None
