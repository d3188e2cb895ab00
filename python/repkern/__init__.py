"""repkern: fast kernels for representation analysis on PyTorch tensors.

Public API (see README): :func:`gram`, :func:`build_info`; pure-PyTorch twins of
every op in :mod:`repkern.reference`.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from repkern import reference  # noqa: F401
from repkern._native import has_emulator as _has_emulator
from repkern.capture import capture
from repkern.ops.gram import gram

try:
    __version__ = _metadata.version("repkern")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"


def build_info() -> dict:
    """How this installation was built and what it can run on."""
    import torch

    from repkern import _native

    info = dict(_native._C.build_info())
    info["version"] = __version__
    info["emulator"] = _has_emulator()
    info["torch"] = torch.__version__
    info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


__all__ = ["gram", "capture", "build_info", "reference", "__version__"]
