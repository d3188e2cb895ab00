"""Shared fixtures: every op test runs on each available backend.

Backends: ``cpu`` (C++ kernels), ``emu-forward`` / ``emu-reverse`` (the CUDA
kernels on CPU tensors through repkern._emu under two thread schedules), and
``cuda`` when a GPU and a CUDA build are present.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import repkern

EMU_SCHEDULES = ("forward", "reverse")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    device: torch.device

    @property
    def is_emu(self) -> bool:
        return self.name.startswith("emu")


def _backend_names():
    names = ["cpu"] + [f"emu-{s}" for s in EMU_SCHEDULES]
    if torch.cuda.is_available() and repkern.build_info()["cuda"]:
        names.append("cuda")
    return names


@pytest.fixture(params=_backend_names())
def backend(request, monkeypatch) -> Backend:
    name = request.param
    monkeypatch.delenv("REPKERN_BACKEND", raising=False)
    if name.startswith("emu"):
        monkeypatch.setenv("REPKERN_BACKEND", "emu")
        monkeypatch.setenv("REPKERN_EMU_SCHEDULE", name.split("-", 1)[1])
    return Backend(name, torch.device("cuda" if name == "cuda" else "cpu"))


def assert_close_to_reference(fast: torch.Tensor, ref_low: torch.Tensor, ref64: torch.Tensor, *, atol64=1e-9):
    """float32/float64: close to the reference. float16/bfloat16: error against the
    float64 reference at most 2× that of the reference run in the same precision."""
    assert fast.dtype == ref_low.dtype and fast.shape == ref64.shape
    fast64, low64 = fast.double(), ref_low.double()
    nan_fast, nan_ref = torch.isnan(fast64), torch.isnan(ref64)
    assert torch.equal(nan_fast, nan_ref), "NaN pattern differs from the reference"
    fast64, low64, ref64 = (t.nan_to_num(0.0) for t in (fast64, low64, ref64))
    if fast.dtype == torch.float64:
        torch.testing.assert_close(fast64, ref64, rtol=1e-10, atol=atol64)
    elif fast.dtype == torch.float32:
        torch.testing.assert_close(fast64, ref64, rtol=2e-5, atol=2e-5 * max(1.0, ref64.abs().max().item()))
    else:
        err = (fast64 - ref64).abs().max().item()
        ref_err = (low64 - ref64).abs().max().item()
        floor = torch.finfo(fast.dtype).eps * max(1.0, ref64.abs().max().item())
        assert err <= 2 * ref_err + floor, f"{fast.dtype}: error {err:.3g} > 2 × reference error {ref_err:.3g}"
