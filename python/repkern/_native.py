"""Loading of the native modules and routing of kernel calls.

Backends (env ``REPKERN_BACKEND``, read at each call):
  ``auto`` (default)  CUDA tensors -> CUDA kernels of ``repkern._C``; CPU tensors -> its C++ kernels
  ``reference``       the pure-PyTorch implementations in :mod:`repkern.reference`
  ``emu``             CPU tensors -> the CUDA kernels run by the emulator ``repkern._emu``

Each op module declares the kernels it calls with :func:`kernel` at import, so a kernel missing from the
build fails there, not at the first call. Tensors cross into C++ as ``(data_ptr, sizes, strides,
dtype_code)``; torch allocates every output and workspace, and each tensor stays bound to a Python name
until the native call returns.

Kernels that read through index arrays check every index (csrc/common/index_check.h): the CPU entries raise
ValueError themselves; the CUDA kernels (and the emulator) skip a bad index and set a bit in an int32 error
word the op allocates with :func:`index_error_word` and reads with :func:`raise_index_errors` after the
launch. On CUDA that read is one device-to-host synchronization per op call.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from typing import Optional

import torch

from repkern import _constants  # noqa: F401  (first: its ImportError explains a missing _C)
from repkern import _C
from repkern._constants import DTYPE_CODES as _DTYPE_NAME_CODES
from repkern._constants import INDEX_ERRORS

BACKENDS = ("auto", "reference", "emu")
DTYPE_CODES = {getattr(torch, name): code for name, code in _DTYPE_NAME_CODES.items()}

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
                    "REPKERN_BACKEND=emu needs repkern._emu, which this installation does not have "
                    "(build it with REPKERN_EMU=ON, as scripts/test.sh does)"
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


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A native kernel: ``<name>_cpu`` / ``<name>_cuda`` of repkern._C (the CUDA one when built with nvcc),
    and ``<name>_cuda`` of repkern._emu."""

    name: str
    cpu: Optional[object]
    cuda: Optional[object]
    has_cuda: bool


KERNELS: dict[str, Kernel] = {}


def kernel(name: str, *, cpu: bool = True, cuda: bool = True) -> Kernel:
    """The kernel `name`, looked up now: an entry the build must have and lacks raises ImportError.
    `cpu` / `cuda`: whether the kernel has that entry at all (some run on one backend only)."""
    built_cuda = bool(_C.build_info()["cuda"])
    entries = {}
    for backend, wanted in (("cpu", cpu), ("cuda", cuda and built_cuda)):
        if wanted:
            entries[backend] = getattr(_C, f"{name}_{backend}", None)
            if entries[backend] is None:
                raise ImportError(f"repkern._C has no kernel {name}_{backend}: the native module does not match "
                                  "this Python package (reinstall repkern)")
    k = Kernel(name, entries.get("cpu"), entries.get("cuda"), cuda)
    KERNELS[name] = k
    return k


def index_error_word(device: torch.device) -> torch.Tensor:
    """The zero-filled int32 error word ([1]) of a kernel that checks its indices."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def raise_index_errors(error: torch.Tensor) -> None:
    """ValueError naming the arguments whose indices a CUDA kernel found out of range (the bits of `error`,
    csrc/common/index_check.h). On CUDA, reading the word synchronizes with the device: one sync per call."""
    flags = int(error.item())
    if flags:
        raise ValueError("; ".join(message for bit, message in sorted(INDEX_ERRORS.items()) if flags & bit))


def view(t: Optional[torch.Tensor]):
    if t is None:
        return None
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), DTYPE_CODES[t.dtype])


def call(k: Kernel, device: torch.device, *args):
    """Runs kernel `k` for tensors on `device`. Tensor arguments are passed as views; the CPU entry gets
    torch's thread count, the CUDA entry the current stream of `device`."""
    native_args = [view(a) if isinstance(a, torch.Tensor) or a is None else a for a in args]
    backend = backend_for(device)
    if backend == "cpu":
        if k.cpu is None:
            raise RuntimeError(f"kernel {k.name} has no CPU entry")
        return k.cpu(*native_args, torch.get_num_threads())
    if backend == "emu":
        entry = getattr(emu_module(), f"{k.name}_cuda", None) if k.has_cuda else None
        if entry is None:
            raise RuntimeError(f"kernel {k.name} has no CUDA entry in repkern._emu")
        return entry(*native_args, 0)
    if k.cuda is None:
        raise RuntimeError(f"kernel {k.name} has no CUDA entry")
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        return k.cuda(*native_args, stream)
