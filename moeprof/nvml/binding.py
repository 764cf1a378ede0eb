"""The gateway to NVML: the only module that imports ``pynvml`` (from nvidia-ml-py).

In nvitop's style: the library is imported and initialised lazily on the first call, and every
call goes through :meth:`Nvml.call`, which turns each NVML failure into a typed
:class:`NotAvailable` with a reason (binding missing, no driver, Not Supported, GPU lost, ...)
instead of an exception. Callers test ``isinstance(x, NotAvailable)``; units live in names.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = [
    "DRIVER_MISSING",
    "ERROR",
    "FUNCTION_MISSING",
    "GPU_LOST",
    "KIND_TEXT",
    "LIBRARY_MISSING",
    "NOT_SUPPORTED",
    "NO_DEVICE",
    "NO_PERMISSION",
    "NotAvailable",
    "Nvml",
    "available",
    "gateway",
    "reset",
]

# Kinds of NotAvailable, named after the failures seen in the field.
LIBRARY_MISSING = "library_missing"  # nvidia-ml-py not installed
DRIVER_MISSING = "driver_missing"  # libnvidia-ml.so not found / driver not loaded
NOT_SUPPORTED = "not_supported"
GPU_LOST = "gpu_lost"
NO_PERMISSION = "no_permission"
FUNCTION_MISSING = "function_missing"  # binding or driver too old for this call
NO_DEVICE = "no_device"
ERROR = "error"

# How each kind reads in a reason.
KIND_TEXT = {
    NOT_SUPPORTED: "Not Supported by this GPU or driver",
    NO_PERMISSION: "insufficient permissions",
    DRIVER_MISSING: "no NVIDIA driver (NVML library not found or driver not loaded)",
    FUNCTION_MISSING: "function not in this NVML driver library (driver too old)",
    GPU_LOST: "GPU is lost (fell off the bus)",
    NO_DEVICE: "no such device",
}


@dataclass(frozen=True)
class NotAvailable:
    """A value NVML could not give, and why. Falsy, so ``value or default`` reads naturally."""

    kind: str
    reason: str
    code: int | None = None  # NVML return code, where there is one

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return f"N/A ({self.reason})"


def available(value: object) -> bool:
    return not isinstance(value, NotAvailable)


def _import_pynvml() -> ModuleType:
    """Import the binding. Tests replace this function to plug in a fake pynvml."""
    return importlib.import_module("pynvml")


def _error_kind(module: ModuleType, code: int) -> str:
    def const(name: str, default: int) -> int:
        return int(getattr(module, name, default))

    table = {
        const("NVML_ERROR_NOT_SUPPORTED", 3): NOT_SUPPORTED,
        const("NVML_ERROR_NO_PERMISSION", 4): NO_PERMISSION,
        const("NVML_ERROR_DRIVER_NOT_LOADED", 9): DRIVER_MISSING,
        const("NVML_ERROR_LIBRARY_NOT_FOUND", 12): DRIVER_MISSING,
        const("NVML_ERROR_FUNCTION_NOT_FOUND", 13): FUNCTION_MISSING,
        const("NVML_ERROR_GPU_IS_LOST", 15): GPU_LOST,
        const("NVML_ERROR_NOT_FOUND", 6): NO_DEVICE,
        const("NVML_ERROR_INVALID_ARGUMENT", 2): NO_DEVICE,
    }
    return table.get(code, ERROR)


class Nvml:
    """Lazy, thread-safe access to NVML. Every call returns a value or a :class:`NotAvailable`."""

    def __init__(self, loader: Callable[[], ModuleType] | None = None) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._module: ModuleType | None = None
        self._state: bool | NotAvailable | None = None  # None: not tried; True: initialised

    def _ensure(self) -> ModuleType | NotAvailable:
        with self._lock:
            if isinstance(self._state, NotAvailable):
                return self._state
            if self._state is True and self._module is not None:
                return self._module
            loader = self._loader or _import_pynvml
            try:
                module = loader()
            except ImportError:
                self._state = NotAvailable(
                    LIBRARY_MISSING, "nvidia-ml-py (module pynvml) is not installed"
                )
                return self._state
            result = self._invoke(module, "nvmlInit", ())
            if isinstance(result, NotAvailable):
                self._state = result
                return result
            self._module = module
            self._state = True
            return module

    @staticmethod
    def _invoke(module: ModuleType, name: str, args: tuple[Any, ...]) -> Any:
        fn = getattr(module, name, None)
        if fn is None:
            return NotAvailable(FUNCTION_MISSING, f"{name} is not in this nvidia-ml-py")
        error_type = getattr(module, "NVMLError", None)
        try:
            return fn(*args)
        except Exception as exc:  # every failure of the binding becomes a typed N/A
            if error_type is not None and isinstance(exc, error_type):
                code = int(getattr(exc, "value", -1))
                kind = _error_kind(module, code)
                text = KIND_TEXT.get(kind) or _safe_str(exc) or f"NVML error {code}"
                return NotAvailable(kind, f"{name}: {text}", code)
            return NotAvailable(ERROR, f"{name}: {type(exc).__name__}: {_safe_str(exc)}")

    def call(self, name: str, *args: Any) -> Any:
        """``pynvml.<name>(*args)``, or a NotAvailable saying why not."""
        module = self._ensure()
        if isinstance(module, NotAvailable):
            return module
        return self._invoke(module, name, args)

    def constant(self, name: str, default: int) -> int:
        module = self._ensure()
        if isinstance(module, NotAvailable):
            return default
        return int(getattr(module, name, default))

    def error_kind(self, code: int) -> str | None:
        """The NotAvailable kind of NVML return code `code` (one a call reported rather than
        raised); None when NVML itself is not usable."""
        module = self._ensure()
        if isinstance(module, NotAvailable):
            return None
        return _error_kind(module, code)

    @property
    def status(self) -> bool | NotAvailable:
        """True when NVML is usable, else why not (initialises on first use)."""
        module = self._ensure()
        return module if isinstance(module, NotAvailable) else True

    def shutdown(self) -> None:
        with self._lock:
            if self._state is True and self._module is not None:
                self._invoke(self._module, "nvmlShutdown", ())
            self._state = None
            self._module = None

    # ------------------------------------------------------------------ devices
    def handle(self, *, pci_bus_id: str | None = None, index: int = 0) -> Any:
        """The NVML handle of a device: by PCI bus id when known (CUDA and NVML may number GPUs
        differently), else by NVML index."""
        if pci_bus_id:
            found = self.call("nvmlDeviceGetHandleByPciBusId", pci_bus_id)
            if not isinstance(found, NotAvailable) or found.kind in (LIBRARY_MISSING, GPU_LOST):
                return found
        return self.call("nvmlDeviceGetHandleByIndex", index)

    def device_count(self) -> int | NotAvailable:
        count = self.call("nvmlDeviceGetCount")
        return count if isinstance(count, NotAvailable) else int(count)


def _safe_str(obj: object) -> str:
    try:
        return str(obj)
    except Exception:  # a binding's __str__ may itself call NVML
        return ""


_default: Nvml | None = None
_default_lock = threading.Lock()


def gateway() -> Nvml:
    """The process-wide gateway (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Nvml()
        return _default


def reset() -> None:
    """Forget the process-wide gateway (tests; or after a driver reload)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.shutdown()
        _default = None
