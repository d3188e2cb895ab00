"""Loading of the native modules and routing of kernel calls.

Backends (env ``REPKERN_BACKEND``, read at each call):
  ``auto`` (default)  CUDA tensors -> CUDA kernels of ``repkern._C``; CPU tensors -> its C++ kernels
  ``reference``       the pure-PyTorch implementations in :mod:`repkern.reference`
  ``emu``             CPU tensors -> the CUDA kernels run by the emulator ``repkern._emu``

Tensors cross into C++ as ``(data_ptr, sizes, strides, dtype_code)``; torch
allocates every output and workspace, and each tensor stays bound to a Python
name until the native call returns.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch

BACKENDS = ("auto", "reference", "emu")
# Shared with csrc/common/dtype.h (enum class DType).
DTYPE_CODES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int32: 4,
    torch.int64: 5,
}

try:
    from repkern import _C  # noqa: E402
except ImportError as exc:  # pragma: no cover - a broken install
    raise ImportError(
        "repkern's native module repkern._C is missing or does not load; reinstall with "
        "`pip install .` from the source tree (needs a C++ compiler and CMake)."
    ) from exc

_emu_module = None


def emu_module():
    """The emulator module; ``REPKERN_EMU_LIBRARY`` may point at another build of it
    (CI loads the AddressSanitizer build that way)."""
    global _emu_module
    if _emu_module is None:
        path = os.environ.get("REPKERN_EMU_LIBRARY")
        if path:
            spec = importlib.util.spec_from_file_location("repkern._emu", path)
            if spec is None or spec.loader is None:
                raise ImportError(f"REPKERN_EMU_LIBRARY={path!r} is not a loadable module")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _emu_module = module
        else:
            try:
                _emu_module = importlib.import_module("repkern._emu")
            except ImportError as exc:
                raise RuntimeError(
                    "REPKERN_BACKEND=emu needs repkern._emu, which this build does not have "
                    "(it is built unless CMake option REPKERN_EMU=OFF)"
                ) from exc
    return _emu_module


def has_emulator() -> bool:
    try:
        emu_module()
    except (RuntimeError, ImportError):
        return False
    return True


def backend_setting() -> str:
    value = os.environ.get("REPKERN_BACKEND", "auto") or "auto"
    if value not in BACKENDS:
        raise ValueError(f"REPKERN_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def use_reference() -> bool:
    return backend_setting() == "reference"


def backend_for(device: torch.device) -> str:
    """'cpu', 'cuda' or 'emu': which native kernels run for tensors on `device`."""
    setting = backend_setting()
    if device.type == "cuda":
        if not _C.build_info()["cuda"]:
            reason = _C.build_info()["cuda_skipped"] or "no nvcc at build time"
            raise RuntimeError(
                f"repkern was built without CUDA kernels ({reason}); reinstall with nvcc on PATH (or "
                "CUDACXX=/path/to/nvcc) and REPKERN_CUDA=ON, or set REPKERN_BACKEND=reference"
            )
        return "cuda"
    if device.type == "cpu":
        return "emu" if setting == "emu" else "cpu"
    raise ValueError(f"repkern supports CPU and CUDA tensors, got device {device}")


def view(t: Optional[torch.Tensor]):
    if t is None:
        return None
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), DTYPE_CODES[t.dtype])


def call(kernel: str, device: torch.device, *args):
    """Runs native kernel `kernel` for tensors on `device`. Tensor arguments are
    passed as views; the CPU entry gets torch's thread count, the CUDA entry the
    current stream of `device`."""
    native_args = [view(a) if isinstance(a, torch.Tensor) or a is None else a for a in args]
    backend = backend_for(device)
    if backend == "cpu":
        return getattr(_C, kernel + "_cpu")(*native_args, torch.get_num_threads())
    if backend == "emu":
        return getattr(emu_module(), kernel + "_cuda")(*native_args, 0)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        return getattr(_C, kernel + "_cuda")(*native_args, stream)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of scalar/statistic results: float64 for float64 inputs, float32 otherwise."""
    return acc_dtype(dtype)
